"""Live demo: type a prompt, watch transformers and the moegps engine answer it, their speed against
the hardware floor, and which experts each layer uses.

    python -m moegps.demo                                  # the bundled model, interactive
    python -m moegps.demo --prompt "..."                   # one prompt, then exit
    python -m moegps.demo --model PATH --device cuda       # a Mixtral checkpoint folder
    python -m moegps.demo --shape mixtral-8x7b             # GPU: the real-size shape, random bf16 weights

Every prompt is answered greedily twice: by plain transformers (its own KV cache) and by the
moegps engine (``moegps.engine``: fused kernels and one CUDA graph per step on a GPU, its torch
path on a CPU), on the same weights (the engine takes views of the transformers model's tensors).
Both are warmed up once at start and timed the same way: each decode step from just before the
call to just after the device has finished (a sync on either side), the screen's updates and the
prefill outside that time. The screen shows both answers as they stream, each path's tokens/s and
its share of the floor (the bytes a batch-1 decode step must read: every non-expert weight, the
top-k experts of each MoE layer, lm_head and the KV cache, over the device's copy rate measured at
start; on a CPU that rate is a memcpy's), whether the two produced the same tokens, and a heat map
of the engine's expert choices per layer during this answer.

``--shape NAME`` (GPU) builds a shape-only model of that name (``moegps.shapes``) with random bf16
weights on the device: the engine alone runs it (a transformers copy would not fit beside it), at
real speed, and its text is labelled as noise.

Ctrl-C during an answer ends that answer (what was generated stays on screen) and returns to the
prompt; Ctrl-C at the prompt ends the demo with exit code 130.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .configs import EXIT_INTERRUPTED
from .engine.generate import Engine, build_model
from .executor.generate import copy_bandwidth
from .engine.model import Model, from_transformers, prefill, weight_bytes_per_step
from .models.adapters import cache_argument
from .models.tokenizer import mixtral_tokenizer
from .paths import BUNDLED_MODELS
from .shapes import SHAPES

# background colours from cold to hot for the heat map (share of a layer's selections)
_HEAT = ["grey15", "navy_blue", "blue3", "dodger_blue2", "green3", "yellow3", "dark_orange", "red1"]
TRANSFORMERS, ENGINE = "transformers", "moegps engine"


# ---- the floor -------------------------------------------------------------------------------------

def copy_rate(device: torch.device, nbytes: int = 1 << 26, reps: int = 5) -> float:
    """Bytes per second of a device-to-same-device copy, read + written: on a GPU the engine
    benchmark's own measurement (executor's copy_bandwidth, device events), on a CPU the median
    of ``reps`` host-timed copies of ``nbytes``."""
    if device.type == "cuda":
        return copy_bandwidth()
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / float(np.median(times[1:]))


def step_bytes(model: Model, context: int) -> float:
    """Bytes a batch-1 decode step reads at ``context`` cached positions: every layer's attention,
    norm, router and shared/dense MLP weights, its top-k routed experts (one token picks k distinct
    ones), the final norm, lm_head, one embedding row, and K and V of ``context`` positions."""
    S = model.shape
    weights = weight_bytes_per_step(model, [S.top_k] * len(model.layers))
    kv = 2 * S.n_layers * S.n_kv_heads * S.head_dim * model.embed.element_size()
    return weights + model.embed[0].nbytes + context * kv


# ---- one path's greedy decode, timed -------------------------------------------------------------------

def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed_decode(step: Callable, first, max_new_tokens: int, eos_id: int, on_token: Callable,
                 sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> tuple[list[int], float]:
    """Greedy decode from the prefill's token ``first``: ``step(previous token) -> next token`` (a
    0-d tensor) until ``max_new_tokens`` tokens or ``eos_id``. Returns ``(tokens, seconds)`` where
    seconds count only the steps, each from a sync before the call to a sync after it;
    ``on_token(tokens so far, seconds so far)`` runs after each token, outside the timed region."""
    tokens, seconds, token = [int(first)], 0.0, first
    on_token(tokens, seconds)
    while len(tokens) < max_new_tokens and tokens[-1] != eos_id:
        sync()
        start = clock()
        token = step(token)
        sync()
        seconds += clock() - start
        tokens.append(int(token))
        on_token(tokens, seconds)
    return tokens, seconds


def transformers_stepper(hf, prompt: list[int]):
    """transformers' prefill with its KV cache: ``(first token, step)``."""
    device = hf.get_input_embeddings().weight.device
    name = cache_argument(hf)
    with torch.inference_mode():
        out = hf(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    state = {"cache": out[name]}

    def step(previous):
        with torch.inference_mode():
            out = hf(input_ids=previous.view(1, 1), use_cache=True, **{name: state["cache"]})
        state["cache"] = out[name]
        return out.logits[0, -1].argmax()

    return out.logits[0, -1].argmax(), step


def engine_stepper(engine: Engine, prompt: list[int]):
    """The engine's prefill into cache slot 0, then its (graphed) batch-1 decode step: ``(first, step)``.
    The routing counts start at zero after the prefill (the heat map shows the answer's tokens)."""
    model = engine.model
    with torch.inference_mode():
        first = prefill(model, engine.cache, [torch.tensor(prompt)])[0].argmax()
        if model.routing_counts is not None:
            model.routing_counts.zero_()
        engine.tokens.zero_()
        engine.positions.zero_()
        engine.tokens[0] = first
        engine.positions[0] = len(prompt)
    run = engine.step(1)

    def step(previous):
        with torch.inference_mode():
            token = run()[0].argmax()
            engine.tokens[0] = token
            engine.positions[0] += 1
        return token

    return first, step


# ---- what the screen shows ------------------------------------------------------------------------------

@dataclass
class PathStats:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    seconds: float = 0.0       # in decode steps (timed_decode)
    floor_seconds: float = 0.0  # the same steps at the copy rate (step_bytes)
    ttft_ms: float = 0.0
    done: bool = False

    @property
    def tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.seconds if self.seconds > 0 else 0.0

    @property
    def floor_share(self) -> float:
        return self.floor_seconds / self.seconds if self.seconds > 0 else 0.0


@dataclass
class AnswerStats:
    prompt: str
    moe_layers: list[int]
    n_experts: int
    paths: dict[str, PathStats] = field(default_factory=dict)
    counts: np.ndarray = None  # [MoE layer, expert] the engine's selections during this answer's decode
    interrupted: bool = False
    note: str = ""

    def __post_init__(self):
        self.counts = np.zeros((len(self.moe_layers), self.n_experts), dtype=np.int64)


def _heat_map(stats: AnswerStats) -> Table:
    E = stats.n_experts
    heat = Table(title=f"{ENGINE}: expert load per layer (share of this answer's selections)", box=None,
                 pad_edge=False)
    heat.add_column("layer", justify="right")
    for e in range(E):
        heat.add_column(str(e) if E <= 16 else ("" if e % 8 else str(e)), justify="center")
    heat.add_column("max/mean", justify="right")
    for layer, row in zip(stats.moe_layers, stats.counts):
        total = row.sum()
        share = row / total if total else np.zeros(E)
        cells = [Text(f"{100 * s:3.0f}" if E <= 16 else " ", style=f"on {_HEAT[min(len(_HEAT) - 1, int(s * E * 2))]}")
                 for s in share]  # coloured by share against an even split (1/E)
        heat.add_row(str(layer), *cells, f"{row.max() / row.mean():.2f}" if total else "-")
    return heat


def render(stats: AnswerStats, session: "Session") -> Group:
    parts = [Panel(Text(stats.prompt, style="cyan"), title="prompt")]
    for name, path in stats.paths.items():
        label = f"{name} ({len(path.tokens)} tokens)"
        if name == ENGINE and session.random_weights:
            label += " [random weights: the text is noise]"
        parts.append(Panel(Text(path.text or "…"), title=Text(label)))  # Text: brackets are not markup
    speed = Table(box=None, pad_edge=False)
    for column in ("path", "tokens/s", "ms/step", "of floor", "first token"):
        speed.add_column(column, justify="left" if column == "path" else "right")
    for name, path in stats.paths.items():
        ms = 1e3 * path.seconds / (len(path.tokens) - 1) if len(path.tokens) > 1 else 0.0
        speed.add_row(Text(name, style="bold"), f"{path.tokens_per_s:8.1f}", f"{ms:7.2f}",
                      f"{100 * path.floor_share:5.1f}%", f"{path.ttft_ms:7.1f} ms")
    parts += [speed, Text(session.floor_note, style="dim")]
    if session.engine is not None:
        parts.append(_heat_map(stats))
    if stats.note:
        parts.append(Text(stats.note, style="yellow" if stats.interrupted else "bold"))
    return Group(*parts)


# ---- a session: models, engine, floor ------------------------------------------------------------------------

@dataclass
class Session:
    tokenizer: object
    hf: object | None                  # transformers model, or None (shape-only or --no-transformers)
    engine: Engine | None              # or None (--no-moegps)
    model: Model                       # the engine's model (its weights define the floor)
    device: torch.device
    copy_bytes_per_s: float
    max_new_tokens: int = 48
    random_weights: bool = False

    @property
    def floor_note(self) -> str:
        where = ("a CPU: floor from a measured memcpy rate" if self.device.type == "cpu"
                 else f"{torch.cuda.get_device_name(self.device)}: floor from a measured device copy")
        return (f"{where} of {self.copy_bytes_per_s / 1e9:.1f} GB/s (read + written); a decode step reads "
                f"{step_bytes(self.model, 0) / 1e6:.1f} MB of weights plus its KV cache")

    def paths(self):
        if self.hf is not None:
            yield TRANSFORMERS, lambda prompt: transformers_stepper(self.hf, prompt)
        if self.engine is not None:
            yield ENGINE, lambda prompt: engine_stepper(self.engine, prompt)

    def warm_up(self) -> None:
        """Each path once through prefill and a few steps (kernels compiled, the graph captured)."""
        answer(self, "Hello", lambda stats: None, max_new_tokens=4)


def build_session(model_name: str, device: str, dtype: str, shape: str | None = None, max_new_tokens: int = 48,
                  engine_on: bool = True, max_len: int = 1024) -> Session:
    device = torch.device(device)
    tokenizer = mixtral_tokenizer()  # before any model: a missing tokenizer fails in seconds, not after 93 GB
    if shape is not None:  # shape-only: random weights on the device, the engine alone
        if not engine_on:
            raise ValueError("--shape runs the engine only; it cannot go with --no-moegps")
        model = build_model(shape, str(device), "auto" if dtype == "auto" else dtype)
        hf = None
    else:
        from transformers import AutoModelForCausalLM

        torch_dtype = torch.float32 if dtype == "auto" and device.type == "cpu" else \
            torch.bfloat16 if dtype == "auto" else getattr(torch, dtype)
        hf = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch_dtype).to(device).eval()
        model = from_transformers(hf)  # views of the same tensors
    engine = None
    if engine_on:
        model.count_routes()
        engine = Engine(model, max_batch=1, max_len=max_len)  # counts set first: a captured graph keeps them
    session = Session(tokenizer, hf, engine, model, device, copy_rate(device), max_new_tokens,
                      random_weights=shape is not None)
    session.warm_up()
    return session


# ---- one answer -----------------------------------------------------------------------------------------------

def answer(session: Session, prompt: str, display: Callable[[AnswerStats], None],
           max_new_tokens: int | None = None) -> AnswerStats:
    """Both paths answer ``prompt``; ``display(stats)`` after every token (outside the timed steps).
    Ctrl-C (KeyboardInterrupt) anywhere in the answer ends the answer, not the program."""
    max_new_tokens = max_new_tokens or session.max_new_tokens
    model, tok = session.model, session.tokenizer
    moe_layers = model.moe_layers
    stats = AnswerStats(prompt, moe_layers, model.shape.n_experts)
    ids = tok.encode(prompt)
    if session.engine is not None and len(ids) + max_new_tokens > session.engine.max_len:
        stats.note = (f"prompt of {len(ids)} tokens + {max_new_tokens} new exceeds the engine's "
                      f"{session.engine.max_len} positions (--max-len): shorten it")
        display(stats)
        return stats
    sync = _sync(session.device)
    try:
        for name, stepper in session.paths():
            path = stats.paths[name] = PathStats()
            sync()
            start = time.perf_counter()
            first, step = stepper(ids)
            sync()
            path.ttft_ms = 1e3 * (time.perf_counter() - start)

            def on_token(tokens, seconds, path=path, name=name):
                path.tokens, path.seconds = list(tokens), seconds
                path.text = tok.decode([t % tok.vocab_size for t in tokens])
                if len(tokens) > 1:  # the step that made token i read the prompt and i cached positions
                    path.floor_seconds += step_bytes(model, len(ids) + len(tokens) - 1) / session.copy_bytes_per_s
                if name == ENGINE and model.routing_counts is not None:
                    stats.counts = model.routing_counts[moe_layers].cpu().numpy()
                display(stats)

            timed_decode(step, first, max_new_tokens, tok.eos_id, on_token, sync)
            path.done = True
    except KeyboardInterrupt:
        stats.interrupted = True
        stats.note = "answer interrupted (Ctrl-C): type another prompt, or Ctrl-C again to quit"
    if not stats.interrupted and len(stats.paths) == 2:
        a, b = stats.paths[TRANSFORMERS], stats.paths[ENGINE]
        same = "same tokens" if a.tokens == b.tokens else "DIFFERENT tokens"
        stats.note = f"{ENGINE} vs {TRANSFORMERS}: {b.tokens_per_s / max(a.tokens_per_s, 1e-9):.2f}x, {same}"
    display(stats)
    return stats


# ---- the command line -----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(BUNDLED_MODELS / "mixtral-tiny"), help="Mixtral checkpoint folder or hub id")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="GPU: random bf16 weights of this shape, engine only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto (float32 on a CPU, bfloat16 on a GPU), float32, "
                                                    "bfloat16, float16")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=1024, help="positions of the engine's KV cache")
    ap.add_argument("--prompt", help="answer this prompt and exit (default: ask interactively)")
    ap.add_argument("--no-moegps", action="store_true", help="plain transformers only")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device here (use --device cpu)")
    if args.shape and not args.device.startswith("cuda"):
        ap.error(f"--shape {args.shape} builds a real-size model: it needs a GPU (--device cuda)")
    if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
        ap.error(f"--dtype must be one of auto, float32, bfloat16, float16; got {args.dtype!r}")

    console = Console()
    try:
        source = f"shape {args.shape} (random weights)" if args.shape else args.model
        console.print(f"[bold]moegps demo[/] loading {escape(source)} on {args.device}, warming up …")
        try:
            session = build_session(args.model, args.device, args.dtype, args.shape, args.max_new_tokens,
                                    engine_on=not args.no_moegps, max_len=args.max_len)
        except (ValueError, OSError) as e:
            ap.exit(2, f"{ap.prog}: error: {e}\n")
        prompts = [args.prompt] if args.prompt else None
        while prompts is None or prompts:
            if prompts is not None:
                prompt = prompts.pop()
            else:
                try:
                    prompt = console.input("[bold green]prompt>[/] ").strip()
                except EOFError:
                    break
                if prompt in ("exit", "quit"):
                    break
                if not prompt:
                    continue
            placeholder = AnswerStats(prompt, [], 1)
            with Live(render(placeholder, session), console=console, refresh_per_second=8) as live:
                answer(session, prompt, lambda stats: live.update(render(stats, session)))
            console.print()
    except KeyboardInterrupt:  # at the prompt, or while loading: the demo ends
        console.print("\ninterrupted: bye")
        return EXIT_INTERRUPTED
    console.print("bye")
    return 0


if __name__ == "__main__":
    sys.exit(main())
