import os

# Triton decorates its own standard library (tl.zeros, tl.sum, ...) when it is first imported, for the
# interpreter or for compilation as TRITON_INTERPRET says at that moment, and the interpreter cannot
# call compiled ones. Import it under the interpreter here, before any test module can import it
# through the package, so that test modules may later switch their kernels to the interpreter
# (tests/test_kernels.py re-decorates them); then unset the variable again, so that code choosing
# Triton on the CPU only under TRITON_INTERPRET (the engine) keeps its torch path in other tests.
_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
import triton  # noqa: E402,F401

if _interpret is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _interpret

import importlib  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def redecorate_kernels() -> None:
    """Decorate the MoE kernels again, for the interpreter while TRITON_INTERPRET is set: another
    test module may have imported them compiled. Submodules in dependency order; the package
    attribute `fused_moe` is the function, so they come from sys.modules."""
    for name in ("pdl", "routing", "fused_moe", "swap_moe", "launch", "reference"):
        importlib.reload(sys.modules[f"moegps.kernels.{name}"])
    importlib.reload(sys.modules["moegps.kernels"])

from moegps.paths import data_root


def assert_unspilled(cubin_b64: str, warps: int, stack_bytes: int = 0) -> None:
    """A kernel compiled for a GPU (its cubin, base64, as a compile script of `compiling_python`
    prints it) spills no registers, neither to the stack frame (beyond `stack_bytes`, for a spill
    measured not to cost) nor to local memory, and every thread of its block of `warps` gets its
    register count from the SM's 64k. Read with the cuobjdump that Triton ships (the test skips
    where it ships none)."""
    import base64
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("this Triton ships no cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(base64.b64decode(cubin_b64))
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    for field, allowed in (("STACK", stack_bytes), ("LOCAL", 0)):
        found = re.search(rf"{field}:(\d+)", usage)
        assert found and int(found.group(1)) <= allowed, usage
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    assert warps * 32 * registers <= 65536, (warps, registers)


@pytest.fixture
def rng():
    """Fresh random inputs each run (seed printed on failure by the assertion messages that use it)."""
    return np.random.default_rng()


@pytest.fixture(scope="session")
def shared():
    """The shared real data folder; CI must have it, elsewhere its absence skips."""
    root = data_root()
    if not (root / "mmlu").exists():
        if os.environ.get("CI"):
            pytest.fail(f"shared data missing at {root} (set MOEGPS_DATA)")
        pytest.skip(f"shared data not found at {root}")
    return root


@pytest.fixture
def compiling_python():
    """``run(script, *args) -> object``: a Python script run in a fresh interpreter without
    TRITON_INTERPRET, its last line of output read as JSON. For tests that compile kernels for a GPU
    on this machine: this process has run Triton's CPU interpreter, which leaves parts of
    triton.language patched for it (the code generator then fails), and Gluon refuses to import
    under it."""
    import json
    import subprocess
    import sys

    def run(script: str, *args: str):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run
