"""Programmatic dependent launch (moegps/kernels/pdl.py) on the CPU: kernels compiled for sm_90 with
and without it. The launches themselves need a Hopper GPU: linear_probe.py and the engine
benchmark compare outputs and times with MOEGPS_PDL=0 and 1 there."""

import torch

from moegps.kernels import pdl

# Compiled in a fresh interpreter (conftest.py's compiling_python).
SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moegps.engine.kernels import _skinny_linear_kernel
from moegps.kernels.fused_moe import combine_kernel

cases = {
    "linear": (_skinny_linear_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "T": "i32",
                                       "N": "i32", "K": "i32", "BLOCK_T": "constexpr", "BLOCK_N": "constexpr",
                                       "BLOCK_K": "constexpr", "IEEE": "constexpr", "PDL": "constexpr"},
               {"BLOCK_T": 16, "BLOCK_N": 16, "BLOCK_K": 256, "IEEE": False}),
    "combine": (combine_kernel, {"y_ptr": "*bf16", "slot_ptr": "*i32", "out_ptr": "*bf16", "H": "i32",
                                 "TOP_K": "constexpr", "BLOCK_H": "constexpr", "GATHER": "constexpr",
                                 "PDL": "constexpr"},
                {"TOP_K": 2, "BLOCK_H": 1024, "GATHER": True}),
}
ptx = {}
for name, (kernel, signature, constexprs) in cases.items():
    for flag in (False, True):
        source = ASTSource(kernel, signature=signature, constexprs={**constexprs, "PDL": flag})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        ptx[f"{name} {flag}"] = compiled.asm["ptx"]
print(json.dumps(ptx))
"""


def test_kernels_wait_for_their_predecessor_before_any_load(compiling_python):
    """With PDL the kernel waits before its first load and never releases its successor early;
    without it, neither."""
    ptx = compiling_python(SCRIPT)
    for name in ("linear", "combine"):
        assert "griddepcontrol" not in ptx[f"{name} False"], name
        code = ptx[f"{name} True"]
        first_load = min(i for i in (code.find("ld.global"), code.find("cp.async")) if i >= 0)
        assert 0 <= code.find("griddepcontrol.wait") < first_load, name
        assert "launch_dependents" not in code, name


def test_no_pdl_off_the_gpu(monkeypatch):
    monkeypatch.setenv("MOEGPS_PDL", "1")
    assert pdl.launch_flags(torch.zeros(2)) == {} and not pdl.enabled(torch.zeros(2))
