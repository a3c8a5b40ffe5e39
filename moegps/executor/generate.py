"""End-to-end generation with a Mixtral model's MoE blocks swapped for the moegps layer, and the benchmarks.

``swap_moe_blocks(model)`` replaces every ``MixtralSparseMoeBlock`` with :class:`MoEGPSBlock`: the
same router module (so routing hooks and the trace collector still see it), the same expert
tensors (no copy: HF's ``gate_up_proj [E, 2F, H]`` / ``down_proj [E, H, F]`` are the kernel's
layout), computed by the fused Triton kernel on GPU. Greedy generation must give the same tokens.

Benchmarks (``python -m moegps.executor.generate``), each against transformers in the same run:

- ``layer``: one MoE layer's decode latency (router + experts) at the Mixtral-8x7B and 64-expert
  shapes, against transformers' Mixtral block with its eager and ``grouped_mm`` experts, with and
  without CUDA graphs, and the weight-read floor from a copy bandwidth measured in the same run.
- ``generate``: greedy generation with the bundled model (or a random tiny Mixtral when it is
  absent, or ``--model PATH``): same tokens, per-token decode latency and throughput, and where
  the decode step's time goes (MoE blocks vs the rest, GPU-busy vs launch gaps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..files import markdown_table
from ..models.adapters import cache_argument
from ..shapes import from_name
from .dist import Comm
from .layer import expert_compute


class MoEGPSBlock(nn.Module):
    """Drop-in for ``MixtralSparseMoeBlock``: ``[B, S, H] -> [B, S, H]``.

    One rank: all experts local, one fused-kernel call. Several ranks (``comm``): expert parallel
    with every rank holding the same tokens (replicated attention); rank r holds experts
    ``r*E/G .. (r+1)*E/G - 1``, computes its experts' share and the shares are summed by all-reduce.
    """

    def __init__(self, block: nn.Module, comm: Comm | None = None):
        super().__init__()
        self.gate = block.gate  # the original router module (hooks on it keep working)
        experts = block.experts
        self.comm = comm or Comm()
        E = experts.gate_up_proj.shape[0]
        G, r = self.comm.world, self.comm.rank
        if E % G:
            raise ValueError(f"{E} experts do not split evenly over {G} ranks")
        self.first = r * (E // G)
        own = slice(self.first, self.first + E // G)
        # views, not copies, on one rank
        self.w_gate_up = experts.gate_up_proj.data[own]
        self.w_down = experts.down_proj.data[own]
        self.time_ms: list[torch.cuda.Event] | None = None  # set to [] to record (start, end) events

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self.time_ms is not None and x.is_cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        routed = self.gate(x)
        weights, ids = routed[-2], routed[-1]  # (logits, weights, ids) in transformers 5; (weights, ids) elsewhere
        if weights.shape[-1] != ids.shape[-1]:  # a dense [T, E] score matrix: keep the chosen experts' weights
            weights = weights.gather(-1, ids)
        weights = weights.to(x.dtype)
        if not self.comm.distributed:
            y = expert_compute(x, self.w_gate_up, self.w_down, ids, weights, dense=True)
        else:
            local = ids - self.first
            local = torch.where((local >= 0) & (local < self.w_gate_up.shape[0]), local, -1)
            y = expert_compute(x, self.w_gate_up, self.w_down, local, weights)
            dist.all_reduce(y, group=self.comm.group)
        if self.time_ms is not None and x.is_cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.time_ms.append((start, end))
        return y.reshape(shape)


def moe_blocks(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(parent, attribute)`` of every Mixtral-style sparse MoE block (has ``gate`` and ``experts.gate_up_proj``)."""
    found = []
    for module in model.modules():
        for name, child in module.named_children():
            if hasattr(child, "gate") and hasattr(getattr(child, "experts", None), "gate_up_proj"):
                found.append((module, name))
    return found


def swap_moe_blocks(model: nn.Module, comm: Comm | None = None) -> int:
    """Replace every MoE block of ``model`` in place by :class:`MoEGPSBlock`; returns how many."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no Mixtral-style MoE block (gate + experts.gate_up_proj) found")
    for parent, name in blocks:
        setattr(parent, name, MoEGPSBlock(getattr(parent, name), comm))
    return len(blocks)


def set_experts_implementation(model_or_config, name: str) -> None:
    """Choose transformers' experts implementation ('eager', 'grouped_mm', 'batched_mm') on a model or config."""
    if hasattr(model_or_config, "set_experts_implementation"):
        try:
            model_or_config.set_experts_implementation(name)
            return
        except Exception as e:  # older transformers 5.x: fall back to the config attribute
            print(f"set_experts_implementation({name!r}): {type(e).__name__}: {e}"[:200])
        model_or_config = model_or_config.config
    model_or_config._experts_implementation = name


def tiny_mixtral_config(**overrides):
    """A small random Mixtral config (tests, and the generation benchmark when no model is bundled)."""
    from transformers import MixtralConfig

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return MixtralConfig(**kw)


# ---- timing -----------------------------------------------------------------------------------------

def device_ms(fn, reps: int = 50, warmup: int = 5, graph: bool = False) -> float:
    """Median device time of ``fn()`` in ms (CUDA events per call; a captured graph's replay if ``graph``)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    call = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
            with torch.cuda.graph(g, stream=s):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        call = g.replay
        call()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        call()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (read + written), measured now on a 2 GiB buffer."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = device_ms(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() / (ms * 1e-3)


# ---- benchmark: one MoE layer's decode --------------------------------------------------------------

LAYER_COPIES = {"mixtral-8x7b": 2, "deepseek-v2-lite": 6}  # registry shapes (moegps.shapes) and their copies
LAYER_SHAPES = {name: dict(hidden=shape.hidden, ffn=shape.expert_ffn, n_experts=shape.n_experts, top_k=shape.top_k,
                           copies=copies)
                for name, copies in LAYER_COPIES.items() for shape in [from_name(name)]}


def bench_layer(shape: str, tokens=(1, 8, 32), dtype=torch.bfloat16, bandwidth: float | None = None) -> list[dict]:
    """Rows: per-layer decode latency of transformers (eager, grouped_mm) and moegps, eager and graphed.

    ``copies`` distinct layers are run in turn (each timed call runs all of them and reports the
    mean per layer), so that the weights of one are never still in L2 from its previous call.
    """
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    s = LAYER_SHAPES[shape]
    H, Fd, E, k, copies = s["hidden"], s["ffn"], s["n_experts"], s["top_k"], s["copies"]
    cfg = tiny_mixtral_config(hidden_size=H, intermediate_size=Fd, num_local_experts=E, num_experts_per_tok=k)
    torch.manual_seed(0)
    blocks = []
    for _ in range(copies):
        with torch.device("cuda"):
            b = MixtralSparseMoeBlock(cfg).to(dtype).eval()
        with torch.no_grad():
            b.gate.weight.normal_(0, H**-0.5)
            b.experts.gate_up_proj.normal_(0, H**-0.5)
            b.experts.down_proj.normal_(0, Fd**-0.5)
        blocks.append(b)
    ours = [MoEGPSBlock(b) for b in blocks]
    bandwidth = bandwidth or copy_bandwidth()
    rows = []
    for T in tokens:
        x = torch.randn(1, T, H, device="cuda", dtype=dtype)
        # distinct experts touched per layer: the floor reads each of them once
        with torch.no_grad():
            touched = [len(torch.unique(b.gate(x.view(-1, H))[2])) for b in blocks]
        floor_ms = statistics.mean(touched) * 3 * H * Fd * x.element_size() / bandwidth * 1e3
        cfg._experts_implementation = "eager"
        with torch.no_grad():
            ref = blocks[0](x).float()
        results = {}
        for impl in ("eager", "grouped_mm", "moegps"):
            if impl == "moegps":
                layers = ours
            else:
                cfg._experts_implementation = impl
                layers = blocks
            with torch.no_grad():
                out = layers[0](x).float()
                err = float((out - ref).norm() / ref.norm())

                def step():
                    for layer in layers:
                        layer(x)
                for graph in (False, True):
                    if graph and impl == "eager":  # its loop asks the host which experts were hit: no graph
                        continue
                    try:
                        ms = device_ms(step, graph=graph) / copies
                    except Exception as e:  # e.g. a host sync inside the implementation
                        ms, err = float("nan"), err
                        print(f"{shape} T={T} {impl} graph={graph}: {type(e).__name__}: {e}"[:300])
                    results[(impl, graph)] = ms
                    rows.append(dict(shape=shape, tokens=T, impl=impl, cuda_graph=graph, ms=ms, floor_ms=floor_ms,
                                     rel_err_vs_eager=err))
                    print(rows[-1], flush=True)
        best_hf = min(v for (impl, g), v in results.items() if impl != "moegps" and v == v)
        best_ours = min(v for (impl, g), v in results.items() if impl == "moegps" and v == v)
        for r in rows:
            if r["shape"] == shape and r["tokens"] == T:
                r["speedup_vs_best_hf"] = best_hf / r["ms"] if r["ms"] == r["ms"] else float("nan")
                r["best_moegps_vs_best_hf"] = best_hf / best_ours
    cfg._experts_implementation = "eager"
    del blocks, ours
    torch.cuda.empty_cache()
    return rows


# ---- benchmark: whole-model generation -------------------------------------------------------------

def load_model(path: str | None, dtype=torch.bfloat16, device="cuda"):
    """``(model, source)``: the checkpoint at ``path``, else the bundled mixtral-tiny, else a random tiny Mixtral."""
    from transformers import MixtralForCausalLM

    from ..paths import BUNDLED_MODELS

    candidates = [Path(path)] if path else [BUNDLED_MODELS / "mixtral-tiny"]
    for p in candidates:
        if (p / "config.json").exists():
            return MixtralForCausalLM.from_pretrained(p, dtype=dtype).to(device).eval(), str(p)
    if path:
        raise FileNotFoundError(f"{path}: no config.json (expected a transformers save_pretrained folder)")
    torch.manual_seed(0)
    cfg = tiny_mixtral_config(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    return MixtralForCausalLM(cfg).to(device, dtype).eval(), "random tiny Mixtral (bundled model absent)"


def _generate(model, ids, n_new):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, pad_token_id=0)


def same_tokens(tokens: torch.Tensor, reference: torch.Tensor, eos: int | list | None) -> bool:
    """Rows equal up to and including the reference's first EOS (``generate`` pads after EOS, a static loop does not)."""
    eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
    for row, ref in zip(tokens.tolist(), reference.tolist()):
        stop = next((i + 1 for i, t in enumerate(ref) if t in eos_ids), len(ref))
        if row[:stop] != ref[:stop]:
            return False
    return True


def wall_ms(fn, reps: int = 3, warmup: int = 0) -> float:
    """Median host wall time of ``fn()`` in ms, the device (where there is one) synchronised around each
    call: for work that syncs inside (``generate()``), where device events would miss the host's share,
    and for work on the CPU."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_generate(model_path: str | None = None, batch: int = 1, prompt_len: int = 32, n_new: int = 32,
                   dtype=torch.bfloat16) -> tuple[list[dict], dict]:
    """Per-token decode latency and throughput of plain transformers (eager, grouped_mm) vs moegps."""
    model, source = load_model(model_path, dtype)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=gen).cuda()
    rows, tokens = [], {}
    eos = model.generation_config.eos_token_id
    variants = ["eager", "grouped_mm", "moegps"]
    for variant in variants:
        if variant == "moegps":
            swap_moe_blocks(model)
        else:
            set_experts_implementation(model, variant)
        with torch.no_grad():
            tokens[variant] = _generate(model, ids, n_new)[:, prompt_len:].cpu()
            t_one = wall_ms(lambda: _generate(model, ids, 1))
            t_all = wall_ms(lambda: _generate(model, ids, n_new))
        per_token = (t_all - t_one) / (n_new - 1)
        rows.append(dict(model=source, variant=variant, batch=batch, prompt_len=prompt_len, new_tokens=n_new,
                         decode_ms_per_token=per_token, tokens_per_s=batch * n_new / (t_all * 1e-3),
                         same_tokens_as_eager=same_tokens(tokens[variant], tokens["eager"], eos)))
        print(rows[-1], flush=True)
        # CUDA graphs: a static cache and one captured graph per decode step (eager experts cannot be captured)
        if variant != "eager":
            try:
                banned = [eos] if isinstance(eos, int) else list(eos or [])  # generate(min_new_tokens) bans EOS too
                static_decode(model, ids, 4, graph=True, suppress=banned)  # warm-up (compiles, allocates)
                toks, ms = static_decode(model, ids, n_new, graph=True, suppress=banned)
                rows.append(dict(model=source, variant=variant + "+cuda_graph", batch=batch, prompt_len=prompt_len,
                                 new_tokens=n_new, decode_ms_per_token=ms, tokens_per_s=batch * 1e3 / ms,
                                 same_tokens_as_eager=same_tokens(toks.cpu(), tokens["eager"], eos)))
                print(rows[-1], flush=True)
            except Exception as e:
                print(f"{variant}+cuda_graph: {type(e).__name__}: {e}"[:400], flush=True)
    breakdown = decode_breakdown(model, ids, n_new)
    breakdown["model"] = source
    return rows, breakdown


def static_decode(model, ids: torch.Tensor, n_new: int, graph: bool = False,
                  suppress: list[int] | None = None) -> tuple[torch.Tensor, float]:
    """Greedy decoding with a static KV cache, optionally one CUDA graph per decode step.

    ``ids [B, P]`` -> ``(new tokens [B, n_new], ms per decode token)``; the time covers the
    ``n_new - 1`` decode steps after the prefill (each: one graph replay, or one eager forward).
    ``suppress``: token ids never chosen (EOS, as ``generate(min_new_tokens=n_new)`` does).
    """
    from transformers import StaticCache

    B, P = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=P + n_new)
    cuda = ids.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        name = cache_argument(model)
        logits = model(input_ids=ids, cache_position=torch.arange(P, device=ids.device), use_cache=True,
                       **{name: cache}).logits
        banned = torch.as_tensor(suppress or [], dtype=torch.long, device=ids.device)

        def pick(last_logits):
            if banned.numel():
                last_logits = last_logits.index_fill(-1, banned, float("-inf"))
            return last_logits.argmax(-1, keepdim=True)

        token = pick(logits[:, -1])  # [B, 1], the static input of every step
        position = torch.tensor([P], device=ids.device)

        def step():
            out = model(input_ids=token, cache_position=position, use_cache=True, **{name: cache}).logits
            return pick(out[:, -1])

        replay = step
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up writes the same K/V at position P as the real first step
                step()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=side):
                    graphed_out = step()
            torch.cuda.current_stream().wait_stream(side)

            def replay():
                g.replay()
                return graphed_out
        new = [token.clone()]
        sync()
        t0 = time.perf_counter()
        for _ in range(n_new - 1):
            nxt = replay()
            token.copy_(nxt)
            position += 1
            new.append(nxt.clone())
        sync()
        ms = (time.perf_counter() - t0) * 1e3 / max(n_new - 1, 1)
    return torch.cat(new, dim=1), ms


def decode_breakdown(model, ids, n_new) -> dict:
    """Where a moegps decode step's time goes: MoE blocks (events), the rest, and GPU-busy vs launch gaps."""
    blocks = [m for m in model.modules() if isinstance(m, MoEGPSBlock)]
    with torch.no_grad():
        for b in blocks:
            b.time_ms = []
        t_one = wall_ms(lambda: _generate(model, ids, 1), reps=1)
        n_one = len(blocks[0].time_ms)
        t_all = wall_ms(lambda: _generate(model, ids, n_new), reps=1)
        torch.cuda.synchronize()
        decode_moe = sum(a.elapsed_time(b) for blk in blocks for a, b in blk.time_ms[2 * n_one:])
        for b in blocks:
            b.time_ms = None
        gpu_busy = float("nan")
        try:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                _generate(model, ids, n_new)
                torch.cuda.synchronize()
            from torch.autograd import DeviceType

            kernel_us = sum(e.device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA)
            gpu_busy = kernel_us / 1e3 / n_new
        except Exception as e:  # profiler unavailable: leave NaN
            print(f"profiler: {type(e).__name__}: {e}"[:200])
    step = (t_all - t_one) / (n_new - 1)
    moe = decode_moe / (n_new - 1)
    return dict(decode_step_ms=step, moe_blocks_ms=moe, rest_ms=step - moe,
                gpu_kernel_ms_per_token=gpu_busy, launch_and_host_ms=step - gpu_busy if gpu_busy == gpu_busy else None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["layer", "generate", "all"], default="all")
    ap.add_argument("--shapes", default="mixtral-8x7b,deepseek-v2-lite")
    ap.add_argument("--tokens", default="1,8,32", help="decode batch sizes for the layer benchmark")
    ap.add_argument("--model", default=None, help="Mixtral checkpoint folder (default: the bundled model)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="results/executor_bench")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    report = [f"device: {device}; torch {torch.__version__}"]
    if args.mode in ("layer", "all"):
        bw = copy_bandwidth()
        report.append(f"copy bandwidth (read+write): {bw / 1e12:.2f} TB/s")
        rows = []
        for shape in args.shapes.split(","):
            rows += bench_layer(shape, tuple(int(t) for t in args.tokens.split(",")), bandwidth=bw)
        (out / "layer_decode.json").write_text(json.dumps(rows, indent=1))
        report += ["", "## MoE layer decode latency (per layer, ms)", markdown_table(rows)]
    if args.mode in ("generate", "all"):
        rows, breakdown = bench_generate(args.model, args.batch, n_new=args.new_tokens)
        (out / "generate.json").write_text(json.dumps(dict(rows=rows, breakdown=breakdown), indent=1))
        report += ["", "## Generation (greedy)", markdown_table(rows), "", "## moegps decode step breakdown (ms/token)",
                   markdown_table([breakdown])]
    text = "\n".join(report)
    (out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
