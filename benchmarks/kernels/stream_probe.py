"""How fast the weights stream into shared memory, by the shape of each copy: a GPU probe.

The memory-bound MoE GEMMs (Mixtral at 512 tokens: 128 +- 11 rows an expert) stream every weight
once, yet read 82-87% of the copy rate where cuBLAS's batched GEMM reads 90-95% and a plain read
97% (NOTES.md, sessions 16-18). The swap kernels copy a tile's 256 weight rows 32 columns (64
bytes a row) a K step; cuBLAS's 256x128_64x4 copies 64 (128 bytes a row). Whether the bytes a row
a copy set the DRAM's rate is what this measures, without the MMAs: a Triton kernel whose
programs each stream whole tiles of [BLOCK_R weight rows, K] through TMA boxes of [BLOCK_R,
BLOCK_K] in a ring of STAGES (Triton's software pipeline), adding each box into registers so
nothing is dropped; with --tokens, each K step also copies a box of that many token rows (the
GEMM's other operand, from L2) as the kernels do.

    python benchmarks/kernels/stream_probe.py [--shapes mixtral-8x7b] [--tokens 0 128]

prints, per weight matrix (gate/up [E * 2F, H] and down [E * H, F]) and box, the median time, the
rate (weight bytes / time), its share of the copy rate measured in the same rounds (bench's
ceiling: a 1 GiB copy, 2 GiB moved) and the time against the first box of the list (the swap kernels'
256 x 32). GPU only (TMA); Triton >= 3.4.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from moegps.kernels.bench import ceiling_runs, rates
from moegps.kernels.tune import expert_dims
from moegps.kernels.timing import gpu_clocks, time_many

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton < 3.4
    TensorDescriptor = None

# (rows, columns, stages): the swap kernels' box first (the ratio's baseline), then wider rows
BOXES = ((256, 32, 6), (256, 32, 8), (256, 64, 3), (256, 64, 4), (128, 64, 4), (128, 64, 6),
         (128, 128, 3), (64, 128, 4), (256, 128, 3))


@triton.jit
def stream_kernel(w_desc, t_desc, out_ptr, n_tiles, k_dim, rows_per_expert,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, TOKENS: tl.constexpr,
                  STAGES: tl.constexpr):
    """Programs stride over the tiles (BLOCK_R weight rows each); each streams its tile's rows over K
    in [BLOCK_R, BLOCK_K] boxes (and, TOKENS > 0, a [TOKENS, BLOCK_K] box of its expert's token
    rows a step), summed in fp32 registers; out[program] gets the sum, so no copy is dead."""
    pid = tl.program_id(0)
    total = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    if TOKENS > 0:
        total_t = tl.zeros([TOKENS, BLOCK_K], tl.float32)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        row = tile * BLOCK_R
        expert = row // rows_per_expert
        for k in tl.range(0, k_dim, BLOCK_K, num_stages=STAGES):
            total += w_desc.load([row, k]).to(tl.float32)
            if TOKENS > 0:
                total_t += t_desc.load([expert * TOKENS, k]).to(tl.float32)
    result = tl.sum(tl.sum(total, 1), 0)
    if TOKENS > 0:
        result += tl.sum(tl.sum(total_t, 1), 0)
    tl.store(out_ptr + pid, result)


def stream(w: torch.Tensor, tokens: torch.Tensor | None, rows_per_expert: int, box: tuple,
           programs: int, out: torch.Tensor):
    """A callable running stream_kernel over w [E * rows_per_expert, K] with box (rows, cols,
    stages); tokens [E * T, K] (T token rows an expert) or None."""
    block_r, block_k, stages = box
    n_tiles = w.shape[0] // block_r
    w_desc = TensorDescriptor.from_tensor(w, [block_r, block_k])
    n_tok = 0 if tokens is None else tokens.shape[0] // (w.shape[0] // rows_per_expert)
    t_desc = w_desc if tokens is None else TensorDescriptor.from_tensor(tokens, [n_tok, block_k])
    grid = (min(programs, n_tiles),)

    def run():
        stream_kernel[grid](w_desc, t_desc, out, n_tiles, w.shape[1], rows_per_expert,
                            BLOCK_R=block_r, BLOCK_K=block_k, TOKENS=n_tok, STAGES=stages,
                            num_warps=8)
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["mixtral-8x7b"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[0, 128],
                        help="token rows copied beside each weight box (0: weights alone)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    for n_tok in args.tokens:  # (a tensor's dimension in the kernel: a power of two)
        if n_tok < 0 or (n_tok and n_tok & (n_tok - 1)):
            parser.error(f"--tokens: each value must be 0 or a power of two, got {n_tok}")
    if TensorDescriptor is None or not torch.cuda.is_available():
        print("stream_probe needs a GPU and Triton >= 3.4 (TMA descriptors)")
        return 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(sms, dtype=torch.float32, device="cuda")
    rows = []
    for name in args.shapes:
        E, H, F, _ = expert_dims(name)
        for gemm, (r_expert, k_dim) in (("gate_up", (2 * F, H)), ("down", (H, F))):
            w = torch.randn(E * r_expert, k_dim, dtype=torch.bfloat16, device="cuda")
            for n_tok in args.tokens:
                tokens = (torch.randn(E * n_tok, k_dim, dtype=torch.bfloat16, device="cuda")
                          if n_tok else None)
                runs = {}
                for b in BOXES:
                    run = stream(w, tokens, r_expert, b, sms, out)
                    try:  # (a ring that does not fit in shared memory does not compile)
                        run()
                    except Exception as exc:
                        print(f"  {b}: not run ({type(exc).__name__}: {str(exc)[:80]})")
                        continue
                    runs[f"{b[0]}x{b[1]}x{b[2]}"] = run
                ceiling = ceiling_runs()
                with gpu_clocks() as clocks:
                    times = time_many({**ceiling, **runs}, graph=set(runs))
                copy_bps = rates(times)["copy_Bps"]
                base = times[next(iter(runs))]
                print(f"{name} {gemm} [{E} x {r_expert}, {k_dim}] ({w.numel() * 2 / 1e9:.2f} GB), "
                      f"{n_tok} token rows a step; copy {copy_bps / 1e12:.2f} TB/s, SM "
                      f"{clocks['sm_MHz']:.0f} MHz")
                for box, us in ((b, times[b]) for b in runs):
                    rate = w.numel() * 2 / (us * 1e-6)
                    row = {"shape": name, "gemm": gemm, "tokens": n_tok, "box": box, "us": us,
                           "TBps": rate / 1e12, "pct_copy": 100 * rate / copy_bps,
                           "vs_first": base / us, **clocks}
                    rows.append(row)
                    print(f"  {box:>10}: {us:8.1f} us  {row['TBps']:.2f} TB/s  "
                          f"{row['pct_copy']:5.1f}% of copy  {row['vs_first']:.3f}x")
                del tokens
            del w
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
