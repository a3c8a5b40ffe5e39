"""Live demo: type a prompt, watch the model answer, its speed, and which experts each layer uses.

    python -m moegps.demo                      # the bundled model, interactive
    python -m moegps.demo --prompt "..."       # one prompt, then exit
    python -m moegps.demo --model PATH_OR_HUB_ID --device cuda --dtype bfloat16

For every prompt the model generates greedily twice: once as plain transformers, once with its MoE
blocks swapped for moegps's layer (fused Triton kernels on a GPU, the torch reference on a CPU; see
``moegps.executor.generate``). The screen shows the answer as it streams, tokens per second of both
paths, whether they produced the same tokens, and a heat map of expert load per layer (share of
this answer's top-k selections) updated every token. It runs on a CPU as well as a GPU.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .models.adapters import find_routers, routing_from_output
from .paths import BUNDLED_MODELS

# background colours from cold to hot for the heat map (share of a layer's selections)
_HEAT = ["grey15", "navy_blue", "blue3", "dodger_blue2", "green3", "yellow3", "dark_orange", "red1"]


@dataclass
class LiveStats:
    """What the screen shows; updated by the generation loop."""

    n_layers: int
    n_experts: int
    counts: np.ndarray = None  # [layer, expert] selections during decode of this answer
    answer: str = ""
    tokens: int = 0
    speeds: dict[str, float] = field(default_factory=dict)  # path -> tokens/s
    note: str = ""

    def __post_init__(self):
        self.counts = np.zeros((self.n_layers, self.n_experts), dtype=np.int64)


def render(stats: LiveStats, prompt: str) -> Group:
    speed = Table.grid(padding=(0, 2))
    for path, tps in stats.speeds.items():
        speed.add_row(Text(path, style="bold"), Text(f"{tps:8.1f} tokens/s"))
    heat = Table(title="expert load per layer (share of this answer's selections)", box=None, pad_edge=False)
    heat.add_column("layer", justify="right")
    for e in range(stats.n_experts):
        heat.add_column(str(e) if stats.n_experts <= 16 else ("" if e % 8 else str(e)), justify="center")
    heat.add_column("max/mean", justify="right")
    for layer in range(stats.n_layers):
        row = stats.counts[layer]
        total = row.sum()
        share = row / total if total else np.zeros_like(row, dtype=float)
        cells = []
        for s in share:  # colour by share relative to an even split (1/n_experts)
            level = min(len(_HEAT) - 1, int(s * stats.n_experts * 2))
            cells.append(Text(f"{100 * s:3.0f}" if stats.n_experts <= 16 else " ", style=f"on {_HEAT[level]}"))
        imbalance = row.max() / row.mean() if total else 0.0
        heat.add_row(str(layer), *cells, f"{imbalance:.2f}")
    body = Text(stats.answer or "…", style="white")
    return Group(
        Panel(Text(prompt, style="cyan"), title="prompt"),
        Panel(body, title=f"answer ({stats.tokens} tokens)"),
        speed,
        heat,
        Text(stats.note, style="dim"),
    )


class ExpertCounter:
    """Forward hooks on every MoE router that add each decode token's top-k experts to ``stats.counts``."""

    def __init__(self, model, stats: LiveStats):
        self.stats = stats
        self.enabled = False
        self.handles = [r.module.register_forward_hook(self._hook(r)) for r in find_routers(model)]

    def _hook(self, router):
        def hook(module, inputs, output):
            if self.enabled:
                experts, _ = routing_from_output(output, router.top_k, router.name)
                np.add.at(self.stats.counts[router.index], experts.reshape(-1).cpu().numpy(), 1)

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def stream_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int, on_token=None) -> tuple[list[int], float]:
    """Greedy decode with the KV cache; returns ``(new token ids, decode tokens per second)``.

    ``on_token(token_id)`` is called after each token (the display updates there). Tokens per
    second count decode steps only (the prefill is excluded), synchronising a GPU before timing.
    """
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([prompt_ids], device=device)
    out = model(input_ids=ids, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1)
    generated: list[int] = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(max_new_tokens):
        generated.append(int(token))
        if on_token:
            on_token(generated[-1])
        if generated[-1] == eos_id:
            break
        out = model(input_ids=token[:, None], past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return generated, (len(generated) - 1) / elapsed if len(generated) > 1 and elapsed > 0 else 0.0


def load(model_path: str, device: str, dtype: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
    return model


def moegps_variant(model):
    """The same model with moegps's MoE layer swapped in, or ``(None, reason)`` when unavailable."""
    try:
        from .executor.generate import swap_moe_blocks
    except ImportError as e:  # the executor is optional for the demo
        return None, f"moegps path unavailable ({e})"
    import copy

    try:
        fast = copy.deepcopy(model)
        swap_moe_blocks(fast)  # in place
        return fast, ""
    except Exception as e:  # show why rather than crash the demo
        return None, f"moegps path unavailable ({type(e).__name__}: {e})"


def answer(prompt: str, model, fast_model, tokenizer, console: Console, max_new_tokens: int, refresh: bool = True):
    cfg = model.config
    n_layers = len(find_routers(model))
    stats = LiveStats(n_layers=n_layers, n_experts=cfg.num_local_experts if hasattr(cfg, "num_local_experts") else cfg.num_experts)
    prompt_ids = tokenizer.encode(prompt)
    counter = ExpertCounter(model, stats)
    with Live(render(stats, prompt), console=console, refresh_per_second=8, auto_refresh=refresh) as live:
        def on_token(token_id):
            stats.tokens += 1
            stats.answer = tokenizer.decode(generated_so_far + [token_id])
            generated_so_far.append(token_id)
            live.update(render(stats, prompt))

        generated_so_far: list[int] = []
        counter.enabled = True
        plain_ids, plain_tps = stream_greedy(model, prompt_ids, max_new_tokens, tokenizer.eos_id, on_token)
        counter.enabled = False
        stats.speeds["transformers"] = plain_tps
        live.update(render(stats, prompt))
        if fast_model is not None:
            fast_ids, fast_tps = stream_greedy(fast_model, prompt_ids, max_new_tokens, tokenizer.eos_id)
            stats.speeds["moegps"] = fast_tps
            same = "same tokens" if fast_ids == plain_ids else "DIFFERENT tokens"
            stats.note = f"moegps vs transformers: {fast_tps / max(plain_tps, 1e-9):.2f}x, {same}"
        live.update(render(stats, prompt))
    counter.remove()
    return stats


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(BUNDLED_MODELS / "mixtral-tiny"), help="local path or hub id")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--prompt", help="answer this prompt and exit (default: ask interactively)")
    ap.add_argument("--no-moegps", action="store_true", help="plain transformers only")
    args = ap.parse_args(argv)

    from .models.tokenizer import mixtral_tokenizer

    console = Console()
    console.print(f"[bold]moegps demo[/] loading {args.model} on {args.device} ({args.dtype}) …")
    model = load(args.model, args.device, args.dtype)
    fast_model, why = (None, "moegps path off (--no-moegps)") if args.no_moegps else moegps_variant(model)
    if why:
        console.print(f"[yellow]{why}[/]")
    tokenizer = mixtral_tokenizer()
    prompts = [args.prompt] if args.prompt else None
    while True:
        if prompts is not None:
            if not prompts:
                break
            prompt = prompts.pop()
        else:
            try:
                prompt = console.input("[bold green]prompt>[/] ").strip()
            except (EOFError, KeyboardInterrupt):
                break
            if prompt in ("", "exit", "quit"):
                if prompt == "":
                    continue
                break
        answer(prompt, model, fast_model, tokenizer, console, args.max_new_tokens)
    console.print("bye")


if __name__ == "__main__":
    main()
