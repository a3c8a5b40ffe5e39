"""Workloads: a trace spec becomes a trace, a trace becomes train and test requests.

    from moegps.workloads import load_trace, train_test
    trace = load_trace("deepseek")                       # or "random", "synthetic", a path
    split = train_test(trace="deepseek", test_fraction=0.2)           # one trace, arrival order
    split = train_test(train="a.parquet", test="b.parquet")           # two traces
    split.train, split.test, split.describe()                          # the split, stated

Every command that fits something on a trace (predictors, placement, the simulator, sweeps, the
executor) gets its requests from :func:`train_test`, so that every figure it reports is out of
sample and says how it was split. One trace is split by whole requests (never tokens) in arrival
order by default: request ids number requests in the order they arrived (``collect`` and the
importers assign them so), the first ``1 - test_fraction`` of them train, the rest test, as a
server would fit on the past and serve the future; ``split="random"`` draws the test requests
with ``seed`` instead.

Token ids: a trace's ids live in a *token space* (:func:`token_space`): a named tokenizer's, or a
vocabulary that travels with the trace (``meta.model_config['token_vocab']``, the DeepSeek import).
Two traces of one vocabulary space are re-encoded onto the training trace's vocabulary
(:func:`align_token_ids`); ids of different spaces cannot be compared, and :func:`check_token_space`
says so before a token predictor is fitted on one and scored on the other.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .configs import all_or_first_n
from .importers.deepseek_csv import read_deepseek_csv
from .paths import shared_data
from .shapes import SHAPES, ModelShape, from_hf_config, from_name
from .trace import RoutingTrace, TraceError, TraceMeta

SPLITS = ("arrival", "random")
NAMED_TRACES = ("deepseek", "random", "synthetic")


# ---- synthetic traces ---------------------------------------------------------------------------


def random_trace(
    rng: np.random.Generator,
    n_requests: int = 4,
    prompt_len: tuple[int, int] = (3, 9),
    decode_steps: int = 3,
    n_layers: int = 2,
    n_experts: int = 8,
    top_k: int = 2,
    skew: float = 1.0,
    vocab: int = 1000,
) -> RoutingTrace:
    """A trace of ``n_requests`` requests, each a prefill of random length then ``decode_steps`` steps.

    Experts are drawn without replacement from a Zipf-like profile with exponent ``skew`` per layer
    (0 = uniform), so load matrices are uneven the way real ones are. Token ids are uniform in
    ``[0, vocab)`` and carry no routing signal.
    """
    lens = rng.integers(prompt_len[0], prompt_len[1] + 1, size=n_requests)
    per = lens + decode_steps
    req = np.repeat(np.arange(n_requests), per)
    pos = np.concatenate([np.arange(n) for n in per])
    step = np.maximum(pos - np.repeat(lens, per) + 1, 0)
    T = len(req)
    experts = np.empty((T, n_layers, top_k), dtype=np.int16)
    for layer in range(n_layers):
        p = 1.0 / np.arange(1, n_experts + 1) ** skew
        p = p[rng.permutation(n_experts)]
        # Gumbel top-k: distinct experts per token, marginals following p
        g = np.log(p)[None, :] + rng.gumbel(size=(T, n_experts))
        experts[:, layer] = np.argsort(-g, axis=1)[:, :top_k]
    weights = rng.dirichlet(np.ones(top_k), size=(T, n_layers)).astype(np.float32)
    weights = -np.sort(-weights, axis=-1)
    meta = TraceMeta(model="random", n_layers=n_layers, n_experts=n_experts, top_k=top_k, source="random",
                     tokenizer=f"synthetic:uniform-{vocab}")
    return RoutingTrace.from_token_major(
        meta, req, step, pos, rng.integers(0, vocab, size=T), experts, weights
    ).validate()


def synthetic_trace(rng: np.random.Generator, skew: float, n_requests: int = 200, prompt_len: tuple[int, int] = (16, 128),
                    decode_steps: int = 16, n_layers: int = 8, n_experts: int = 8, top_k: int = 2, vocab: int = 2000,
                    stickiness: float = 0.7) -> RoutingTrace:
    """A trace whose routing skew is a knob: expert popularity ~ 1 / rank^skew per layer, token ids
    ~ Zipf; each (token id, layer) has a preferred top-k set drawn from that popularity and an
    occurrence keeps it with probability ``stickiness`` (so token-id predictors can learn it), else
    draws afresh. Prefill of random length then ``decode_steps`` decode steps per request."""
    lens = rng.integers(prompt_len[0], prompt_len[1] + 1, n_requests)
    per = lens + decode_steps
    req = np.repeat(np.arange(n_requests), per)
    pos = np.concatenate([np.arange(n) for n in per])
    step = np.maximum(pos - np.repeat(lens, per) + 1, 0)
    T = len(req)
    freq = 1.0 / np.arange(1, vocab + 1) ** 1.1
    token = rng.choice(vocab, T, p=freq / freq.sum())
    experts = np.empty((T, n_layers, top_k), dtype=np.int16)
    for layer in range(n_layers):
        logp = -skew * np.log(np.arange(1, n_experts + 1))[rng.permutation(n_experts)]
        preferred = np.argsort(-(logp + rng.gumbel(size=(vocab, n_experts))), axis=1)[:, :top_k]
        fresh = np.argsort(-(logp + rng.gumbel(size=(T, n_experts))), axis=1)[:, :top_k]
        keep = rng.random(T) < stickiness
        experts[:, layer] = np.where(keep[:, None], preferred[token], fresh)
    meta = TraceMeta(model=f"synthetic-skew{skew:g}", n_layers=n_layers, n_experts=n_experts, top_k=top_k,
                     source="synthetic", tokenizer=f"synthetic:zipf-{vocab}",
                     notes=f"moegps.workloads.synthetic_trace(skew={skew}, stickiness={stickiness})")
    return RoutingTrace.from_token_major(meta, req, step, pos, token, experts).validate()


# ---- trace specs ----------------------------------------------------------------------------------


def load_trace(spec: str, limit: int | None = None, seed: int = 0, skew: float = 1.0,
               synthetic: dict | None = None) -> RoutingTrace:
    """The trace a spec names: ``"deepseek"`` (the shared DeepSeek-V2-Lite CSVs), ``"random"`` (a
    small skewed synthetic trace), ``"synthetic"`` (:func:`synthetic_trace` with ``skew`` and the
    ``synthetic`` arguments), a folder of DeepSeek-style CSVs, or a RoutingTrace parquet file or
    folder. ``limit`` keeps the first N requests by id (the first N files of a CSV folder)."""
    spec = str(spec)
    expected = all_or_first_n(limit)  # the commands' own rule, for callers that bypass their configs
    if expected:
        raise ValueError(f"config field 'limit' is {limit!r}, expected {expected}")
    if spec == "random":
        return random_trace(np.random.default_rng(seed), n_requests=limit or 400, prompt_len=(8, 64),
                            decode_steps=16, n_layers=4, n_experts=16, top_k=2)
    if spec == "synthetic":
        kwargs = dict(synthetic or {})
        if "prompt_len" in kwargs:
            kwargs["prompt_len"] = tuple(kwargs["prompt_len"])
        return synthetic_trace(np.random.default_rng(seed), skew, n_requests=limit or 200, **kwargs)
    path = shared_data("traces", "deepseek-v2-lite-puffin") if spec == "deepseek" else Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"trace {spec!r}: not one of {list(NAMED_TRACES)} and no such file or folder "
                                "(expected a RoutingTrace parquet file/folder or a folder of DeepSeek CSVs)")
    if path.is_dir() and any(path.glob("*.csv")) and not any(path.glob("*.parquet")):
        return require_rows(read_deepseek_csv(path, limit), str(path))
    trace = require_rows(RoutingTrace.read(path), str(path))
    if limit is not None:
        trace = trace.with_requests(trace.requests()[:limit])
    return trace


def trace_files(spec: str) -> tuple[Path | None, list[Path]]:
    """(the folder a trace's files are named from, the files a trace spec reads, sorted); (None, [])
    for a trace made in code (random, synthetic)."""
    spec = str(spec)
    if spec in ("random", "synthetic"):
        return None, []
    path = shared_data("traces", "deepseek-v2-lite-puffin") if spec == "deepseek" else Path(spec)
    if path.is_file():
        return path.parent, [path]
    return path, sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))


_FINGERPRINTS: dict[tuple, str] = {}


def fingerprint(spec: str | None) -> str | None:
    """16 hex digits of the SHA-256 of a trace's content: every file it reads (names relative to the
    trace, bytes); the spec itself for a trace made in code (its config fields decide its content).
    Replacing a file at the same path changes it. Cached per process by each file's size and mtime."""
    if spec is None:
        return None
    root, files = trace_files(spec)
    if root is None:
        return str(spec)
    stats = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if stats not in _FINGERPRINTS:
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(root)).encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        _FINGERPRINTS[stats] = h.hexdigest()[:16]
    return _FINGERPRINTS[stats]


def require_rows(trace: RoutingTrace, where: str) -> RoutingTrace:
    """``trace`` when it holds rows; an error naming ``where`` when it is empty (valid metadata, no
    tokens): every figure computed from it would be a default (imbalance 1, a blank table), not a result."""
    if len(trace) == 0:
        raise TraceError(f"{where}: the trace holds no rows (0 requests, 0 tokens); nothing to fit, place or "
                         "report. Record or import it again (the recording may have stopped before its first shard)")
    return trace


# ---- the model a trace is of ------------------------------------------------------------------------


def trace_shape(meta: TraceMeta, name: str | None = None) -> ModelShape:
    """The model shape (:mod:`moegps.shapes`) to cost a trace with, with the trace's expert count and
    top-k: the shape ``name``d; else the trace's own model (its Hugging Face config when it has one,
    else a registry shape whose name its model name contains, e.g. DeepSeek-V2-Lite's import); else,
    for a model the registry lacks (a synthetic trace), the real model of its expert count
    (DeepSeek-V2-Lite from 64 experts up, else Mixtral-8x7B), named so."""
    counts = {"n_experts": meta.n_experts, "top_k": meta.top_k}
    if name:
        return from_name(name, **counts)
    config = meta.model_config or {}
    if config.get("hidden_size") and config.get("vocab_size") and config.get("num_attention_heads"):
        try:
            return from_hf_config(config, name=meta.model).replace(**counts)
        except ValueError:
            pass  # an incomplete config: go by name
    model = meta.model.lower()
    for key in SHAPES:
        if key in model:
            return from_name(key, **counts)
    fallback = "deepseek-v2-lite" if meta.n_experts >= 64 else "mixtral-8x7b"
    return from_name(fallback, **counts).replace(name=f"{fallback} (by expert count)")


# ---- token-id spaces --------------------------------------------------------------------------------


def token_space(meta: TraceMeta) -> str:
    """The space a trace's token ids live in: ``vocab:<digest>`` for a vocabulary that travels with
    the trace, else ``tokenizer:<name>`` (empty name: unknown)."""
    vocab = (meta.model_config or {}).get("token_vocab")
    if vocab:
        return "vocab:" + hashlib.sha1("\n".join(vocab).encode()).hexdigest()[:12]
    return f"tokenizer:{meta.tokenizer}"


def align_token_ids(trace: RoutingTrace, reference: RoutingTrace) -> RoutingTrace:
    """``trace`` with its token ids re-encoded onto ``reference``'s vocabulary when both carry one
    (strings ``reference`` never saw get new ids after its vocabulary's); unchanged otherwise."""
    ref_vocab = (reference.meta.model_config or {}).get("token_vocab")
    own_vocab = (trace.meta.model_config or {}).get("token_vocab")
    if not ref_vocab or not own_vocab or token_space(trace.meta) == token_space(reference.meta):
        return trace
    index = {s: i for i, s in enumerate(ref_vocab)}
    unseen = [s for s in own_vocab if s not in index]
    vocab = list(ref_vocab) + unseen
    index.update({s: len(ref_vocab) + i for i, s in enumerate(unseen)})
    mapping = np.array([index[s] for s in own_vocab], dtype=np.int64)
    ids = np.asarray(trace.token_id)
    new_ids = np.where(ids >= 0, mapping[np.clip(ids, 0, None)], ids)
    config = {**trace.meta.model_config, "token_vocab": vocab, "token_vocab_size": len(vocab)}
    return dataclasses.replace(trace, meta=dataclasses.replace(trace.meta, model_config=config), token_id=new_ids)


class TokenSpaceError(TraceError):
    """Token ids of a training and a test trace that come from different id spaces."""


def check_token_space(train: RoutingTrace, test: RoutingTrace, where: str = "") -> None:
    """Raise when ``train`` and ``test`` token ids live in different spaces (a token predictor fitted
    on one and scored on the other would compare unrelated numbers). A test vocabulary that extends
    the training one (new strings after it, :func:`align_token_ids`) is the same space."""
    a, b = token_space(train.meta), token_space(test.meta)
    train_vocab = (train.meta.model_config or {}).get("token_vocab")
    test_vocab = (test.meta.model_config or {}).get("token_vocab")
    if train_vocab and test_vocab and test_vocab[:len(train_vocab)] == train_vocab:
        return  # the test vocabulary extends the training one (align_token_ids): one id space
    if a != b:
        raise TokenSpaceError(f"{where or 'train/test'}: token ids of the training trace ({train.meta.model}, {a}) and "
                         f"the test trace ({test.meta.model}, {b}) come from different id spaces; token predictors "
                         "cannot be fitted on one and scored on the other. Import both with one vocabulary "
                         "(python -m moegps.importers deepseek-csv A B ...) or record both with one tokenizer")


# ---- splits -------------------------------------------------------------------------------------------


def split_by_request(trace: RoutingTrace, test_fraction: float = 0.2, seed: int = 0,
                     split: str = "arrival") -> tuple[RoutingTrace, RoutingTrace]:
    """(train, test) traces holding disjoint sets of whole requests, ``test_fraction`` of them in test:
    the last ones by request id (``split="arrival"``) or a ``seed``-ed random draw (``"random"``)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    ids = trace.requests()  # sorted: arrival order
    if len(ids) < 2:
        raise ValueError(f"trace '{trace.meta.model}' has {len(ids)} request(s); a split into train and test needs at "
                         "least 2 (raise config field 'limit', or give 'train' and 'test' traces)")
    n_test = min(len(ids) - 1, max(1, int(round(test_fraction * len(ids)))))
    test_ids = ids[-n_test:] if split == "arrival" else np.random.default_rng(seed).permutation(ids)[:n_test]
    is_test = np.isin(trace.request_id, test_ids)
    return trace.select(~is_test), trace.select(is_test)


@dataclass
class TrainTest:
    """Training and test requests, and how they were obtained (:meth:`describe`)."""

    train: RoutingTrace
    test: RoutingTrace
    how: str  # "split" (one trace) | "traces" (train= and test= given)
    source: str  # the spec(s)
    split: str = "arrival"
    test_fraction: float | None = None
    seed: int = 0

    @property
    def meta(self) -> TraceMeta:
        """The model and shape side of the workload (the training trace's metadata)."""
        return self.train.meta

    @property
    def name(self) -> str:
        return self.train.meta.model

    def describe(self) -> str:
        """One line stating the protocol, for every command's output."""
        n_train, n_test = len(self.train.requests()), len(self.test.requests())
        if self.how == "traces":
            return (f"out of sample: fitted on {n_train} requests of {self.source.split(' -> ')[0]}, "
                    f"scored on {n_test} requests of {self.source.split(' -> ')[1]}")
        order = ("arrival order (the last requests by id are the test set)" if self.split == "arrival"
                 else f"a random draw (seed {self.seed})")
        return (f"out of sample: {self.source} split by request in {order}: {n_train} train / {n_test} test "
                f"requests (test_fraction {self.test_fraction:g})")

    def as_row(self) -> dict:
        """The split's fields for a results row."""
        return {"split": self.split if self.how == "split" else "traces", "test_fraction": self.test_fraction,
                "n_train_requests": len(self.train.requests()), "n_test_requests": len(self.test.requests())}


def train_test(trace: str | RoutingTrace | None = None, train: str | RoutingTrace | None = None,
               test: str | RoutingTrace | None = None, test_fraction: float = 0.2, split: str = "arrival",
               seed: int = 0, limit: int | None = None, **load_kwargs) -> TrainTest:
    """Training and test requests: ``train`` and ``test`` traces (specs or traces), or one ``trace``
    split by request (:func:`split_by_request`). Token ids of the test trace are re-encoded onto the
    training trace's vocabulary when both carry one. Errors name the field at fault."""
    if (train is None) != (test is None):
        raise ValueError("config fields 'train' and 'test' go together: give both (two traces) or neither "
                         "(then 'trace' is split by request)")

    def load(spec):
        return spec if isinstance(spec, RoutingTrace) else load_trace(spec, limit, seed, **load_kwargs)

    if train is not None:
        tr, te = load(train), load(test)
        for field in ("n_layers", "n_experts", "top_k"):
            if getattr(tr.meta, field) != getattr(te.meta, field):
                raise ValueError(f"train and test traces differ in {field}: {getattr(tr.meta, field)} "
                                 f"({_label(train)}) vs {getattr(te.meta, field)} ({_label(test)})")
        return TrainTest(tr, align_token_ids(te, tr), "traces", f"{_label(train)} -> {_label(test)}", seed=seed)
    if trace is None:
        raise ValueError("config field 'trace' is empty: name a trace (or give 'train' and 'test')")
    full = load(trace)
    tr, te = split_by_request(full, test_fraction, seed=seed, split=split)
    return TrainTest(tr, te, "split", _label(trace), split, test_fraction, seed)


def _label(spec) -> str:
    return spec.meta.model if isinstance(spec, RoutingTrace) else str(spec)
