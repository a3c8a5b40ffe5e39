"""The per-expert cuBLAS MoE (kernels/per_expert.py) against the float64 expert loop, with its Triton
SiLU and combine under the CPU interpreter and with its torch fallbacks."""

import os

_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels (conftest.py: its own library)

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import moegps.kernels.per_expert  # noqa: E402,F401
from conftest import redecorate_kernels  # noqa: E402

# decorated for the interpreter even where another test module imported the kernels compiled first
redecorate_kernels()
importlib.reload(sys.modules["moegps.kernels.per_expert"])
if _interpret is None:
    del os.environ["TRITON_INTERPRET"]

from moegps.kernels.per_expert import pays, per_expert_moe, silu_mul  # noqa: E402
from moegps.kernels.reference import moe_reference  # noqa: E402


def _inputs(seed, tokens, experts, hidden, ffn, top_k, dtype, skew=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    w_gate_up = torch.randn(experts, 2 * ffn, hidden, generator=gen, dtype=torch.float64) * hidden ** -0.5
    w_down = torch.randn(experts, hidden, ffn, generator=gen, dtype=torch.float64) * ffn ** -0.5
    # popularity ~ exp(-skew * e): skew > 0 leaves some experts with many rows and some with none
    popularity = torch.exp(-skew * torch.arange(experts, dtype=torch.float64)).expand(tokens, experts)
    ids = torch.multinomial(popularity, top_k, replacement=False, generator=gen)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen, dtype=torch.float64), -1)
    return [t.to(dtype) if t.is_floating_point() else t for t in (x, w_gate_up, w_down, ids, weights)]


@pytest.mark.parametrize("interpret", [True, False])
@pytest.mark.parametrize("tokens,experts,top_k,skew", [(1, 4, 2, 0.0), (37, 8, 2, 0.0), (29, 8, 3, 1.5),
                                                      (50, 16, 6, 0.7)])
def test_matches_the_expert_loop(monkeypatch, interpret, tokens, experts, top_k, skew):
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w_gate_up, w_down, ids, weights = _inputs(tokens * 100 + experts, tokens, experts, 48, 40, top_k,
                                                 torch.float32, skew)
    ref = moe_reference(*(t.double() if t.is_floating_point() else t for t in (x, w_gate_up, w_down, ids, weights)))
    out = per_expert_moe(x, w_gate_up, w_down, ids, weights)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-5
    if skew > 0:  # the case has experts that got no rows
        assert len(ids.unique()) < experts


def test_float64_is_exact_to_rounding(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w_gate_up, w_down, ids, weights = _inputs(7, 33, 8, 32, 24, 2, torch.float64, 0.5)
    ref = moe_reference(x, w_gate_up, w_down, ids, weights)
    assert torch.allclose(per_expert_moe(x, w_gate_up, w_down, ids, weights), ref, rtol=1e-12, atol=1e-12)


def test_silu_mul_kernel_against_float64(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(5, 2 * 3000, generator=gen, dtype=torch.float64)  # F = 3000: two column tiles, one partial
    w = torch.rand(5, generator=gen, dtype=torch.float64)
    g, u = h.chunk(2, -1)
    ref = g * torch.sigmoid(g) * u * w[:, None]
    out = silu_mul(h.float(), w.float())
    assert out.shape == (5, 3000)
    assert (out.double() - ref).abs().max() < 1e-5


def test_pays_by_rows_an_expert(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("MOEGPS_PER_EXPERT_ROWS", raising=False)
    assert not pays(1 << 20, 8, 2, cpu)  # no measured threshold for the CPU
    monkeypatch.setenv("MOEGPS_PER_EXPERT_ROWS", "256")
    assert pays(1024, 8, 2, cpu) and not pays(1023, 8, 2, cpu)  # 2048 selections over 8 experts: 256 each
    monkeypatch.setenv("MOEGPS_PER_EXPERT_ROWS", "off")
    assert not pays(1 << 20, 8, 2, cpu)
    monkeypatch.setenv("MOEGPS_PER_EXPERT_ROWS", "many")
    with pytest.raises(ValueError, match="MOEGPS_PER_EXPERT_ROWS"):
        pays(1024, 8, 2, cpu)
