"""Real Mixtral-8x7B and OLMoE-1B-7B routing statistics (``olmoe-routing/``) as numpy arrays.

The files come from the OLMoE paper's routing analysis (allenai/OLMoE,
``scripts/run_routing_analysis.py``): each domain text was tokenised whole with the model's own
tokenizer, cut into 102 sequences of 2,048 tokens (208,896 tokens per domain), and one forward
pass per sequence recorded the top-k expert ids (by router logit) at layers 0, 7 and 15.

- ``expert_counts/<domain>.pkl``: ``[Counter(expert -> selections)] * 3`` (layers 0, 7, 15);
  every layer sums to 208,896 x top_k.
- ``expert_counts_top1/``: the same for the first (highest-logit) choice only.
- ``expert_counts_crosslayer/<domain>.pkl``: ``[Counter((a, b) -> n)] * 2`` for layer pairs (0, 7)
  and (7, 15). The pairs are *slot-aligned*: the i-th choice of a token at layer a is paired with
  its i-th choice at layer b (the script zips the flattened ``[token, k]`` id arrays), so each
  matrix sums to 208,896 x top_k, not x top_k**2.
- ``eid2token/<domain>.pkl``: ``[defaultdict(Counter)] * 3``, one per layer: expert -> Counter of
  the token ids (the model's tokenizer) routed to it. ``olmoe/eid2token/c4.pkl`` is missing upstream.

These are aggregate counts: real load vectors, but with no token order, batches or sequences.
All files are read through :mod:`moegps.safe_pickle`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..paths import shared_data
from ..trace import ExpertLoads
from .. import safe_pickle

LAYER_IDS = [0, 7, 15]
LAYER_PAIRS = [(0, 7), (7, 15)]
DOMAINS = ["arxiv", "book", "c4", "github", "wikipedia"]
# the domain corpus each statistic was computed on (olmoe-routing/text/)
DOMAIN_TEXT = {
    "arxiv": "arxiv_texts.txt",
    "book": "b3g_texts.txt",
    "c4": "c4_texts.txt",
    "github": "github_oss_with_stack_texts.txt",
    "wikipedia": "wikipedia_texts.txt",
}
TOKENS_PER_DOMAIN = 102 * 2048  # 208,896
MODELS = {
    # name: (n_experts, top_k, tokenizer vocabulary size, model id)
    "mistral": (8, 2, 32000, "mistralai/Mixtral-8x7B-v0.1"),
    "olmoe": (64, 8, 50304, "OLMoE/OLMoE-1B-7B-0824"),
    "olmoe-sft": (64, 8, 50304, "OLMoE-1B-7B SFT"),
    "olmoe-dpo": (64, 8, 50304, "OLMoE-1B-7B DPO"),
}


def _model(model: str) -> tuple[int, int, int, str]:
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    return MODELS[model]


def routing_file(model: str, kind: str, domain: str) -> Path:
    """Path of ``olmoe-routing/<model>/<kind>/<domain>.pkl`` with a clear error if it is absent."""
    _model(model)
    folder = shared_data("olmoe-routing", model, kind) if kind else None
    path = folder / f"{domain}.pkl"
    if not path.exists():
        have = sorted(p.stem for p in folder.glob("*.pkl"))
        raise FileNotFoundError(f"{path}: no {kind} statistics for domain '{domain}' of {model}; available: {have}")
    return path


def available_domains(model: str, kind: str = "expert_counts") -> list[str]:
    """Domains with a file of ``kind``, the five paper domains first, then any others (e.g. tulu)."""
    folder = shared_data("olmoe-routing", model, kind)
    have = {p.stem for p in folder.glob("*.pkl")}
    return [d for d in DOMAINS if d in have] + sorted(have - set(DOMAINS))


def _counter_vector(counter, n_experts: int, where: str) -> np.ndarray:
    out = np.zeros(n_experts, dtype=np.int64)
    for e, n in counter.items():
        e = int(e)
        if not 0 <= e < n_experts:
            raise ValueError(f"{where}: expert id {e} outside 0..{n_experts - 1}")
        out[e] += int(n)
    return out


def load_expert_counts(model: str = "mistral", domains: list[str] | None = None, top1: bool = False) -> ExpertLoads:
    """Real per-layer expert loads: ``counts[domain, layer, expert]`` (selections), layers 0, 7, 15.

    ``domains=None`` takes every domain with a file. ``top1=True`` reads the first-choice-only
    counts (``top_k`` is then 1). The result is marked ``aggregate=True``.
    """
    n_experts, top_k, _, _ = _model(model)
    kind = "expert_counts_top1" if top1 else "expert_counts"
    domains = list(domains) if domains is not None else available_domains(model, kind)
    counts = np.zeros((len(domains), len(LAYER_IDS), n_experts), dtype=np.int64)
    for i, d in enumerate(domains):
        path = routing_file(model, kind, d)
        layers = safe_pickle.load(path)
        if not isinstance(layers, list) or len(layers) != len(LAYER_IDS):
            raise ValueError(f"{path}: expected a list of {len(LAYER_IDS)} Counters (layers {LAYER_IDS})")
        for j, c in enumerate(layers):
            counts[i, j] = _counter_vector(c, n_experts, f"{path} [layer {LAYER_IDS[j]}]")
    return ExpertLoads(
        counts=counts,
        groups={"domain": np.array(domains)},
        layer_ids=list(LAYER_IDS),
        top_k=1 if top1 else top_k,
        source=f"olmoe-routing/{model}/{kind} ({_model(model)[3]}, real, aggregate)",
        aggregate=True,
    )


def load_crosslayer_counts(model: str, domain: str, top1: bool = False) -> dict[tuple[int, int], np.ndarray]:
    """``{(la, lb): counts[E, E]}`` for (0, 7) and (7, 15): slot-aligned pairs (see module docstring).

    ``counts[a, b]`` = number of (token, slot i) whose i-th expert is ``a`` at layer ``la`` and
    ``b`` at layer ``lb``; each matrix sums to tokens x top_k (tokens for ``top1``).
    """
    n_experts = _model(model)[0]
    path = routing_file(model, "expert_counts_crosslayer_top1" if top1 else "expert_counts_crosslayer", domain)
    pairs = safe_pickle.load(path)
    if not isinstance(pairs, list) or len(pairs) != len(LAYER_PAIRS):
        raise ValueError(f"{path}: expected a list of {len(LAYER_PAIRS)} Counters (layer pairs {LAYER_PAIRS})")
    out = {}
    for (la, lb), counter in zip(LAYER_PAIRS, pairs):
        m = np.zeros((n_experts, n_experts), dtype=np.int64)
        for key, n in counter.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ValueError(f"{path} [layers {la}->{lb}]: key {key!r} is not an (expert, expert) pair")
            a, b = int(key[0]), int(key[1])
            if not (0 <= a < n_experts and 0 <= b < n_experts):
                raise ValueError(f"{path} [layers {la}->{lb}]: pair {(a, b)} outside 0..{n_experts - 1}")
            m[a, b] += int(n)
        out[(la, lb)] = m
    return out


def load_eid2token(model: str, domain: str) -> list[sp.csr_matrix]:
    """Per layer (0, 7, 15), a sparse ``counts[expert, token_id]`` (int64, CSR, vocabulary wide).

    ``counts[e, v]`` = how many occurrences of token id ``v`` chose expert ``e`` (any slot).
    Column sums are top_k x the token id's frequency in the domain text.
    """
    n_experts, _, vocab, _ = _model(model)
    path = routing_file(model, "eid2token", domain)
    layers = safe_pickle.load(path)
    if not isinstance(layers, list) or len(layers) != len(LAYER_IDS):
        raise ValueError(f"{path}: expected a list of {len(LAYER_IDS)} expert->Counter maps (layers {LAYER_IDS})")
    out = []
    for layer_id, per_expert in zip(LAYER_IDS, layers):
        rows, cols, vals = [], [], []
        for e, counter in per_expert.items():
            e = int(e)
            if not 0 <= e < n_experts:
                raise ValueError(f"{path} [layer {layer_id}]: expert id {e} outside 0..{n_experts - 1}")
            ids = np.fromiter(counter.keys(), dtype=np.int64, count=len(counter))
            if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
                raise ValueError(f"{path} [layer {layer_id}, expert {e}]: token id outside 0..{vocab - 1}")
            rows.append(np.full(len(ids), e, dtype=np.int64))
            cols.append(ids)
            vals.append(np.fromiter(counter.values(), dtype=np.int64, count=len(counter)))
        m = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_experts, vocab), dtype=np.int64
        )
        m.sum_duplicates()
        out.append(m)
    return out


def domain_text_path(domain: str) -> Path:
    """The input text the statistics of ``domain`` were computed on."""
    if domain not in DOMAIN_TEXT:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    return shared_data("olmoe-routing", "text", DOMAIN_TEXT[domain])
