"""Train a small Mixtral-architecture model from scratch: ``python -m moegps.models.train_tiny``.

The model is ``transformers.MixtralForCausalLM`` (the class a real Mixtral checkpoint loads into),
with the real Mixtral tokenizer's 32,000-token vocabulary and tied input/output embeddings, trained
on the deduplicated text of :mod:`moegps.models.data` (five domain corpora + MMLU dev questions).

- Loss: next-token cross-entropy plus ``router_aux_loss_coef`` times the Mixtral router
  load-balancing loss. With ``aux_loss_per_layer=false`` this is transformers' own loss term
  (``output_router_logits=True`` with labels: ``loss += coef * load_balancing_loss_func(...)``,
  whose token and probability shares are pooled over all layers); with ``true`` the same
  function is applied to each layer alone and averaged, so that every layer is balanced by itself.
- Early stopping: held-out loss is measured ``evals_per_epoch`` times per epoch; the best weights
  are kept and training stops after ``patience`` evaluations without improvement.
- Routing statistics (per-layer max/mean expert load per domain, oracle token-id hit rate) are
  measured on the held-out text during training and on the whole deduplicated text at the end.

Variants: ``recipe=mixtral_tiny`` (8 experts, top-2) and ``recipe=mixtral_tiny_64e`` (64 experts,
top-8), in ``moegps/conf/recipe/``. Every run writes, into ``out_dir`` (default: hydra's run folder):
``model/`` (``save_pretrained`` folder in ``save_dtype`` with ``train_log.json`` and
``reference_logits.npz``) and the resolved config. ``mode=card model_dir=...`` writes the model
card of a trained folder (it needs the shared data's real routing counts for the comparison).
"""

from __future__ import annotations

import json
import math
import shlex
import string
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from moegps import safe_pickle
from moegps.models.data import (
    DOMAINS, MMLU_DOMAIN, SPLIT_HELDOUT, SPLIT_TRAIN, build_corpus, load_tokens, save_tokens, tokenize_corpus,
)
from moegps.paths import CONF_DIR, shared_data

CORPUS_DOMAINS = tuple(d for d in DOMAINS if d != MMLU_DOMAIN)
VOCAB_SIZE = 32000
CARD_TEMPLATE = Path(__file__).with_name("model_card.md")  # the card's prose; write_model_card fills in the numbers


@dataclass
class ModelShape:
    """MixtralConfig fields that set the size; everything else keeps Mixtral's defaults."""

    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    intermediate_size: int = 256  # per expert
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 1e6
    vocab_size: int = VOCAB_SIZE  # the Mixtral tokenizer's; smaller only in tests


@dataclass
class TrainConfig:
    name: str = "mixtral-tiny"
    mode: str = "train"  # train | card
    model: ModelShape = field(default_factory=ModelShape)
    tokens: str = ".carry/train/tokens.npz"  # built by `python -m moegps.models.data`
    out_dir: str = ""  # empty: hydra's run folder
    model_dir: str = ""  # mode=card: the trained folder
    router_aux_loss_coef: float = 0.02
    aux_loss_per_layer: bool = False
    seq_len: int = 512
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_epochs: int = 20
    evals_per_epoch: int = 2
    patience: int = 3
    max_steps: int = 0  # 0: no limit (smoke tests set it)
    max_seconds: float = 0.0  # 0: no limit; training stops after this wall time
    eval_tokens_per_domain: int = 0  # 0: all held-out tokens
    stats_tokens_per_domain: int = 0  # 0: all text of the domain (final routing statistics)
    seed: int = 0
    device: str = "auto"
    amp_dtype: str = "bfloat16"  # autocast on CUDA; float32 on CPU
    save_dtype: str = "bfloat16"
    experts_implementation: str = "auto"  # auto: grouped_mm on CUDA if it runs, else eager
    skew_target: tuple[float, float] = (1.08, 1.33)  # real Mixtral-8x7B per-layer max/mean
    card_tokens_per_domain: int = 16384  # mode=card: text per domain for the trained-vs-untrained routing check
    card_recompute: bool = False  # mode=card: recompute routing_check.json even if the folder has one


# ---------------------------------------------------------------- model


def mixtral_config(shape: ModelShape, aux_coef: float):
    from transformers import MixtralConfig

    return MixtralConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
        tie_word_embeddings=True, output_router_logits=False, router_aux_loss_coef=aux_coef,
        head_dim=shape.hidden_size // shape.num_attention_heads, **asdict(shape),
    )


def build_model(cfg: TrainConfig, device: torch.device):
    """A freshly initialised MixtralForCausalLM (seeded), on ``device``, fp32 master weights."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(cfg.seed)
    model = MixtralForCausalLM(mixtral_config(cfg.model, cfg.router_aux_loss_coef)).to(device)
    model.config.use_cache = False
    _choose_experts_implementation(model, cfg, device)
    return model


def _choose_experts_implementation(model, cfg: TrainConfig, device: torch.device) -> None:
    choice = cfg.experts_implementation
    if choice == "auto":
        choice = "eager"
        if device.type == "cuda":
            for candidate in ("grouped_mm",):  # batched_mm gathers a weight copy per token: too much memory
                try:
                    model.set_experts_implementation(candidate)
                    ids = torch.randint(3, cfg.model.vocab_size, (2, 16), device=device)
                    with torch.autocast("cuda", dtype=getattr(torch, cfg.amp_dtype)):
                        model(input_ids=ids, labels=ids).loss.backward()
                    model.zero_grad(set_to_none=True)
                    choice = candidate
                    break
                except Exception as err:  # an implementation this torch/transformers lacks: try the next
                    print(f"experts implementation {candidate} unavailable: {type(err).__name__}: {err}")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(choice)
    print(f"experts implementation: {choice}")


def lm_and_aux_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig):
    """(total loss, cross-entropy, aux loss) for one batch ``[batch, seq]``."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    out = model(input_ids=input_ids, labels=labels, output_router_logits=True)
    k, n = cfg.model.num_experts_per_tok, cfg.model.num_local_experts
    if not cfg.aux_loss_per_layer:
        # transformers already added coef * aux to out.loss
        ce = out.loss - cfg.router_aux_loss_coef * out.aux_loss
        return out.loss, ce, out.aux_loss
    aux = torch.stack([load_balancing_loss_func((g,), n, k) for g in out.router_logits]).mean()
    ce = out.loss - cfg.router_aux_loss_coef * out.aux_loss
    return ce + cfg.router_aux_loss_coef * aux, ce, aux


# ---------------------------------------------------------------- data


def token_stream(data: dict, split: int, domain: str | None = None) -> np.ndarray:
    """All documents of one split (optionally one domain), concatenated: [tokens] int64."""
    offsets, dom, spl = data["doc_offsets"], data["doc_domain"], data["doc_split"]
    keep = spl == split
    if domain is not None:
        keep &= dom == data["domains"].index(domain)
    parts = [data["tokens"][offsets[i]:offsets[i + 1]] for i in np.flatnonzero(keep)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def windows(stream: np.ndarray, seq_len: int, max_tokens: int = 0) -> np.ndarray:
    """Non-overlapping windows of a stream: [n_windows, seq_len] (the ragged tail is dropped;
    a stream shorter than one window becomes one shorter window)."""
    if max_tokens:
        stream = stream[:max_tokens]
    if len(stream) < seq_len:
        return stream[None, :]
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def epoch_batches(stream: np.ndarray, seq_len: int, batch_size: int, rng: np.random.Generator):
    """One epoch of training batches ``[batch, seq_len]``: windows at a random phase, shuffled.

    Labels are the batch itself: transformers' causal-LM loss shifts them by one position.
    """
    phase = int(rng.integers(seq_len))
    n = (len(stream) - phase) // seq_len
    starts = phase + seq_len * rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
        idx = starts[i:i + batch_size, None] + np.arange(seq_len)
        yield stream[idx]


# ---------------------------------------------------------------- routing statistics


def load_skew(counts: np.ndarray) -> np.ndarray:
    """Per-layer max/mean expert load: counts [..., layer, expert] -> [..., layer]."""
    counts = np.asarray(counts, dtype=np.float64)
    return counts.max(-1) / counts.mean(-1)


def token_id_hit_rate(token_expert_counts: np.ndarray, top_k: int) -> float:
    """Oracle hit rate of a per-token-id lookup for one layer.

    token_expert_counts: [token_id, expert] how often tokens of that id selected the expert
    (each token contributes top_k selections). The lookup predicts, for every id, its top_k most
    frequent experts (fitted on the same tokens: an oracle); the hit rate is the share of all
    selections that the prediction covers, in [top_k / n_experts (no specialisation), 1].
    """
    c = np.asarray(token_expert_counts, dtype=np.float64)
    best = -np.sort(-c, axis=1)[:, :top_k].sum()
    return float(best / c.sum())


@torch.no_grad()
def evaluate(model, batches_by_domain: dict[str, np.ndarray], cfg: TrainConfig, device: torch.device,
             with_token_ids: bool = False, batch_size: int = 32) -> dict:
    """Mean next-token loss and routing counts per domain.

    batches_by_domain: domain -> windows [n, seq]. Returns {domain: {"loss", "tokens",
    "counts" [layer, expert]}} and, with ``with_token_ids``, "hit_rate" [layer] per domain.
    """
    model.eval()
    L, E, K = cfg.model.num_hidden_layers, cfg.model.num_local_experts, cfg.model.num_experts_per_tok
    result = {}
    for domain, wins in batches_by_domain.items():
        loss_sum, n_tok = 0.0, 0
        counts = np.zeros((L, E), np.int64)
        per_layer_ids = [[] for _ in range(L)]
        per_layer_experts = [[] for _ in range(L)]
        for i in range(0, len(wins), batch_size):
            ids = torch.as_tensor(wins[i:i + batch_size], device=device)
            with _autocast(device, cfg):
                out = model(input_ids=ids, output_router_logits=True)
            logits = out.logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum")
            loss_sum += float(loss)
            n_tok += ids[:, 1:].numel()
            for layer, g in enumerate(out.router_logits):
                top = torch.topk(g.float(), K, dim=-1).indices  # [batch*seq, K]
                counts[layer] += torch.bincount(top.reshape(-1), minlength=E).cpu().numpy()
                if with_token_ids:
                    per_layer_ids[layer].append(ids.reshape(-1).cpu().numpy())
                    per_layer_experts[layer].append(top.cpu().numpy())
        entry = dict(loss=loss_sum / max(n_tok, 1), tokens=n_tok, counts=counts)
        if with_token_ids:
            hit = []
            for layer in range(L):
                tid = np.concatenate(per_layer_ids[layer])
                ex = np.concatenate(per_layer_experts[layer])
                uniq, inv = np.unique(tid, return_inverse=True)
                table = np.bincount(np.repeat(inv, K) * E + ex.reshape(-1), minlength=len(uniq) * E)
                table = table.reshape(len(uniq), E)
                hit.append(token_id_hit_rate(table, K))
            entry["hit_rate"] = hit
        result[domain] = entry
    model.train()
    return result


def summarise(evaluation: dict) -> dict:
    """Held-out perplexity overall (token-weighted) and per domain, and load skew per domain."""
    tokens = sum(v["tokens"] for v in evaluation.values())
    loss = sum(v["loss"] * v["tokens"] for v in evaluation.values()) / tokens
    out = dict(loss=loss, perplexity=math.exp(loss),
               perplexity_by_domain={d: math.exp(v["loss"]) for d, v in evaluation.items()},
               load_skew={d: load_skew(v["counts"]).round(4).tolist() for d, v in evaluation.items()
                          if d in CORPUS_DOMAINS})
    if any("hit_rate" in v for v in evaluation.values()):
        out["token_id_hit_rate"] = {d: np.round(v["hit_rate"], 4).tolist() for d, v in evaluation.items()}
    out["expert_counts"] = {d: v["counts"].tolist() for d, v in evaluation.items()}
    return out


def _autocast(device: torch.device, cfg: TrainConfig):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, cfg.amp_dtype))
    return torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------- training


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train(cfg: TrainConfig, out_dir: Path) -> dict:
    """Train with early stopping; save the best weights to ``out_dir/model``; return the log."""
    t_start = time.time()
    device = _device(cfg)
    rng = np.random.default_rng(cfg.seed)
    data = load_tokens(cfg.tokens)
    train_stream = token_stream(data, SPLIT_TRAIN)
    heldout = {d: windows(token_stream(data, SPLIT_HELDOUT, d), cfg.seq_len, cfg.eval_tokens_per_domain)
               for d in DOMAINS}
    model = build_model(cfg, device)
    n_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    steps_per_epoch = max(1, (len(train_stream) - cfg.seq_len) // cfg.seq_len // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.max_epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
    print(f"{cfg.name}: {n_params / 1e6:.2f} M parameters, {len(train_stream):,} training tokens, "
          f"{steps_per_epoch} steps/epoch, device {device}", flush=True)

    untrained = summarise(evaluate(model, heldout, cfg, device))
    print(f"untrained held-out perplexity {untrained['perplexity']:.1f}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    history, best, best_state, bad_evals, step, stop = [], None, None, 0, 0, ""
    tokens_seen, t_train = 0, time.time()
    for epoch in range(cfg.max_epochs):
        for batch in epoch_batches(train_stream, cfg.seq_len, cfg.batch_size, rng):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total_steps, cfg)
            batch = torch.as_tensor(batch, device=device)
            with _autocast(device, cfg):
                loss, ce, aux = lm_and_aux_loss(model, batch, batch, cfg)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += batch.numel()
            if step % eval_every == 0 or step == total_steps:
                s = summarise(evaluate(model, heldout, cfg, device))
                elapsed = time.time() - t_train
                row = dict(step=step, epoch=round(step / steps_per_epoch, 2), train_loss=float(ce.detach()),
                           aux_loss=float(aux.detach()), heldout_loss=s["loss"], heldout_perplexity=s["perplexity"],
                           max_load_skew=max(max(v) for v in s["load_skew"].values()),
                           tokens_per_s=tokens_seen / elapsed, seconds=elapsed)
                history.append(row)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                      flush=True)
                if best is None or s["loss"] < best["loss"]:
                    best, bad_evals = dict(s, step=step, epoch=row["epoch"]), 0
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                else:
                    bad_evals += 1
                if bad_evals >= cfg.patience:
                    stop = f"early stop: no held-out improvement in {cfg.patience} evaluations"
                elif cfg.max_seconds and time.time() - t_start > cfg.max_seconds:
                    stop = f"time limit {cfg.max_seconds} s"
            if step >= total_steps and not stop:
                stop = "step limit" if cfg.max_steps and step >= cfg.max_steps else "max_epochs"
            if stop:
                break
        if stop:
            break
    stop = stop or "max_epochs"
    print(f"stopped: {stop}; best step {best['step']} held-out perplexity {best['perplexity']:.2f}", flush=True)
    model.load_state_dict(best_state)

    # routing statistics of the best model on each domain's whole deduplicated text
    full = {d: windows(np.concatenate([token_stream(data, SPLIT_TRAIN, d), token_stream(data, SPLIT_HELDOUT, d)]),
                       cfg.seq_len, cfg.stats_tokens_per_domain) for d in DOMAINS}
    full_stats = summarise(evaluate(model, full, cfg, device, with_token_ids=True))
    held_hits = summarise(evaluate(model, heldout, cfg, device, with_token_ids=True))["token_id_hit_rate"]

    log = dict(
        name=cfg.name, command=_command_line(), config=_jsonable(asdict(cfg)), parameters=n_params,
        parameters_without_embedding=n_params - model.model.embed_tokens.weight.numel(),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, transformers=__import__("transformers").__version__,
        experts_implementation=getattr(model.config, "_experts_implementation", None),
        data=dict(tokens_file=str(cfg.tokens), **data["meta"]),
        stop_reason=stop, steps=step, tokens_seen=tokens_seen, wall_seconds=time.time() - t_start,
        untrained=dict(perplexity=untrained["perplexity"], perplexity_by_domain=untrained["perplexity_by_domain"],
                       load_skew=untrained["load_skew"]),
        best={k: v for k, v in best.items() if k != "expert_counts"},
        best_heldout_counts=best["expert_counts"], heldout_token_id_hit_rate=held_hits,
        full_text=dict(load_skew=full_stats["load_skew"], token_id_hit_rate=full_stats["token_id_hit_rate"],
                       expert_counts=full_stats["expert_counts"],
                       tokens={d: int(full[d].size) for d in DOMAINS}),
        history=history,
    )
    export(model, cfg, log, out_dir / "model", data["reference_ids"])
    return log


def export(model, cfg: TrainConfig, log: dict, folder: Path, reference_ids: np.ndarray) -> None:
    """save_pretrained in ``save_dtype`` (tied embedding stored once), the log, reference logits."""
    from transformers import MixtralForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", dtype=getattr(torch, cfg.save_dtype)).eval()
    model.config.use_cache = True
    model.config.output_router_logits = False
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    model.save_pretrained(folder)
    # reference logits: the saved weights, reloaded in float32 on the CPU (as the test does)
    reloaded = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.as_tensor(reference_ids)[None]
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits[0].numpy()
    n_vocab = logits.shape[-1]
    vocab = np.unique(np.concatenate([np.arange(min(256, n_vocab)),
                                      np.random.default_rng(0).choice(n_vocab, min(256, n_vocab), replace=False),
                                      logits.argmax(-1)]))
    np.savez_compressed(folder / "reference_logits.npz", input_ids=reference_ids, vocab_ids=vocab,
                        logits=logits[:, vocab].astype(np.float32), argmax=logits.argmax(-1),
                        logsumexp=np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1))
    log["storage"] = dict(dtype=cfg.save_dtype, bytes={p.name: p.stat().st_size for p in folder.iterdir()})
    (folder / "train_log.json").write_text(json.dumps(log, indent=1))


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["python", "-m", "moegps.models.train_tiny", *sys.argv[1:]])


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ---------------------------------------------------------------- choosing among sweep runs


def skew_distance(load_skew: dict, target: tuple[float, float]) -> float:
    """Mean distance (in log space) of per-layer max/mean loads from the target range; 0 inside it."""
    lo, hi = target
    vals = np.array([v for d in CORPUS_DOMAINS for v in load_skew[d]], np.float64)
    return float(np.mean(np.maximum(0, np.maximum(np.log(lo / vals), np.log(vals / hi)))))


def choose_run(logs: list[dict], perplexity_slack: float = 1.1) -> int:
    """Index of the run to bundle: among runs whose held-out perplexity is within
    ``perplexity_slack`` of the best run's, the one whose whole-text load skew lies closest to its
    ``skew_target`` (ties: lower perplexity)."""
    best_ppl = min(log["best"]["perplexity"] for log in logs)
    eligible = [i for i, log in enumerate(logs) if log["best"]["perplexity"] <= perplexity_slack * best_ppl]
    return min(eligible, key=lambda i: (round(skew_distance(logs[i]["full_text"]["load_skew"],
                                                            tuple(logs[i]["config"]["skew_target"])), 3),
                                        logs[i]["best"]["perplexity"]))


def choose_and_pack(runs: str, out: str, part_bytes: int = 15 * 2**20) -> None:
    """After a sweep (one folder per run under ``runs``, each with ``model/train_log.json``): choose
    one run per model name, write ``<name>.tar`` of its model folder to ``out`` in parts of at most
    ``part_bytes`` (``<name>.tar.part0``, ...; join with ``cat``), plus ``sweep.tar.gz`` of every
    run's log and config and ``sweep.json`` summarising the choice."""
    import tarfile

    runs_dir, out_dir = Path(runs), Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = {}
    for log_path in sorted(runs_dir.glob("*/model/train_log.json")):
        log = json.loads(log_path.read_text())
        log["_run"] = log_path.parent.parent.name
        logs.setdefault(log["name"], []).append(log)
    summary = {}
    for name, group in logs.items():
        chosen = group[choose_run(group)]
        summary[name] = dict(chosen=chosen["_run"], runs=[dict(
            run=g["_run"], aux=g["config"]["router_aux_loss_coef"], per_layer=g["config"]["aux_loss_per_layer"],
            heldout_perplexity=round(g["best"]["perplexity"], 2), best_epoch=g["best"]["epoch"],
            load_skew_range=_range(g["full_text"]["load_skew"]),
            skew_distance=round(skew_distance(g["full_text"]["load_skew"], tuple(g["config"]["skew_target"])), 4))
            for g in group])
        tar_path = out_dir / f"{name}.tar"
        with tarfile.open(tar_path, "w") as tar:
            tar.add(runs_dir / chosen["_run"] / "model", arcname=name)
        data = tar_path.read_bytes()
        tar_path.unlink()
        for i in range(0, len(data), part_bytes):
            (out_dir / f"{name}.tar.part{i // part_bytes}").write_bytes(data[i:i + part_bytes])
    with tarfile.open(out_dir / "sweep.tar.gz", "w:gz") as tar:
        for p in sorted(runs_dir.rglob("*")):
            if p.is_file() and p.suffix in (".json", ".yaml", ".log"):
                tar.add(p, arcname=str(p.relative_to(runs_dir)))
    (out_dir / "sweep.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


# ---------------------------------------------------------------- model card


def real_routing_reference(model: str = "mistral") -> dict:
    """Per-layer max/mean load and oracle token-id hit rate of a real model, per domain.

    From the trusted shared pickles ``olmoe-routing/<model>/{expert_counts,eid2token}`` (layers 0,
    7, 15; Mixtral-8x7B top-2 for "mistral", OLMoE-1B-7B top-8 for "olmoe"). Returns
    {"load_skew": {domain: [3]}, "token_id_hit_rate": {domain: [3]}, "layers": [0, 7, 15]}.
    """
    n_experts, top_k = (8, 2) if model == "mistral" else (64, 8)
    root = shared_data("olmoe-routing", model)
    out = {"layers": [0, 7, 15], "load_skew": {}, "token_id_hit_rate": {}, "top_k": top_k, "n_experts": n_experts}
    for path in sorted((root / "expert_counts").glob("*.pkl")):
        layers = safe_pickle.load(path)
        counts = np.array([[c.get(e, 0) for e in range(n_experts)] for c in layers], np.float64)
        out["load_skew"][path.stem] = load_skew(counts).round(4).tolist()
        e2t = root / "eid2token" / path.name
        if e2t.exists():
            hits = []
            for per_expert in safe_pickle.load(e2t):
                ids = sorted({int(t) for c in per_expert.values() for t in c})
                index = {t: i for i, t in enumerate(ids)}
                table = np.zeros((len(ids), n_experts), np.int64)
                for e, c in per_expert.items():
                    for t, n in c.items():
                        table[index[int(t)], int(e)] = n
                hits.append(round(token_id_hit_rate(table, top_k), 4))
            out["token_id_hit_rate"][path.stem] = hits
    return out


def write_model_card(folder: Path, cfg: TrainConfig | None = None) -> Path:
    """MODEL_CARD.md of a trained folder, from its train_log.json, sweep.json (if present), the real
    routing counts, and a CPU check of trained vs untrained routing on the same text."""
    cfg = cfg or TrainConfig()
    log = json.loads((folder / "train_log.json").read_text())
    check_path = folder / "routing_check.json"
    if check_path.exists() and not cfg.card_recompute:
        check = json.loads(check_path.read_text())
    else:
        check = trained_vs_untrained_routing(folder, cfg)
        check_path.write_text(json.dumps(check, indent=1))
    sweep = json.loads((folder / "sweep.json").read_text()) if (folder / "sweep.json").exists() else {}
    c = log["config"]
    shape = c["model"]
    is_fine = shape["num_local_experts"] > 8
    real_name = "OLMoE-1B-7B" if is_fine else "Mixtral-8x7B"
    real = real_routing_reference("olmoe" if is_fine else "mistral")
    stats = log["data"]["stats"]
    size = sum(log["storage"]["bytes"].values())
    real_skew = [v for vals in real["load_skew"].values() for v in vals]
    ours_skew = [v for d in CORPUS_DOMAINS for v in log["full_text"]["load_skew"][d]]
    check_labels = ("untrained", "trained")
    fields = {
        "name": log["name"], "n_experts": shape["num_local_experts"], "top_k": shape["num_experts_per_tok"],
        "architecture_rows": "\n".join(f"| {k} | {v} |" for k, v in shape.items()),
        "parameters": f"{log['parameters']:,}", "parameters_without_embedding": f"{log['parameters_without_embedding']:,}",
        "dtype": log["storage"]["dtype"], "size_mib": f"{size / 2**20:.1f}", "data_settings": log["data"]["settings"],
        "data_rows": "\n".join(
            f"| {d} | {stats['documents'][d]} | {stats['exact_duplicates'][d]} | {stats['near_duplicates'][d]} | "
            f"{stats['train_documents'][d]} | {stats['heldout_documents'][d]} | {stats['train_tokens'][d]:,} | "
            f"{stats['heldout_tokens'][d]:,} |" for d in DOMAINS),
        "command": log["command"], "device": log["device"], "torch": log["torch"], "transformers": log["transformers"],
        "experts_implementation": log["experts_implementation"], "aux_coef": c["router_aux_loss_coef"],
        "aux_form": "per layer" if c["aux_loss_per_layer"] else "transformers Mixtral loss, pooled over layers",
        "lr": c["lr"], "batch_size": c["batch_size"], "seq_len": c["seq_len"], "patience": c["patience"],
        "evals_per_epoch": c["evals_per_epoch"], "stop_reason": log["stop_reason"], "steps": log["steps"],
        "tokens_seen": f"{log['tokens_seen']:,}", "wall_seconds": f"{log['wall_seconds']:.0f}",
        "best_step": log["best"]["step"], "best_epoch": log["best"]["epoch"],
        "perplexity_rows": "\n".join(
            f"| {d} | {log['untrained']['perplexity_by_domain'][d]:,.0f} | {log['best']['perplexity_by_domain'][d]:,.1f} |"
            for d in DOMAINS),
        "untrained_perplexity": f"{log['untrained']['perplexity']:,.0f}", "best_perplexity": f"{log['best']['perplexity']:,.1f}",
        "real_name": real_name, "real_folder": "olmoe" if is_fine else "mistral",
        "skew_rows": "\n".join(
            f"| {d} | {', '.join(f'{v:.2f}' for v in log['full_text']['load_skew'][d])} | "
            f"{', '.join(f'{v:.2f}' for v in real['load_skew'].get(_real_domain(d), []))} |" for d in CORPUS_DOMAINS),
        "ours_range": f"{min(ours_skew):.2f}-{max(ours_skew):.2f}", "real_range": f"{min(real_skew):.2f}-{max(real_skew):.2f}",
        "heldout_range": _range(log["best"]["load_skew"]),
        "no_specialisation": f"{shape['num_experts_per_tok'] / shape['num_local_experts']:.2f}",
        "hit_rows": "\n".join(
            f"| {d} | {', '.join(f'{v:.2f}' for v in log['full_text']['token_id_hit_rate'][d])} | "
            f"{', '.join(f'{v:.2f}' for v in real['token_id_hit_rate'].get(_real_domain(d), []))} |" for d in CORPUS_DOMAINS),
        "folder": _rel(folder), "check_tokens": f"{check['tokens_per_domain']:,}",
        "check_rows": "\n".join(
            f"| {label} | {_range(check[label]['load_skew'])} | "
            f"{', '.join(f'{v:.2f}' for v in np.mean([check[label]['token_id_hit_rate'][d] for d in CORPUS_DOMAINS], axis=0))} | "
            f"{check[label]['perplexity']:,.1f} |" for label in check_labels),
        # the sections whose prose depends on the numbers (which model is more skewed, and why)
        "generated_sections": "\n".join([
            *_sweep_table(sweep.get(log["name"])),
            "## More or less skewed than the real model, and why", "", *_skew_discussion(log, real, real_name), "",
            *_why(log, real, real_name, is_fine), "", *_why_untrained(check), ""]),
    }
    text = string.Template(CARD_TEMPLATE.read_text()).substitute(fields)
    path = folder / "MODEL_CARD.md"
    path.write_text(text)
    return path


def trained_vs_untrained_routing(folder: Path, cfg: TrainConfig) -> dict:
    """Routing of the bundled model and of its untrained initialisation (same seed, same shape)
    on the same text: the first ``cfg.card_tokens_per_domain`` tokens of each domain's
    deduplicated text, on the CPU. Returns {"trained"|"untrained": {"load_skew", "token_id_hit_rate"}}."""
    from transformers import MixtralForCausalLM

    log = json.loads((folder / "train_log.json").read_text())
    tokens = Path(cfg.tokens)
    if not tokens.exists():
        s = log["data"]["settings"]
        save_tokens(tokens, tokenize_corpus(build_corpus(s["heldout_fraction"], s["seed"], s["lines_per_document"])))
    data = load_tokens(tokens)
    run_cfg = TrainConfig(**{k: v for k, v in log["config"].items() if k in TrainConfig.__dataclass_fields__
                             and k not in ("model", "skew_target")})
    run_cfg.model = ModelShape(**{k: v for k, v in log["config"]["model"].items()})
    run_cfg.device = "cpu"
    text = {d: windows(np.concatenate([token_stream(data, SPLIT_TRAIN, d), token_stream(data, SPLIT_HELDOUT, d)]),
                       run_cfg.seq_len, cfg.card_tokens_per_domain) for d in CORPUS_DOMAINS}
    device = torch.device("cpu")
    out = {}
    for label in ("trained", "untrained"):
        if label == "trained":
            model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32)
        else:
            run_cfg.experts_implementation = "eager"
            model = build_model(run_cfg, device)  # seeded: the initialisation training started from
        s = summarise(evaluate(model, text, run_cfg, device, with_token_ids=True, batch_size=8))
        out[label] = dict(load_skew=s["load_skew"], token_id_hit_rate=s["token_id_hit_rate"],
                          perplexity=s["perplexity"])
    out["tokens_per_domain"] = int(min(v.size for v in text.values()))
    return out


def _real_domain(d: str) -> str:
    return d  # the pickles use the same domain names (book, not b3g)


def _rel(folder: Path) -> str:
    try:
        return str(folder.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(folder)


def _range(skew: dict) -> str:
    vals = [v for vs in skew.values() for v in vs]
    return f"{min(vals):.2f}-{max(vals):.2f}"


def _sweep_table(sweep: dict | None) -> list[str]:
    if not sweep:
        return []
    rows = ["Runs compared (same data, seed and shape; chosen by `choose_run`: within 10% of the best held-out "
            "perplexity, closest to the target skew range):", "",
            "| run | aux coef | aux loss | held-out ppl | best epoch | max/mean range (whole text) | chosen |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    rows += [f"| {r['run']} | {r['aux']} | {'per layer' if r['per_layer'] else 'pooled (transformers)'} | "
             f"{r['heldout_perplexity']} | {r['best_epoch']} | {r['load_skew_range']} | "
             f"{'yes' if r['run'] == sweep['chosen'] else ''} |" for r in sweep["runs"]]
    return rows + [""]


def _why(log: dict, real: dict, real_name: str, is_fine: bool) -> list[str]:
    ours_hit = np.mean([np.mean(log["full_text"]["token_id_hit_rate"][d]) for d in CORPUS_DOMAINS])
    real_hit = np.mean([np.mean(v) for v in real["token_id_hit_rate"].values()])
    c = log["config"]
    if c["aux_loss_per_layer"]:
        load = (f"Load: the skew is set mostly by the router auxiliary loss (coefficient {c['router_aux_loss_coef']}, "
                "applied to each layer), chosen to land in the real model's range. transformers' own Mixtral loss "
                "pools token shares and router probabilities over all layers, so it is minimised when each layer's "
                "hot experts differ from the other layers'; in the sweep it left single layers 2-3.8x the mean. "
                "Applied per layer, the same loss balances each layer.")
    else:
        load = (f"Load: transformers' Mixtral auxiliary loss (coefficient {c['router_aux_loss_coef']}) pools token "
                "shares and router probabilities over all layers, so it does not hold single layers even (the "
                "8-expert sweep shows this); with it, every layer here lands inside the real model's range, and a "
                "10x larger coefficient changed the range little. Per domain the pattern differs from the real "
                "model's: the real one is most skewed on the specialised domains (arxiv, github, wikipedia), "
                "whose experts it can afford to dedicate; the bundled model is most skewed on general prose "
                "(book, c4), its highest-perplexity text, probably because with 64 experts of width 32 and a "
                "million training tokens it forms a few generic experts that most ordinary words go to, rather "
                "than domain experts.")
    missing = [d for d in CORPUS_DOMAINS if d not in real["token_id_hit_rate"]]
    lines = [
        load,
        "",
        f"Token ids: a token's id explains more of its routing here (oracle hit rate {ours_hit:.2f} on average) "
        f"than in the real {real_name} ({real_hit:.2f}, layers 0, 7, 15). The bundled model has 4 layers of width "
        f"{log['config']['model']['hidden_size']} and saw about a million distinct training tokens: its router "
        "inputs stay close to the token embedding, while the real model's routers see 4096- or 2048-wide states "
        "mixed over many more layers of context. Both numbers are oracle (fitted and scored on the same tokens) "
        "and rise as the sample shrinks; here they come from samples of similar size (about 200k tokens per domain)."
        + (f" The real model's hit rate for {', '.join(missing)} is missing: its eid2token file is absent upstream."
           if missing else ""),
    ]
    if is_fine:
        lines += ["", "64 experts with top-8 can be at most 8x the mean (an expert chosen by every token); the real "
                  "OLMoE reaches 7.8 on arxiv, so fine-grained routing here, as there, concentrates load on a few "
                  "experts per domain: the regime where placement and duplication matter most."]
    return lines


def _why_untrained(check: dict) -> list[str]:
    def hit(label):
        return np.mean([check[label]["token_id_hit_rate"][d] for d in CORPUS_DOMAINS], axis=0)

    u, t = hit("untrained"), hit("trained")
    mean_skew = {k: np.mean([v for d in CORPUS_DOMAINS for v in check[k]["load_skew"][d]]) for k in ("untrained", "trained")}
    verb = "spreads" if mean_skew["trained"] < mean_skew["untrained"] else "concentrates"
    return [
        f"Untrained vs trained: the randomly initialised router is not even here (max/mean "
        f"{_range(check['untrained']['load_skew'])}), most likely because its inputs share a common direction "
        "(random embeddings passed through random layers and normalised), which favours the same experts for "
        f"most tokens. Training {verb} the load (max/mean {_range(check['trained']['load_skew'])}; mean "
        f"{mean_skew['untrained']:.2f} -> {mean_skew['trained']:.2f}) and makes routing depend more on the token, "
        f"most in the deeper layers (token-id hit rate per layer {', '.join(f'{v:.2f}' for v in u)} untrained -> "
        f"{', '.join(f'{v:.2f}' for v in t)} trained, same text).",
    ]


def _skew_discussion(log: dict, real: dict, real_name: str) -> list[str]:
    """Domain by domain: is the bundled model more or less skewed than the real one."""
    out = []
    for d in CORPUS_DOMAINS:
        ours = float(np.mean(log["full_text"]["load_skew"][d]))
        theirs = float(np.mean(real["load_skew"][d]))
        word = "more" if ours > theirs * 1.05 else "less" if ours < theirs / 1.05 else "about as"
        out.append(f"- {d}: mean max/mean {ours:.2f} vs {theirs:.2f}: {word} skewed.")
    return out


# ---------------------------------------------------------------- entry point


def run(cfg: TrainConfig, out_dir: Path) -> None:
    if cfg.mode == "card":
        if not cfg.model_dir:
            raise ValueError("mode=card needs model_dir=<folder with train_log.json>")
        print(f"wrote {write_model_card(Path(cfg.model_dir), cfg)}")
        return
    if cfg.mode != "train":
        raise ValueError(f"mode={cfg.mode!r}: expected 'train' or 'card'")
    log = train(cfg, out_dir)
    print(json.dumps(dict(name=log["name"], heldout_perplexity=log["best"]["perplexity"],
                          untrained_perplexity=log["untrained"]["perplexity"],
                          load_skew_full_text=log["full_text"]["load_skew"]), indent=1))


def main() -> None:
    import hydra
    from hydra.core.config_store import ConfigStore
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="train_tiny_schema", node=TrainConfig)

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train_tiny")
    def _app(dcfg) -> None:
        from moegps.configs import validate

        cfg: TrainConfig = validate(dcfg, TrainConfig, "train_tiny")  # refuses +keys the schema lacks
        out_dir = Path(cfg.out_dir or HydraConfig.get().runtime.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(dcfg))
        run(cfg, out_dir)

    _app()


if __name__ == "__main__":
    main()
