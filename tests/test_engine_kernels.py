"""The engine's Triton kernels on the CPU interpreter against float64 references written here.

Each reference below is the definition written from scratch (loops or plain float64 algebra), not
the module's ``*_torch`` function: a shared mistake in the kernel and its torch twin cannot pass.
Inputs are fresh random draws each run (the seed is in every assertion message); caches are filled
with random values, so that a position the kernel should not read or write shows up.
"""

import importlib
import os
import sys

_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels (conftest.py: its own library)

import pytest
import torch

import moegps.engine.kernels  # noqa: F401
import moegps.kernels  # noqa: F401
from conftest import redecorate_kernels

# Another module may have imported the kernels before the variable was set (Triton decides
# interpreted or compiled when it decorates): decorate them again, the MoE kernels in dependency
# order first (see tests/test_kernels.py), then the engine's.
redecorate_kernels()
K = importlib.reload(sys.modules["moegps.engine.kernels"])
# back as it was: the engine picks Triton on the CPU while the variable is set, which the
# fixture below does for this module's tests only
if _interpret is None:
    del os.environ["TRITON_INTERPRET"]

import moegps.engine.model as engine_model  # noqa: E402
from moegps.engine.model import KVCache, decode_step, decode_step_with_chunk, prefill, random_model  # noqa: E402
from moegps.shapes import from_name  # noqa: E402


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def gen(rng):
    """A torch generator freshly seeded from ``rng``; ``gen.initial_seed()`` names the draw in failures."""
    return torch.Generator().manual_seed(int(rng.integers(2**31)))


def rel_err(out, ref) -> float:
    """Largest absolute difference over the reference's largest magnitude."""
    return float((out.double() - ref).abs().max() / ref.abs().max())


# ---- residual add + RMSNorm --------------------------------------------------------------------------

def rmsnorm_f64(x, w, eps):
    x = x.double()
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * w.double()


@pytest.mark.parametrize("T,H", [(1, 64), (7, 40), (5, 192)])
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rmsnorm(gen, T, H, with_delta, dtype):
    resid = torch.randn(T, H, generator=gen).to(dtype)
    delta = torch.randn(T, H, generator=gen).to(dtype) if with_delta else None
    w = (1 + 0.5 * torch.randn(H, generator=gen)).to(dtype)
    eps = 1e-5
    total = resid.double() + (delta.double() if with_delta else 0)
    before = resid.clone()
    out = K.add_rmsnorm(resid, delta, w, eps)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert out.dtype == dtype and out.shape == (T, H)
    assert rel_err(out, rmsnorm_f64(total, w, eps)) < tol, gen.initial_seed()
    if with_delta:  # the residual stream now holds the sum, rounded to its dtype
        assert rel_err(resid, total) < tol, gen.initial_seed()
    else:
        assert torch.equal(resid, before)


# ---- skinny linear -----------------------------------------------------------------------------------------

class _Spy:
    """Counts the launches of a kernel (so a test knows the kernel ran, not the fallback)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("T,N,K_dim,block_n", [(1, 48, 256, 16), (5, 40, 512, 16), (16, 33, 256, 32)])
def test_linear_skinny_kernel(gen, monkeypatch, T, N, K_dim, block_n):
    """x @ w^T for decode-sized batches, N not always a multiple of the tile (masked columns), in fp32
    (the interpreter's bf16 dot is not exact; bf16 is checked on the GPU by linear_probe.py)."""
    spy = _Spy(K._skinny_linear_kernel)
    monkeypatch.setattr(K, "_skinny_linear_kernel", spy)
    x = torch.randn(T, K_dim, generator=gen)
    w = torch.randn(N, K_dim, generator=gen)
    out = K.linear(x, w, block_n=block_n)
    assert spy.launches == 1 and out.shape == (T, N)
    assert rel_err(out, x.double() @ w.double().T) < 1e-5, gen.initial_seed()


@pytest.mark.parametrize("T,K_dim", [(K.SKINNY_MAX_ROWS + 1, 256), (3, 200)])
def test_linear_falls_back_to_matmul(gen, monkeypatch, T, K_dim):
    """More rows than the kernel takes, or K not a multiple of its K tile: torch's matmul, exactly."""
    spy = _Spy(K._skinny_linear_kernel)
    monkeypatch.setattr(K, "_skinny_linear_kernel", spy)
    x = torch.randn(T, K_dim, generator=gen)
    w = torch.randn(24, K_dim, generator=gen)
    assert torch.equal(K.linear(x, w), x @ w.T) and spy.launches == 0


# ---- rotary embedding + KV-cache write ------------------------------------------------------------------

def rotate_f64(x, positions, theta):
    """Rotary embedding by the definition: pairs (i, i + D/2) turned by angle p * theta^(-2i/D)."""
    D = x.shape[-1]
    half = D // 2
    angle = positions.double()[:, None] * theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / D)
    c, s = angle.cos()[:, None, :], angle.sin()[:, None, :]
    x = x.double()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


@pytest.mark.parametrize("n_heads,n_kv,D", [(4, 4, 16), (8, 2, 32), (16, 2, 16), (6, 2, 32)])
def test_rope_cache_write(gen, n_heads, n_kv, D):
    """11 tokens at distinct (slot, position) pairs, positions up to the cache's end, and 3 of slot -1 (a packed
    prefill's padding): every query rotated, the K/V of slot -1 written nowhere."""
    slots, max_len, theta = 3, 40, 1e4
    pairs = torch.randperm(slots * max_len, generator=gen)[:11]
    slot, pos = pairs // max_len, pairs % max_len
    slot = torch.cat([slot, torch.full((3,), -1)])
    pos = torch.cat([pos, torch.randint(0, max_len, (3,), generator=gen)])
    qkv = torch.randn(14, (n_heads + 2 * n_kv) * D, generator=gen)
    k_cache = torch.randn(slots, n_kv, max_len, D, generator=gen)
    v_cache = torch.randn(slots, n_kv, max_len, D, generator=gen)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    cos, sin = K.rope_tables(max_len, D, theta, "cpu")
    q = K.rope_cache_write(qkv, k_cache, v_cache, pos, slot, cos, sin, n_heads, n_kv)
    parts = qkv.view(14, n_heads + 2 * n_kv, D)
    q_ref = rotate_f64(parts[:, :n_heads], pos, theta)
    k_ref = rotate_f64(parts[:, n_heads:n_heads + n_kv], pos, theta)
    assert q.shape == (14, n_heads, D)
    assert rel_err(q, q_ref) < 1e-6, gen.initial_seed()
    written = torch.zeros(slots, max_len, dtype=torch.bool)
    written[slot[:11], pos[:11]] = True
    for t in range(11):
        assert rel_err(k_cache[slot[t], :, pos[t]], k_ref[t]) < 1e-6, gen.initial_seed()
        assert torch.equal(v_cache[slot[t], :, pos[t]], parts[t, n_heads + n_kv:])  # values copied as is
    untouched = ~written[:, None, :, None].expand_as(k_cache)
    assert torch.equal(k_cache[untouched], k_before[untouched]) and torch.equal(v_cache[untouched], v_before[untouched])


@pytest.mark.parametrize("n_heads,n_kv,D,T,per_program", [(4, 4, 32, 1, 16), (8, 2, 64, 5, 16), (8, 2, 64, 5, 32),
                                                     (6, 2, 32, 16, 16), (4, 1, 32, 17, 16), (4, 2, 64, 32, 32),
                                                     (4, 1, 32, 33, 16)])
def test_qkv_rope_cache_write(gen, monkeypatch, n_heads, n_kv, D, T, per_program):
    """The projection, rotation and cache write of a decode batch (GQA groups 1, 4, 3, 2; one token, several, the
    most rows a tile of 16 takes, more in tiles of 32, and one more than one launch takes, which takes the
    two-launch path; 16 or 32 pairs a program) against float64 by the definition: q rotated, k rotated and v as
    projected at each token's (slot, position), nothing written for a token of slot -1 nor anywhere else."""
    spy = _Spy(K._qkv_rope_cache_kernel)
    monkeypatch.setattr(K, "_qkv_rope_cache_kernel", spy)
    H, slots, max_len, theta = 256, 4, 40, 1e4
    pairs = torch.randperm(slots * max_len, generator=gen)[:T]
    slot, pos = pairs // max_len, pairs % max_len
    if T > 1:
        slot[-1] = -1
    x = torch.randn(T, H, generator=gen)
    w = torch.randn((n_heads + 2 * n_kv) * D, H, generator=gen) * H ** -0.5
    k_cache = torch.randn(slots, n_kv, max_len, D, generator=gen)
    v_cache = torch.randn(slots, n_kv, max_len, D, generator=gen)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    cos, sin = K.rope_tables(max_len, D, theta, "cpu")
    q = K.qkv_rope_cache_write(x, w, k_cache, v_cache, pos, slot, cos, sin, n_heads, n_kv,
                               pairs=per_program)
    assert spy.launches == int(T <= K.FUSED_QKV_ROPE_MAX_ROWS)
    parts = (x.double() @ w.double().T).view(T, n_heads + 2 * n_kv, D)
    assert q.shape == (T, n_heads, D)
    assert rel_err(q, rotate_f64(parts[:, :n_heads], pos, theta)) < 1e-5, gen.initial_seed()
    k_ref = rotate_f64(parts[:, n_heads:n_heads + n_kv], pos, theta)
    written = torch.zeros(slots, max_len, dtype=torch.bool)
    for t in range(T):
        if slot[t] >= 0:
            written[slot[t], pos[t]] = True
            assert rel_err(k_cache[slot[t], :, pos[t]], k_ref[t]) < 1e-5, gen.initial_seed()
            assert rel_err(v_cache[slot[t], :, pos[t]], parts[t, n_heads + n_kv:]) < 1e-5, gen.initial_seed()
    untouched = ~written[:, None, :, None].expand_as(k_cache)
    assert torch.equal(k_cache[untouched], k_before[untouched]) and torch.equal(v_cache[untouched], v_before[untouched])


def test_rope_tables_are_the_angles(gen):
    D, theta = 32, 1e6
    cos, sin = K.rope_tables(100, D, theta, "cpu")
    angle = torch.arange(100, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    assert rel_err(cos, angle.cos()) < 1e-7 and rel_err(sin, angle.sin()) < 1e-7


# ---- decode attention ------------------------------------------------------------------------------------

def attention_f64(q, k_cache, v_cache, lengths, scale):
    """One query per sequence, a loop over sequences and heads: softmax(q . k / sqrt(D)) v over the
    first ``lengths[b]`` keys of KV head ``h // group``."""
    B, n_heads, D = q.shape
    group = n_heads // k_cache.shape[1]
    out = torch.empty(B, n_heads, D, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        for h in range(n_heads):
            k = k_cache[b, h // group, :n].double()
            v = v_cache[b, h // group, :n].double()
            w = torch.softmax(k @ q[b, h].double() * scale, dim=0)
            out[b, h] = w @ v
    return out


# (name, query heads, KV heads, cache length, lengths, keys per split program or None for the default)
ATTENTION_CASES = [
    ("context 1, group 1", 4, 4, 64, [1, 1, 1], None),
    ("not a multiple of the block, group 4", 8, 2, 100, [45, 77, 1], None),
    ("full cache, group 8", 8, 1, 96, [96, 96, 50], None),
    ("several splits, group 4", 8, 2, 200, [200, 129, 33], 64),
    ("several splits, a split past the context, group 8", 16, 2, 160, [17, 160, 99], 32),
    ("splits not a multiple of the block, group 1", 2, 2, 150, [150, 61, 7], 48),
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention(gen, case, dtype):
    _, n_heads, n_kv, max_len, lengths, split = case
    D = 16
    B = len(lengths)
    q = torch.randn(B, n_heads, D, generator=gen).to(dtype)
    # keys scaled so that the softmax is far from uniform (a wrong key would show)
    k_cache = (3 * torch.randn(B + 1, n_kv, max_len, D, generator=gen)).to(dtype)
    v_cache = torch.randn(B + 1, n_kv, max_len, D, generator=gen).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    ref = attention_f64(q, k_cache, v_cache, lens, D ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for _ in range(2):  # twice: the split merge's tickets must be back at zero after a call
        out = K.decode_attention(q, k_cache, v_cache, lens, split=split)
        assert out.dtype == dtype and out.shape == q.shape
        assert rel_err(out, ref) < tol, (gen.initial_seed(), rel_err(out, ref))


def test_decode_attention_default_split_is_several_for_long_contexts(gen):
    """The default split of a long context gives several programs per sequence (the merge runs)."""
    split = K.attention_splits(1, 1, 1024)
    assert split < 1024 and split % 32 == 0
    q = torch.randn(1, 4, 16, generator=gen)
    k_cache, v_cache = 3 * torch.randn(1, 1, 1024, 16, generator=gen), torch.randn(1, 1, 1024, 16, generator=gen)
    lens = torch.tensor([1000], dtype=torch.int32)
    out = K.decode_attention(q, k_cache, v_cache, lens)
    assert rel_err(out, attention_f64(q, k_cache, v_cache, lens, 0.25)) < 1e-5, gen.initial_seed()


def test_decode_attention_empty_rows_are_zeros(gen):
    """A row of length 0 attends to nothing: zeros (the torch definition), in a NaN-filled output,
    beside rows that split and merge."""
    q = torch.randn(3, 8, 16, generator=gen)
    k_cache, v_cache = 3 * torch.randn(3, 2, 300, 16, generator=gen), torch.randn(3, 2, 300, 16, generator=gen)
    lens = torch.tensor([0, 300, 5], dtype=torch.int32)
    for split in (None, 64):
        out = K.decode_attention(q, k_cache, v_cache, lens, split=split, out=torch.full_like(q, float("nan")))
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert rel_err(out[1:], attention_f64(q[1:], k_cache[1:], v_cache[1:], lens[1:], 0.25)) < 1e-5, \
            gen.initial_seed()


# ---- router: softmax, top-k --------------------------------------------------------------------------------

def router_f64(x, w, top_k, renormalize):
    """Probabilities sorted descending by the definition: ``(ids [T, E], probs [T, E])`` in float64."""
    probs = torch.softmax(x.double() @ w.double().T, dim=-1)
    order = torch.argsort(probs, dim=-1, descending=True, stable=True)
    return order, probs


def check_topk(ids, gates, x, w, top_k, renormalize, seed, tol):
    """``ids`` must be the top-k in order wherever the float64 ranking is clear (neighbours more than
    1e-5 apart); wherever it is not, the chosen experts' probabilities must equal the true top-k's."""
    order, probs = router_f64(x, w, top_k, renormalize)
    top = probs.gather(1, order[:, :top_k + 1])
    clear = (top[:, :-1] - top[:, 1:]).min(1).values > 1e-5
    # Fresh random logits are mostly tie-free, so the test compares ids; a single near-tie among one or
    # two tokens is chance (about 1e-3 a row), not a fault, and falls to the probability check below.
    assert int(clear.sum()) >= len(clear) // 2, seed
    ids = ids.long()
    assert torch.equal(ids[clear], order[clear, :top_k]), seed
    chosen = probs.gather(1, ids)
    assert (chosen - top[:, :top_k]).abs().max() < 1e-5, seed
    expect = chosen / chosen.sum(1, keepdim=True) if renormalize else chosen
    assert rel_err(gates, expect) < tol, seed
    for row in ids:  # k distinct experts
        assert len(set(row.tolist())) == top_k


ROUTER_CASES = [(1, 64, 8, 2), (17, 40, 8, 2), (40, 48, 64, 6), (33, 64, 64, 8), (9, 32, 60, 6), (5, 200, 128, 8)]


@pytest.mark.parametrize("T,H,E,top_k", ROUTER_CASES)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("shared", [0, 2])
def test_router_topk(gen, T, H, E, top_k, renormalize, shared):
    x = torch.randn(T, H, generator=gen)
    w = torch.randn(E, H, generator=gen) / H ** 0.5
    ids, gates = K.router_topk(x, w, top_k, renormalize, shared=shared)
    assert ids.dtype == torch.int32 and ids.shape == gates.shape == (T, top_k + shared)
    check_topk(ids[:, :top_k], gates[:, :top_k], x, w, top_k, renormalize, gen.initial_seed(), 1e-5)
    assert ids[:, top_k:].tolist() == [list(range(E, E + shared))] * T
    assert torch.equal(gates[:, top_k:], torch.ones(T, shared))


def test_router_ties_go_to_the_lowest_id():
    """Hand-built exact ties (logits on a grid of whole numbers): the lowest id wins, as documented."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = torch.tensor([[1.0, 0.0], [2.0, 0.0], [2.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    # token 0 logits [1, 2, 2, 1, 2, 0]: top-3 = 1, 2, 4; token 1 logits [0, 0, 1, 1, 0, 2]: top-3 = 5, 2, 3
    ids, _ = K.router_topk(x, w, 3, True)
    assert ids.tolist() == [[1, 2, 4], [5, 2, 3]]
    resid = x / 2  # the fused norm + router sees x = resid + delta exactly (halves of small integers)
    _, fused_ids, _ = K.add_rmsnorm_router(resid, x / 2, torch.ones(2), 1e-5, w, 3, True)
    assert fused_ids.tolist() == [[1, 2, 4], [5, 2, 3]]


# (2, 8192, 11, 3): the fused kernel walks the router in chunks of 2 experts, the last one half empty;
# split over programs of 4 experts, E = 11 and 60 leave the last program's experts partly past E
@pytest.mark.parametrize("T,H,E,top_k", [(1, 64, 8, 2), (13, 40, 8, 2), (6, 192, 64, 8), (4, 48, 60, 6),
                                         (2, 8192, 11, 3)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("path", ["one program a token", "split", "two launches"])
def test_add_rmsnorm_router(gen, T, H, E, top_k, renormalize, shared, path, monkeypatch):
    """The fused launch with a token's whole router in one program or split over programs of 4 experts
    (the last to finish picks the top-k), and the two launches it falls back to past
    FUSED_ROUTER_MAX_PROGRAMS; with ``shared``, the columns after the top-k name experts E, E+1, ... with
    gate 1 (Layer.n_shared). Two calls on fresh inputs: the split form's tickets must be back at zero
    for the second (a ticket left over picks no top-k: the ids would be whatever the buffer held)."""
    if path == "two launches":
        monkeypatch.setattr(K, "FUSED_ROUTER_MAX_PROGRAMS", 0)
    for _ in range(2):
        resid = torch.randn(T, H, generator=gen)
        delta = torch.randn(T, H, generator=gen)
        norm_w = 1 + 0.5 * torch.randn(H, generator=gen)
        w = torch.randn(E, H, generator=gen) / H ** 0.5
        total = resid.double() + delta.double()
        if path == "two launches":
            x, ids, gates = K.add_rmsnorm_router(resid, delta, norm_w, 1e-5, w, top_k, renormalize, shared=shared)
        else:
            x, ids, gates = K._add_rmsnorm_router_fused(resid, delta, norm_w, 1e-5, w, top_k, renormalize, shared,
                                                        experts_per_program=4 if path == "split" else 128)
        normed = rmsnorm_f64(total, norm_w, 1e-5)
        assert rel_err(x, normed) < 1e-6 and rel_err(resid, total) < 1e-6, gen.initial_seed()
        assert ids.shape == gates.shape == (T, top_k + shared) and ids.dtype == torch.int32
        check_topk(ids[:, :top_k], gates[:, :top_k], normed, w, top_k, renormalize, gen.initial_seed(), 1e-5)
        assert ids[:, top_k:].tolist() == [list(range(E, E + shared))] * T
        assert torch.equal(gates[:, top_k:], torch.ones(T, shared))


@pytest.mark.parametrize("T,E,fused", [(32, 64, True), (33, 64, False), (256, 8, True), (257, 8, False)])
def test_add_rmsnorm_router_takes_the_fused_launch_up_to_its_programs(gen, monkeypatch, T, E, fused):
    """One launch while tokens x programs a token stay within FUSED_ROUTER_MAX_PROGRAMS (64 experts: 8 programs
    a token; 8 experts: one), add_rmsnorm and the tiled router beyond; the same outputs either way."""
    monkeypatch.setattr(K, "ROUTER_EXPERTS_PER_PROGRAM", 8)
    monkeypatch.setattr(K, "FUSED_ROUTER_MAX_PROGRAMS", 256)
    spy = _Spy(K._add_rmsnorm_router_kernel)
    monkeypatch.setattr(K, "_add_rmsnorm_router_kernel", spy)
    H = 16
    resid, delta = torch.randn(T, H, generator=gen), torch.randn(T, H, generator=gen)
    w = torch.randn(E, H, generator=gen) / H ** 0.5
    total = resid.double() + delta.double()
    x, ids, gates = K.add_rmsnorm_router(resid, delta, torch.ones(H), 1e-5, w, 2, True)
    assert spy.launches == int(fused)
    normed = rmsnorm_f64(total, torch.ones(H), 1e-5)
    assert rel_err(x, normed) < 1e-6
    check_topk(ids, gates, normed, w, 2, True, gen.initial_seed(), 1e-5)


# ---- the whole engine on the interpreted kernels -----------------------------------------------------------

def interpreted_engine(monkeypatch) -> None:
    """The engine's model code on this module's interpreted kernels (the module imported them compiled)."""
    for name in ("add_rmsnorm", "add_rmsnorm_router", "decode_attention", "linear", "qkv_rope_cache_write",
                 "use_triton"):
        monkeypatch.setattr(engine_model, name, getattr(K, name))
    monkeypatch.setattr(engine_model, "fused_moe", moegps.kernels.fused_moe)


@pytest.mark.parametrize("shared_ffn", [0, 64])
def test_engine_on_interpreted_kernels_matches_its_torch_path(rng, monkeypatch, shared_ffn):
    """A tiny random Mixtral (GQA group 4): prefill of two prompts of different lengths, 4 greedy decode
    steps, a decode step with a prompt chunk beside it and a prefill into slots (2, 0), every kernel
    interpreted, against the same model on the torch path (whose agreement
    with transformers tests/test_engine.py checks): logits within 1e-4, identical tokens. With
    ``shared_ffn`` 64, a shared expert of two experts' width held as two extra experts."""
    # hidden a multiple of the skinny kernels' K tiles and half a head a multiple of QKV_ROPE_DEFAULTS' pairs:
    # decode takes the skinny projections and the one-launch QKV + rotary + cache write, as on a GPU
    shape = from_name("mixtral-8x7b").replace(name="tiny", vocab_size=96, n_layers=2, hidden=256, n_heads=8,
                                              n_kv_heads=2, head_dim=64, expert_ffn=32, n_experts=8, top_k=2,
                                              shared_ffn=shared_ffn)
    seed = int(rng.integers(2**20))
    model = random_model(shape, device="cpu", dtype=torch.float32, seed=seed)
    prompts = [torch.from_numpy(rng.integers(0, 96, size=n)) for n in (5, 11)]

    chunk = torch.from_numpy(rng.integers(0, 96, size=4))

    def run():
        cache = KVCache(shape, 3, 16, torch.float32, "cpu")
        logits = [prefill(model, cache, prompts)]
        positions = torch.tensor([5, 11])
        for _ in range(4):
            logits.append(decode_step(model, cache, logits[-1].argmax(-1), positions))
            positions = positions + 1
        # a decode step with 3 tokens of a third prompt (and a padding row) beside it, into slot 2
        both = decode_step_with_chunk(model, cache, logits[-1].argmax(-1), positions, chunk, torch.tensor([2]),
                                      torch.tensor([0]), torch.tensor([2]))
        gathered = prefill(model, KVCache(shape, 3, 16, torch.float32, "cpu"), prompts, slots=[2, 0])
        return torch.cat([torch.stack(logits + [both[:2], gathered]).flatten(0, 1), both[2:]])

    monkeypatch.delenv("TRITON_INTERPRET")
    torch_path = run()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted_engine(monkeypatch)
    spy = _Spy(K._qkv_rope_cache_kernel)
    monkeypatch.setattr(K, "_qkv_rope_cache_kernel", spy)
    triton_path = run()
    # every call here has at most 16 rows (two prefills of 16, four decode steps, the step with a chunk):
    # each layer of each takes the one-launch QKV + rotary
    assert spy.launches == 2 * 7
    assert rel_err(triton_path, torch_path.double()) < 1e-4, seed
    assert torch.equal(triton_path.argmax(-1), torch_path.argmax(-1)), seed


def test_deterministic_mode_decodes_without_atomics_and_restores_torch(rng, monkeypatch):
    """A tiny model of 16 small experts, top-4, whose prefill and decode steps take the fused MoE path (its programs add
    F slices with atomics, in an order that varies on a GPU): under ``deterministic_algorithms`` the same steps
    run without it and give the same logits to rounding, the same greedy tokens; torch's settings and the
    cuBLAS variable are as before afterwards."""
    import torch.utils.deterministic

    from moegps.kernels import deterministic_algorithms, launch

    shape = from_name("mixtral-8x7b").replace(name="tiny", vocab_size=96, n_layers=2, hidden=64, n_heads=4,
                                              n_kv_heads=2, head_dim=16, expert_ffn=32, n_experts=16, top_k=4)
    seed = int(rng.integers(2**20))
    model = random_model(shape, device="cpu", dtype=torch.float32, seed=seed)
    prompts = [torch.from_numpy(rng.integers(0, 96, size=n)) for n in (3, 6)]
    interpreted_engine(monkeypatch)
    spy = _Spy(launch.fused_scan_kernel)
    monkeypatch.setattr(launch, "fused_scan_kernel", spy)

    def run():
        cache = KVCache(shape, 2, 12, torch.float32, "cpu")
        logits = [prefill(model, cache, prompts)]
        positions = torch.tensor([3, 6])
        for _ in range(3):
            logits.append(decode_step(model, cache, logits[-1].argmax(-1), positions))
            positions = positions + 1
        return torch.stack(logits)

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    free = run()
    assert spy.launches == 2 * 4, "prefill (36 pairs) and the decode steps take the fused path outside the mode"
    spy.launches = 0
    with deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"]
        fixed = run()
    assert spy.launches == 0
    assert rel_err(fixed, free.double()) < 1e-5, seed
    assert torch.equal(fixed.argmax(-1), free.argmax(-1)), seed
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert torch.utils.deterministic.fill_uninitialized_memory
