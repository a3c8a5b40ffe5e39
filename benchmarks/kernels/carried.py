"""wgmma_swap's one-MMA kernels compiled here by Triton >= 3.9 and run on a GPU machine whose Triton is older.

    python benchmarks/kernels/carried.py carry/one       # here: compile for sm_90, write the files
    (then, on the GPU machine) carried.install("carry/one") before the kernels are called
    (swap_probe.py --cubins carry/one does it), or for any module with a main(argv):
    python benchmarks/kernels/carried.py carry/one --run moegps.engine.bench --parts ttft ...

Why: the `one` variant's MMAs are inline PTX on shared buffers' addresses (`gl.inline_asm`, Triton
3.9's Gluon); the lent H200 has Triton 3.6 and no registry, and a 3.9 wheel (286 MB) is over what a
device call can carry. A compiled kernel is a cubin and a metadata file; 3.6's CompiledKernel loads
one from those files and builds its launcher from the kernel's signature and that metadata (the
TMA descriptors' boxes, the shared memory). The kernel-parameter ABI is the same in both releases
(each descriptor a 128-byte CUtensorMap, its sizes and strides, then the arguments, then two
scratch pointers); 3.9's ptxas is CUDA 12.9's, which the H200's driver runs (NOTES.md session 17).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
from pathlib import Path
from types import SimpleNamespace

from moegps.kernels import wgmma_moe, wgmma_swap

# (GATE_UP, STAGES, BLOCK_K, PAD, BLOCK_M) of the kernels carried, all with ONE: the table's
# entries (six stages of 32 columns, blocks of up to 160 or 192 rows), three stages of 64 columns
# (NOTES.md v39) and four, packed (v40)
VARIANTS = [(gate_up, stages, block_k, pad, block_m) for gate_up in (True, False)
            for stages, block_k, pad, block_m in ((6, 32, 64, 192), (6, 32, 32, 192), (6, 32, 32, 160),
                                                   (3, 64, 32, 192), (4, 64, 32, 160), (4, 64, 32, 192))]


def folder_name(gate_up: bool, stages: int, block_k: int, pad: int, block_m: int) -> str:
    return f"{int(gate_up)}-{stages}x{block_k}-{pad}-{block_m}"


def _constants(gate_up: bool, stages: int, pad: int, block_m: int) -> dict:
    return {"GATE_UP": gate_up, "STAGES": stages, "DYNAMIC": True, "PAD": pad, "ONE": True,
            "BLOCK_M": block_m}


def compile_all(out: Path) -> None:
    """Each variant compiled for sm_90 into out/<variant>/ (cubin, json)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    for gate_up, stages, block_k, pad, block_m in VARIANTS:
        source = GluonASTSource(wgmma_swap.grouped_gemm_kernel, signature=wgmma_swap.compile_signature(block_k),
                                constexprs=_constants(gate_up, stages, pad, block_m))
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 4, "maxnreg": wgmma_moe.MAX_REGISTERS})
        folder = out / folder_name(gate_up, stages, block_k, pad, block_m)
        folder.mkdir(parents=True, exist_ok=True)
        for name, path in kernel.metadata_group.items():
            if name.endswith((".json", ".cubin")):
                shutil.copy(path, folder / name)
        print(folder, kernel.metadata.shared, "bytes of shared memory")


class Carried:
    """Stands for wgmma_swap.grouped_gemm_kernel: kernel[grid](*args, ..., ONE=True) runs the carried
    variant of those constexprs; without ONE, the kernel as this Triton compiles it."""

    def __init__(self, folder: Path, jit_kernel):
        from triton.compiler.compiler import CompiledKernel

        self.jit_kernel = jit_kernel
        self.kernels = {}
        for gate_up, stages, block_k, pad, block_m in VARIANTS:
            files = folder / folder_name(gate_up, stages, block_k, pad, block_m)
            # (3.6's launcher reads each descriptor's dtype and box from the signature, not its layout)
            signature = wgmma_swap.compile_signature(block_k)
            src = SimpleNamespace(signature=signature, constants=_constants(gate_up, stages, pad, block_m),
                                  fn=SimpleNamespace(arg_names=list(signature)))
            group = {p.name: str(p) for p in files.iterdir()}
            self.kernels[gate_up, stages, block_k, pad, block_m] = CompiledKernel(src, group, files.name)

    def __getitem__(self, grid):
        def run(*args, GATE_UP, STAGES, DYNAMIC, PAD, ONE=False, BLOCK_M=192, **options):
            if not ONE:
                return self.jit_kernel[grid](*args, GATE_UP=GATE_UP, STAGES=STAGES, DYNAMIC=DYNAMIC,
                                             PAD=PAD, ONE=False, BLOCK_M=BLOCK_M, **options)
            kernel = self.kernels[GATE_UP, STAGES, args[0].block_shape[1], PAD, BLOCK_M]
            kernel[(grid[0], 1, 1)](*args, GATE_UP, STAGES, DYNAMIC, PAD, ONE, BLOCK_M)
        return run


def install(folder: str | Path) -> None:
    """Make wgmma_swap run its one-MMA variants from the kernels compiled into folder."""
    if wgmma_swap.HAVE_ONE:  # this Triton compiles them itself
        return
    wgmma_swap.grouped_gemm_kernel = Carried(Path(folder), wgmma_swap.grouped_gemm_kernel)
    wgmma_swap.HAVE_ONE = True  # check_config and get_config take the one-MMA entries


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path, help="where the compiled kernels go (or, with --run, are)")
    parser.add_argument("--run", metavar="MODULE",
                        help="install the kernels in folder, then run MODULE's main with the other arguments")
    args, rest = parser.parse_known_args()
    if args.run:
        install(args.folder)
        importlib.import_module(args.run).main(rest)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        compile_all(args.folder)
