"""``python -m moegps.collect``: run a Hugging Face MoE model on prompts and record its routing.

What is recorded, and how:

- Prompts (``moegps.prompts``) are tokenised (the real Mixtral tokenizer for the Mixtral family,
  else the checkpoint's own), cut to ``max_prompt_tokens`` (the first tokens are kept), and run in
  batches of ``batch_size`` in dataset order.
- Each batch is left-padded and prefilled in one forward pass (step 0), then decoded greedily one
  token per forward pass with the KV cache (steps 1, 2, ...). ``max_new_tokens`` = N generated
  tokens means the prefill plus N-1 decode steps, as in ``model.generate``: step k processes the
  k-th generated token. By default every request decodes all N tokens, EOS or not (a fixed output
  length, like vLLM's ``--ignore-eos`` benchmarks: the bundled model answers an MMLU question with
  one letter and EOS, which would leave almost no decode steps). With ``stop_at_eos`` a request
  leaves the batch once it emits EOS (the tokenizer's or any of ``generation_config.eos_token_id``),
  as it would in a server: its EOS is never processed, so later steps hold no rows of it.
- A forward hook on every MoE router (``moegps.models.adapters``) keeps the expert ids and gate
  weights the router returned to its MoE block: exactly what the model computed. Rows of padding
  and of finished requests are dropped. Positions count within the request's own sequence
  (0 = its first prompt token), whatever padding the batch needed.
- Each batch becomes one shard ``shard-XXXXX.parquet`` (a :class:`~moegps.trace.RoutingTrace`,
  rows sorted by request, step, position, layer), written atomically, with a sidecar
  ``shard-XXXXX.requests.jsonl`` (prompt length, generated ids and text per request) written
  first. ``manifest.json`` and the resolved ``config.yaml`` sit beside them. Read the whole
  folder with ``RoutingTrace.read(out_dir)``.
- Restarted with the same output folder, it reads the request ids of the shards already there and
  runs only the others; a folder recorded with different settings is refused rather than mixed.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from moegps import __version__
from moegps.configs import (all_or_first_n, checked, device as device_rule, hydra_command, nonnegative, one_of,
                            positive, validate)
from moegps.files import atomic_path
from moegps.models.adapters import MoERouter, cache_argument, family_of, find_routers, routing_from_output
from moegps.models.tokenizer import mixtral_tokenizer
from moegps.paths import PROJECT_ROOT, git_commit, portable_path, register_resolvers
from moegps.prompts import Prompt, PromptError, load_prompts
from moegps.trace import RoutingTrace, TraceMeta

SHARD_PATTERN = "shard-{:05d}.parquet"

register_resolvers()


class CollectError(RuntimeError):
    """A collect run that cannot start or continue; the message names the path or setting."""


# ---- config schema (moegps/conf/collect.yaml and its groups are checked against these) -------------


@dataclass
class ModelConfig:
    name: str = "mixtral-tiny"
    path: str | None = "moegps/models/bundled/mixtral-tiny"  # local save_pretrained folder
    hub_id: str | None = None  # or a hub id (exactly one of path / hub_id)
    tokenizer: str = checked("mixtral", one_of("mixtral", "auto"))  # mixtral | auto
    dtype: str = checked("float32", one_of("float32", "bfloat16", "float16", "auto"))
    device_map: str | None = None  # e.g. auto: shard over the visible GPUs
    attn_implementation: str | None = None
    trust_remote_code: bool = False


@dataclass
class DatasetConfig:
    name: str = "mmlu"
    kind: str = checked("mmlu", one_of("mmlu", "text"))  # mmlu | text
    path: str | None = None  # local file/folder; mmlu falls back to the hub when absent
    hub_id: str | None = "cais/mmlu"
    hub_config: str = "all"
    split: str = "test"
    split_by: str = checked("blank_line", one_of("blank_line", "line", "file"))  # text: blank_line | line | file
    min_chars: int = checked(1, nonnegative)
    domain: str | None = None


@dataclass
class CollectConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    limit: int | None = checked(64, all_or_first_n)  # null = all prompts; 0 is an error
    batch_size: int = checked(16, positive)
    max_prompt_tokens: int = checked(512, positive)
    max_new_tokens: int = checked(32, positive)
    stop_at_eos: bool = False
    device: str = checked("auto", device_rule)
    seed: int = checked(0, nonnegative)
    progress: bool = True
    overwrite: bool = False
    out_dir: str = "runs/collect/run"


def _register_schema():
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="collect_schema", node=CollectConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="dataset", name="dataset_schema", node=DatasetConfig)


_register_schema()


# ---- model and tokenizer --------------------------------------------------------------------


def resolve_model_source(model_cfg) -> str:
    """A local folder (``path``, relative to the cwd or else to the project root) or a hub id."""
    path, hub_id = model_cfg.get("path"), model_cfg.get("hub_id")
    if bool(path) == bool(hub_id):
        raise CollectError(f"model config '{model_cfg.get('name')}': set exactly one of 'path' (local folder) or 'hub_id'")
    if hub_id:
        return str(hub_id)
    p = Path(path).expanduser()
    for candidate in ([p] if p.is_absolute() else [Path.cwd() / p, PROJECT_ROOT / p]):
        if (candidate / "config.json").exists():
            return str(candidate.resolve())
    where = p if p.is_absolute() else PROJECT_ROOT / p
    hint = " (the bundled models come from python -m moegps.models.train_tiny; see docs/collect.md)" if "bundled" in str(p) else ""
    raise CollectError(f"model '{model_cfg.get('name')}': no checkpoint at {where} (config.json missing){hint}")


def load_model(model_cfg, device: str):
    """``AutoModelForCausalLM`` in eval mode, with ``dtype``/``device_map`` from the model config."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(model_cfg)
    dtype = model_cfg.get("dtype", "float32")
    kwargs = dict(dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    if model_cfg.get("device_map"):
        kwargs["device_map"] = model_cfg.device_map
    if model_cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    kwargs["trust_remote_code"] = bool(model_cfg.get("trust_remote_code", False))
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if not model_cfg.get("device_map"):
        model.to(device)
    return model.eval(), source


@dataclass
class Tokenizer:
    """What collect needs of a tokenizer: ids for a text, the pad and EOS ids, a name, decode."""

    name: str
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    pad_id: int
    eos_ids: set[int] = field(default_factory=set)


def load_tokenizer(kind: str, source: str, model) -> Tokenizer:
    """``mixtral``: the real Mixtral SentencePiece tokenizer; ``auto``: the checkpoint's own."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if kind == "mixtral":

        tok = mixtral_tokenizer()
        if model.config.vocab_size < tok.vocab_size:
            raise CollectError(
                f"model vocab_size={model.config.vocab_size} is smaller than the Mixtral tokenizer's "
                f"{tok.vocab_size}; use 'model.tokenizer=auto'"
            )
        eos_ids = {tok.eos_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return Tokenizer(tok.name, lambda t: tok.encode(t, bos=True), tok.decode, tok.pad_id, eos_ids)
    if kind == "auto":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source)
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            eos_ids.add(tok.eos_token_id)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)
        return Tokenizer(
            f"{source}:{type(tok).__name__}", lambda t: tok(t, add_special_tokens=True)["input_ids"],
            lambda ids: tok.decode(ids), pad, eos_ids,
        )
    raise CollectError(f"model config: 'tokenizer' must be 'mixtral' or 'auto', got {kind!r}")


# ---- recording -------------------------------------------------------------------------------


class RouterRecorder:
    """Forward hooks on every MoE router; each forward pass leaves ``[tokens, k]`` ids and weights per layer."""

    def __init__(self, routers: list[MoERouter]):
        self.routers = routers
        self.outputs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(routers)
        self.handles = [r.module.register_forward_hook(self._hook(r)) for r in routers]

    def _hook(self, router: MoERouter):
        def hook(module, inputs, output):
            experts, weights = routing_from_output(output, router.top_k, router.name)
            self.outputs[router.index] = (experts.detach(), weights.detach())

        return hook

    def take(self, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """``(experts [layer, tokens, k] int16, weights [layer, tokens, k] float32)`` of the last pass."""
        missing = [r.name for r, o in zip(self.routers, self.outputs) if o is None]
        if missing:
            raise CollectError(f"routers {missing} did not run in the last forward pass")
        experts = np.stack([o[0].cpu().numpy() for o in self.outputs]).astype(np.int16)
        weights = np.stack([o[1].float().cpu().numpy() for o in self.outputs]).astype(np.float32)
        if experts.shape[1] != n_tokens:
            raise CollectError(f"routers saw {experts.shape[1]} tokens, expected {n_tokens} (batch x length)")
        self.outputs = [None] * len(self.routers)
        return experts, weights

    def remove(self):
        for h in self.handles:
            h.remove()


@dataclass
class BatchRecord:
    """Rows of one batch, token-major: keys ``[token]`` and ``experts/weights[token, layer, k]``."""

    request_id: list[np.ndarray] = field(default_factory=list)
    step: list[np.ndarray] = field(default_factory=list)
    position: list[np.ndarray] = field(default_factory=list)
    token_id: list[np.ndarray] = field(default_factory=list)
    experts: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)

    def add(self, request_id, step, position, token_id, experts, weights):
        """``experts``/``weights``: ``[layer, token, k]`` (as the recorder gives them)."""
        self.request_id.append(np.asarray(request_id, dtype=np.int64))
        self.step.append(np.full(len(request_id), step, dtype=np.int32))
        self.position.append(np.asarray(position, dtype=np.int32))
        self.token_id.append(np.asarray(token_id, dtype=np.int32))
        self.experts.append(experts.transpose(1, 0, 2))
        self.weights.append(weights.transpose(1, 0, 2))

    def to_trace(self, meta: TraceMeta) -> RoutingTrace:
        cols = {n: np.concatenate(getattr(self, n)) for n in ("request_id", "step", "position", "token_id")}
        experts, weights = np.concatenate(self.experts), np.concatenate(self.weights)
        order = np.lexsort((cols["position"], cols["step"], cols["request_id"]))
        cols = {n: c[order] for n, c in cols.items()}
        return RoutingTrace.from_token_major(meta, experts=experts[order], weights=weights[order], **cols)


@torch.no_grad()
def generate_and_record(
    model,
    recorder: RouterRecorder,
    prompts: list[list[int]],
    request_ids: list[int],
    max_new_tokens: int,
    pad_id: int,
    eos_ids: set[int],
    stop_at_eos: bool = False,
) -> tuple[BatchRecord, list[list[int]]]:
    """Greedy batched generation with the KV cache, recording every real token's routing.

    ``prompts``: token ids per request (unpadded). Returns the recorded rows and, per request, the
    generated token ids (at most ``max_new_tokens``; ending with EOS if it stopped there).
    """
    device = model.get_input_embeddings().weight.device
    B = len(prompts)
    lens = np.array([len(p) for p in prompts])
    S = int(lens.max())
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding: every request's last prompt token is at S-1
        ids[b, S - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, S - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    record = BatchRecord()
    rid = np.asarray(request_ids, dtype=np.int64)

    # logits_to_keep=1: only the last position's logits (a full [B, S, vocab] would cost GBs at scale)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    experts, weights = recorder.take(B * S)
    real = mask.reshape(-1).bool().cpu().numpy()
    b_of, s_of = np.divmod(np.arange(B * S), S)
    record.add(
        rid[b_of[real]], 0, (s_of - (S - lens[b_of]))[real], ids.reshape(-1).cpu().numpy()[real],
        experts[:, real], weights[:, real],
    )

    generated: list[list[int]] = [[] for _ in range(B)]
    active = np.ones(B, dtype=bool)
    next_tokens = out.logits[:, -1].argmax(-1)
    cache = cache_argument(model)  # the KV cache's name: `cache` from transformers 5.24, `past_key_values` before
    past = out[cache]
    for step in range(1, max_new_tokens + 1):
        tokens = next_tokens.cpu().numpy()
        for b in np.flatnonzero(active):
            generated[b].append(int(tokens[b]))
            if stop_at_eos and int(tokens[b]) in eos_ids:
                active[b] = False
        if step == max_new_tokens or not active.any():
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        pos = torch.as_tensor(lens + step - 1, dtype=torch.long, device=device)[:, None]
        out = model(input_ids=next_tokens[:, None], attention_mask=mask, position_ids=pos,
                    use_cache=True, **{cache: past})
        experts, weights = recorder.take(B)
        record.add(rid[active], step, (lens + step - 1)[active], tokens[active], experts[:, active], weights[:, active])
        next_tokens = out.logits[:, -1].argmax(-1)
        past = out[cache]
    return record, generated


# ---- the run ---------------------------------------------------------------------------------


def _fingerprint(cfg) -> dict:
    """Settings that change what a shard holds: a resumed run must match them. Paths as
    :func:`moegps.paths.portable_path` writes them, so a folder moved with its data still resumes."""
    keep = ("max_prompt_tokens", "max_new_tokens", "stop_at_eos", "batch_size")
    model = {k: v for k, v in cfg.model.items() if k != "device_map"}
    dataset = dict(cfg.dataset)
    model["path"], dataset["path"] = portable_path(model.get("path")), portable_path(dataset.get("path"))
    return {"model": model, "dataset": dataset, **{k: cfg[k] for k in keep}}


def _portable(fingerprint: dict | None) -> dict | None:
    """A manifest's fingerprint with its paths written portably (manifests from before portable paths
    stored the absolute data path; the same folder still resumes)."""
    if not isinstance(fingerprint, dict):
        return fingerprint
    out = json.loads(json.dumps(fingerprint))
    for part in ("model", "dataset"):
        if isinstance(out.get(part), dict) and out[part].get("path"):
            out[part]["path"] = portable_path(out[part]["path"])
    return out


def _done_requests(out_dir: Path) -> tuple[set[int], int]:
    """Request ids already in finished shards, and the next free shard number. A shard that does not
    read (cut short by a copy or a full disk: collect's own writes are atomic) is an error naming it."""
    done: set[int] = set()
    shards = sorted(out_dir.glob("shard-*.parquet"))
    for shard in shards:
        try:
            done.update(pq.read_table(shard, columns=["request_id"]).column(0).to_numpy().tolist())
        except (pa.ArrowException, OSError) as e:
            raise CollectError(
                f"{shard}: not a readable parquet shard ({type(e).__name__}: {e}). Delete it and its "
                f"{shard.with_suffix('.requests.jsonl').name}, then rerun the same command: its requests are "
                "recorded again, the other shards are kept") from None
    next_index = 1 + max((int(s.stem.split("-")[1]) for s in shards), default=-1)
    return done, next_index


class FolderLock:
    """An exclusive lock on an output folder (``.lock`` in it, ``flock``): a second collect into the
    same folder stops at once with a message instead of interleaving shards. The kernel drops the
    lock when the process ends, however it ends."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise CollectError(f"{self.path.parent}: another collect ({holder}) is writing to this folder; wait for "
                               "it to finish (then rerun to resume) or choose another out_dir") from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        return False


def _write_json(path: Path, obj, lines: bool = False):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            if lines:
                f.writelines(json.dumps(o) + "\n" for o in obj)
            else:
                json.dump(obj, f, indent=1)


def resolve_out_dir(cfg) -> Path:
    return Path(cfg.out_dir).expanduser().resolve()


def collect(cfg: DictConfig, on_shard: Callable[[Path, int], None] | None = None) -> Path:
    """Run the collection described by ``cfg`` (``moegps/conf/collect.yaml``); returns the output folder.

    ``on_shard(path, n_written)`` is called after each shard is safely on disk.
    """
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if "hydra" in cfg:
        del cfg["hydra"]
    validate(cfg, CollectConfig, "collect")  # types, ranges, no +keys: before any work
    resolve_model_source(cfg.model)  # fail before any work if the checkpoint is missing
    out_dir = resolve_out_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    with FolderLock(out_dir):
        return _collect(cfg, out_dir, on_shard)


def _collect(cfg: DictConfig, out_dir: Path, on_shard) -> Path:
    manifest_path = out_dir / "manifest.json"
    fingerprint = _fingerprint(cfg)
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if cfg.get("overwrite"):
            for f in [*out_dir.glob("shard-*"), manifest_path]:
                f.unlink()
        elif _portable(old.get("fingerprint")) != fingerprint:
            raise CollectError(
                f"{out_dir}: holds a trace recorded with other settings ({manifest_path}); "
                "choose another out_dir or pass overwrite=true"
            )
    for stray in out_dir.glob(".shard-*.tmp"):  # left by a run killed mid-write
        stray.unlink()

    torch.manual_seed(int(cfg.seed))
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dataset_cfg = OmegaConf.merge(cfg.dataset, {"limit": cfg.get("limit")})
    prompts: list[Prompt] = load_prompts(dataset_cfg)
    if not prompts:
        raise CollectError(f"dataset '{cfg.dataset.get('name')}' gave no prompts")
    model, source = load_model(cfg.model, device)
    tokenizer = load_tokenizer(cfg.model.get("tokenizer", "auto"), source, model)
    routers = find_routers(model)

    meta = TraceMeta(
        model=cfg.model.name,
        n_layers=len(routers),
        n_experts=routers[0].n_experts,
        top_k=routers[0].top_k,
        layer_ids=[r.layer_number for r in routers],
        model_config={"source": portable_path(source), "family": family_of(model).name, **json.loads(model.config.to_json_string())},
        tokenizer=tokenizer.name,
        dataset=f"{cfg.dataset.name}: {portable_path(cfg.dataset.get('path')) or cfg.dataset.get('hub_id')}",
        source="collect",
        recorded=dict(
            device=str(model.get_input_embeddings().weight.device) if not cfg.model.get("device_map") else f"device_map={cfg.model.device_map}",
            device_name=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            dtype=str(model.dtype).removeprefix("torch."),
            batch_size=int(cfg.batch_size),
            max_new_tokens=int(cfg.max_new_tokens),
            max_prompt_tokens=int(cfg.max_prompt_tokens),
            stop_at_eos=bool(cfg.stop_at_eos),
            padding="left",
            decoding="greedy",
            date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            moegps_version=__version__,
            git_commit=git_commit(),
            torch_version=torch.__version__,
            transformers_version=__import__("transformers").__version__,
        ),
    )
    with atomic_path(out_dir / "config.yaml") as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg))

    done, shard_index = _done_requests(out_dir)
    todo = [p for p in prompts if p.request_id not in done]
    manifest = {
        "fingerprint": fingerprint,
        "model": cfg.model.name,
        "dataset": meta.dataset,
        "requests_in_dataset_limit": len(prompts),
        "moegps_version": __version__,
        "git_commit": git_commit(),
    }

    def write_manifest():
        # what the shards hold, never what this run asked for: a rerun with a smaller limit on a
        # folder that holds more still counts (and reads back) every request in it
        shards = sorted(out_dir.glob("shard-*.parquet"))
        _write_json(manifest_path, {
            **manifest, "shards": [s.name for s in shards],
            "requests_done": len(done), "complete": not todo_left,
            "requests_beyond_limit": len(done - wanted),
        })

    wanted = {p.request_id for p in prompts}
    todo_left = len(todo)
    write_manifest()
    recorder = RouterRecorder(routers)
    written = 0
    bs = int(cfg.batch_size)
    try:
        with tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=f"collect {cfg.model.name}",
                  unit="req", disable=not cfg.get("progress", True)) as bar:
            for start in range(0, len(todo), bs):
                batch = todo[start:start + bs]
                token_ids = [tokenizer.encode(p.text)[: int(cfg.max_prompt_tokens)] for p in batch]
                record, generated = generate_and_record(
                    model, recorder, token_ids, [p.request_id for p in batch], int(cfg.max_new_tokens),
                    tokenizer.pad_id, tokenizer.eos_ids, bool(cfg.stop_at_eos),
                )
                shard = out_dir / SHARD_PATTERN.format(shard_index)
                _write_json(shard.with_suffix(".requests.jsonl"), [
                    dict(request_id=p.request_id, subject=p.subject, source=p.source, prompt_tokens=len(t),
                         prompt_ids=t, generated_ids=g, generated_text=tokenizer.decode(g),
                         first_eos=next((i for i, x in enumerate(g) if x in tokenizer.eos_ids), None))
                    for p, t, g in zip(batch, token_ids, generated)
                ], lines=True)
                record.to_trace(meta).write(shard)  # the parquet shard is the commit point
                done.update(p.request_id for p in batch)
                shard_index += 1
                written += 1
                todo_left -= len(batch)
                write_manifest()
                bar.update(len(batch))
                if on_shard is not None:
                    on_shard(shard, written)
    finally:
        recorder.remove()
    return out_dir


def app(cfg: DictConfig) -> None:
    """The command on a composed config (moegps/conf/collect.yaml): record, then print a summary."""
    out = collect(cfg)
    print(summary(RoutingTrace.read(out), out))


def main() -> None:
    # a setting or file to fix ends with its message; Ctrl-C with "interrupted: rerun ..." and exit
    # code 130 (every shard is written atomically, so the rerun resumes at the next batch)
    hydra_command(app, "collect", "collect", errors=(CollectError, PromptError))


def summary(trace: RoutingTrace, out: Path) -> str:
    """A few lines for the terminal: what was recorded, how skewed each layer is, what to run next."""
    lines = [f"trace written to {out}: {len(trace.requests())} requests, {trace.n_tokens} tokens x "
             f"{trace.meta.n_layers} MoE layers = {len(trace)} rows ({trace.meta.model}, "
             f"{trace.meta.n_experts} experts, top-{trace.meta.top_k})"]
    for phase in ("prefill", "decode"):
        if trace.phase_mask(phase).any():
            skew = trace.loads(by="all", phase=phase).imbalance()[0]
            lines.append(f"  {phase:7s} max/mean expert load per layer: " + " ".join(f"{x:.2f}" for x in skew))
    lines.append(f"next: python -m moegps.report routing {out}   (tables and plots of this routing)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
