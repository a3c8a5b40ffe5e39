"""Statistically reconstructed Mixtral-8x7B routing traces, drawn from real aggregate counts.

Real Mixtral-8x7B weights (~90 GB) are out of reach here, but the OLMoE paper's routing statistics
(``olmoe-routing/mistral``, see :mod:`.olmoe_routing`) record, at layers 0, 7 and 15 of the real
model, how often each Mixtral token id chose each expert (``eid2token``, per layer) and how a
token's i-th choice at layer 0 carries to its i-th choice at layer 7, and 7 to 15
(``expert_counts_crosslayer``). From them this module draws a token-level trace for any stream of
Mixtral token ids (MMLU tokenised with :func:`moegps.models.tokenizer.mixtral_tokenizer`, first of
all). The model, per token of id ``v``:

1. **Per-token-id inclusion probabilities** at each layer ``l``:
   ``pi_l(e | v) = (c_l[v, e] + a * 2 * m_l[e]) / (n_v + a)``, where ``c_l[v, e]`` counts the
   occurrences of ``v`` that chose ``e``, ``n_v`` the occurrences of ``v``, ``m_l`` the layer's
   marginal load share and ``a`` (``smoothing``, default 1) a pseudo-count pulling rare ids toward
   the marginal. Unseen ids get ``2 * m_l`` (the layer's marginal). ``sum_e pi = 2``, each ``<= 1``.
2. **Cross-layer affinity** at layers 7 and 15: the real slot-aligned co-occurrence ``C[a, b]`` is
   compared with what token ids alone would give, ``J[a, b] = sum_v c_prev[v, a] c_cur[v, b] / (2 n_v)``
   (the expected slot-aligned count if both layers chose independently given the token id), and the
   ratio ``R = C / J`` tilts the token's probabilities at the next layer:
   ``w(b) = pi_l(b | v) * mean_i R[prev_i, b]`` over its two previous experts, renormalised to
   inclusion probabilities summing to 2 (capped at 1). ``R`` carries only the affinity that token ids
   do not explain; with ``affinity=False`` layers are drawn independently given the token id.
3. **Two distinct experts** are drawn with exactly those inclusion probabilities by systematic
   (Madow) sampling over a random order of the experts; the pair is stored higher-probability first
   (a stand-in for router order: the statistics do not say which of the two had the larger logit).

The result reproduces, on the domain text the statistics came from, the per-layer loads and the
token-id hit rate of the source (tests/test_importers.py measures both, and the cross-layer joint).
It is *not* a real Mixtral trace: no context beyond the token id and the previous sampled layer
enters, and only 3 of Mixtral's 32 layers exist. The trace's metadata says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..models.tokenizer import mixtral_tokenizer
from ..paths import shared_data
from ..prompts import load_mmlu
from ..trace import RoutingTrace, TraceMeta
from .olmoe_routing import (
    DOMAINS, LAYER_IDS, MODELS, domain_text_path, load_crosslayer_counts, load_eid2token, load_expert_counts,
)

MODEL = "mistral"
N_EXPERTS, TOP_K, VOCAB, MODEL_ID = MODELS[MODEL]


@dataclass
class MixtralRoutingStats:
    """Real Mixtral-8x7B counts pooled over ``domains``.

    ``token_expert[l]``: ``[vocab, expert]`` selections of each token id at layer ``LAYER_IDS[l]``;
    ``loads``: ``[layer, expert]`` selections; ``crosslayer[l]``: ``[E, E]`` slot-aligned counts
    from layer ``l-1`` to ``l`` (index 0 unused: None).
    """

    domains: list[str]
    token_expert: np.ndarray  # [layer, vocab, expert] int64
    loads: np.ndarray  # [layer, expert] int64
    crosslayer: list[np.ndarray | None]

    @property
    def token_count(self) -> np.ndarray:
        """``[layer, vocab]`` occurrences of each token id (selections / top_k)."""
        return self.token_expert.sum(axis=-1) // TOP_K


@lru_cache(maxsize=4)
def _stats(domains: tuple[str, ...]) -> MixtralRoutingStats:
    token_expert = np.zeros((len(LAYER_IDS), VOCAB, N_EXPERTS), dtype=np.int64)
    cross = [None] + [np.zeros((N_EXPERTS, N_EXPERTS), dtype=np.int64) for _ in LAYER_IDS[1:]]
    for d in domains:
        for l, m in enumerate(load_eid2token(MODEL, d)):
            token_expert[l] += m.T.toarray()
        pairs = load_crosslayer_counts(MODEL, d)
        for l in range(1, len(LAYER_IDS)):
            cross[l] += pairs[(LAYER_IDS[l - 1], LAYER_IDS[l])]
    loads = load_expert_counts(MODEL, list(domains)).counts.sum(axis=0)
    return MixtralRoutingStats(list(domains), token_expert, loads, cross)


def mixtral_stats(domains: list[str] | None = None) -> MixtralRoutingStats:
    """The pooled real statistics of ``domains`` (default: all five). Cached."""
    return _stats(tuple(domains or DOMAINS))


def token_inclusion_probs(stats: MixtralRoutingStats, smoothing: float = 1.0) -> np.ndarray:
    """``[layer, vocab, expert]`` float64 inclusion probabilities ``pi_l(e | v)`` (rows sum to top_k)."""
    marginal = stats.loads / stats.loads.sum(axis=-1, keepdims=True)  # [layer, expert], sums to 1
    n = stats.token_expert.sum(axis=-1, keepdims=True) / TOP_K  # [layer, vocab, 1]
    prior = TOP_K * marginal[:, None, :]
    return (stats.token_expert + smoothing * prior) / np.maximum(n + smoothing, 1e-12) * (n + smoothing > 0) + prior * (
        n + smoothing <= 0
    )


def affinity_ratio(stats: MixtralRoutingStats, smoothing: float = 1.0, iterations: int = 3) -> list[np.ndarray | None]:
    """Per layer ``l >= 1`` the tilt ``R[a, b]`` applied to ``pi_l(b | v)`` given a previous expert ``a``.

    Starts from ``C / J``: the real slot-aligned co-occurrence over the one expected if both layers
    chose independently given the token id (module doc). Because the drawn pair's slot order and
    the capping at 1 bend that first guess, it is then refined by ``iterations`` fixed-point steps
    ``R <- R * C / D``, where ``D`` is the slot-aligned co-occurrence of a draw over the source's own
    token multiset (the model ignores token order, so the multiset is the source stream). The draws
    use a fixed seed: the same statistics always give the same ``R``. Cached per statistics.
    """
    key = (tuple(stats.domains), smoothing, iterations)
    if key in _RATIO_CACHE:
        return _RATIO_CACHE[key]
    n = stats.token_expert[0].sum(axis=-1) / TOP_K  # [vocab] occurrences
    seen = n > 0
    ratio: list[np.ndarray | None] = [None]
    real = [None] + [c / c.sum() for c in stats.crosslayer[1:]]
    for l in range(1, len(LAYER_IDS)):
        prev = stats.token_expert[l - 1][seen].astype(np.float64)
        cur = stats.token_expert[l][seen].astype(np.float64)
        expected = (prev / (TOP_K * n[seen])[:, None]).T @ cur  # [E, E], sums to tokens x top_k
        expected /= expected.sum()
        ratio.append(np.where(expected > 0, real[l] / np.maximum(expected, 1e-12), 1.0))
    if iterations:
        rng = np.random.default_rng(20250607)
        stream = np.repeat(np.arange(len(n)), n.astype(np.int64))
        stream = rng.choice(stream, size=min(len(stream), 100_000), replace=False)
        pi = token_inclusion_probs(stats, smoothing)
        for _ in range(iterations):
            drawn = _draw(stream, pi, ratio, rng)
            for l in range(1, len(LAYER_IDS)):
                d = np.bincount((drawn[:, l - 1].astype(np.int64) * N_EXPERTS + drawn[:, l]).reshape(-1),
                                minlength=N_EXPERTS * N_EXPERTS).reshape(N_EXPERTS, N_EXPERTS)
                d = d / d.sum()
                ratio[l] = ratio[l] * np.where(d > 0, real[l] / np.maximum(d, 1e-12), 1.0)
                ratio[l] *= N_EXPERTS * N_EXPERTS / ratio[l].sum()
    _RATIO_CACHE[key] = ratio
    return ratio


_RATIO_CACHE: dict = {}


def _draw(token_ids: np.ndarray, pi: np.ndarray, ratio: list | None, rng: np.random.Generator) -> np.ndarray:
    """``experts[token, layer, k]``: layer by layer, token-id probabilities tilted by ``ratio``."""
    out = np.empty((len(token_ids), len(LAYER_IDS), TOP_K), dtype=np.int16)
    for l in range(len(LAYER_IDS)):
        p = pi[l][token_ids]
        if l > 0 and ratio is not None:
            prev = out[:, l - 1].astype(np.int64)
            tilt = (ratio[l][prev[:, 0]] + ratio[l][prev[:, 1]]) * 0.5  # [token, E]
            p = inclusion_from_weights(p * tilt, TOP_K)
        out[:, l] = systematic_sample(p, TOP_K, rng)
    return out


def inclusion_from_weights(weights: np.ndarray, k: int) -> np.ndarray:
    """``[tokens, E]`` non-negative weights -> inclusion probabilities summing to ``k``, each <= 1.

    Proportional to the weights, with any that would exceed 1 fixed at 1 and the rest rescaled.
    """
    w = np.asarray(weights, dtype=np.float64)
    fixed = np.zeros(w.shape, dtype=bool)
    p = w
    for _ in range(w.shape[1]):
        free_w = np.where(fixed, 0.0, w)
        budget = k - fixed.sum(axis=1, keepdims=True)
        p = np.where(fixed, 1.0, budget * free_w / np.maximum(free_w.sum(axis=1, keepdims=True), 1e-300))
        over = (p > 1.0) & ~fixed
        if not over.any():
            break
        fixed |= over
    return p


def systematic_sample(p: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``k`` distinct experts per row with inclusion probabilities ``p`` ``[tokens, E]`` (rows sum
    to ``k``, entries <= 1): Madow's systematic sampling over a random order. Returns ``[tokens, k]``
    int16, sorted by descending ``p``."""
    T, E = p.shape
    order = np.argsort(rng.random((T, E)), axis=1)
    cum = np.cumsum(np.take_along_axis(p, order, axis=1), axis=1)
    cum *= k / cum[:, -1:]
    u = rng.uniform(1e-9, 1 - 1e-9, size=(T, 1))
    hits = np.floor(cum - u) - np.floor(np.concatenate([np.zeros((T, 1)), cum[:, :-1]], axis=1) - u)
    chosen = hits > 0.5
    if not (chosen.sum(axis=1) == k).all():  # cannot happen for valid p; fail loudly if it does
        raise AssertionError("systematic_sample: a row did not get exactly k experts")
    picked = order[chosen].reshape(T, k)
    prob = np.take_along_axis(p, picked, axis=1)
    picked = np.take_along_axis(picked, np.argsort(-prob, axis=1, kind="stable"), axis=1)
    return picked.astype(np.int16)


def draw_experts(
    token_ids: np.ndarray,
    rng: np.random.Generator,
    domains: list[str] | None = None,
    smoothing: float = 1.0,
    affinity: bool = True,
) -> np.ndarray:
    """``experts[token, layer, 2]`` for Mixtral token ids ``[token]`` at layers 0, 7, 15."""
    token_ids = np.asarray(token_ids, dtype=np.int64)
    if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= VOCAB):
        bad = int(token_ids[(token_ids < 0) | (token_ids >= VOCAB)][0])
        raise ValueError(f"token id {bad} outside the Mixtral vocabulary 0..{VOCAB - 1}")
    stats = mixtral_stats(domains)
    pi = token_inclusion_probs(stats, smoothing)
    return _draw(token_ids, pi, affinity_ratio(stats, smoothing) if affinity else None, rng)


def reconstruct_mixtral_trace(
    token_ids_per_request: list[np.ndarray],
    rng: np.random.Generator,
    domains: list[str] | None = None,
    smoothing: float = 1.0,
    affinity: bool = True,
    dataset: str = "",
    request_domain: dict[int, str] | None = None,
) -> RoutingTrace:
    """A reconstructed Mixtral-8x7B prefill trace (layers 0, 7, 15; 8 experts, top-2) for token streams.

    ``token_ids_per_request[r]`` holds request ``r``'s Mixtral token ids ``[tokens]``; every token is a
    prefill token (step 0) at its index in the request. See the module docstring for the model.
    """
    lengths = np.array([len(t) for t in token_ids_per_request], dtype=np.int64)
    token_ids = np.concatenate([np.asarray(t, dtype=np.int64) for t in token_ids_per_request]) if len(lengths) else np.zeros(0, np.int64)
    experts = draw_experts(token_ids, rng, domains, smoothing, affinity)
    domains = list(domains or DOMAINS)
    meta = TraceMeta(
        model=f"{MODEL_ID} (reconstructed)",
        n_layers=len(LAYER_IDS),
        n_experts=N_EXPERTS,
        top_k=TOP_K,
        layer_ids=list(LAYER_IDS),
        model_config={"num_local_experts": N_EXPERTS, "num_experts_per_tok": TOP_K, "num_hidden_layers": 32},
        tokenizer="mistral-common:tokenizer.model.v1",
        dataset=dataset,
        source=f"reconstructed:olmoe-routing/{MODEL}",
        recorded={
            "statistics_domains": domains,
            "smoothing": smoothing,
            "affinity": affinity,
            **({"request_domain": {str(k): v for k, v in request_domain.items()}} if request_domain else {}),
        },
        notes=(
            "NOT a recorded trace: statistically reconstructed from aggregate counts of real Mixtral-8x7B-v0.1 routing "
            f"(OLMoE paper, olmoe-routing/mistral, domains {domains}). Each token's two experts at layers 0, 7, 15 are "
            "drawn from its token id's real expert frequencies at that layer (smoothed toward the layer marginal; "
            "marginal for unseen ids), tilted at layers 7 and 15 by the real cross-layer co-occurrence beyond what "
            "token ids explain. Per-layer loads and token-id hit rates follow the source; context effects do not. "
            "Slot order is higher-probability first, not the router's."
        ),
    )
    T = len(token_ids)
    return RoutingTrace.from_token_major(
        meta,
        request_id=np.repeat(np.arange(len(lengths)), lengths),
        step=np.zeros(T, dtype=np.int32),
        position=np.concatenate([np.arange(n) for n in lengths]) if len(lengths) else np.zeros(0, np.int64),
        token_id=token_ids,
        experts=experts,
    ).validate("reconstructed trace")


def mmlu_token_stream(limit: int | None = None, split: str = "test") -> tuple[list[np.ndarray], list[str]]:
    """MMLU questions (``shared/data/mmlu/<split>``) as zero-shot prompts tokenised with the Mixtral
    tokenizer (BOS first): ``([token ids per question], [subject per question])``, sorted by file."""
    folder = shared_data("mmlu", split)
    prompts = load_mmlu(folder, limit=limit)  # moegps.prompts: the project's one MMLU template
    texts, subjects = [p.text for p in prompts], [p.subject for p in prompts]
    ids = mixtral_tokenizer().encode(texts, bos=True)
    return [np.asarray(x, dtype=np.int64) for x in ids], subjects


def domain_token_stream(domain: str, n_tokens: int = 102 * 2048, chunk: int = 2048) -> list[np.ndarray]:
    """The first ``n_tokens`` Mixtral tokens of a routing-statistics domain text, in ``chunk``-token
    requests: the token stream the real statistics of ``domain`` were counted on (BOS once, at the
    start, as the OLMoE script tokenised the whole file)."""

    text = domain_text_path(domain).read_text(encoding="utf-8")
    # ~2.2 characters per token in these texts: tokenise only a generous prefix
    ids = np.asarray(mixtral_tokenizer().encode(text[: max(4 * n_tokens, 10_000)], bos=True), dtype=np.int64)[:n_tokens]
    return [ids[i : i + chunk] for i in range(0, len(ids), chunk)]


def fidelity(domain: str, rng: np.random.Generator, smoothing: float = 1.0) -> list[dict]:
    """How closely a reconstruction reproduces the real statistics of ``domain`` on its own text.

    Draws the domain's 208,896-token stream from that domain's statistics, with and without the
    cross-layer tilt, and returns one row per layer: total-variation distance between drawn and
    real per-layer load shares (``expert_counts``), the token-id top-2 hit rate of the source
    (``eid2token``) and of the draw, and the total-variation distance between the drawn and real
    slot-aligned cross-layer joint into that layer (layers 7 and 15).
    """
    stream = np.concatenate(domain_token_stream(domain))
    stats = mixtral_stats([domain])
    real_loads = stats.loads / stats.loads.sum(axis=-1, keepdims=True)
    rows = [{"domain": domain, "layer_id": layer_id} for layer_id in LAYER_IDS]
    for affinity in (False, True):
        e = draw_experts(stream, rng, [domain], smoothing=smoothing, affinity=affinity)
        tag = "tilt" if affinity else "no_tilt"
        for l, row in enumerate(rows):
            drawn = np.bincount(e[:, l].reshape(-1), minlength=N_EXPERTS) / e[:, l].size
            row[f"load_tv_{tag}"] = float(0.5 * np.abs(drawn - real_loads[l]).sum())
            counts = np.zeros((VOCAB, N_EXPERTS), dtype=np.int64)
            np.add.at(counts, (np.repeat(stream, TOP_K), e[:, l].reshape(-1).astype(np.int64)), 1)
            row[f"hit_{tag}"] = float(np.sort(counts, axis=1)[:, -TOP_K:].sum() / counts.sum())
            src = stats.token_expert[l]
            row["hit_source"] = float(np.sort(src, axis=1)[:, -TOP_K:].sum() / src.sum())
            if l:
                d = np.bincount((e[:, l - 1].astype(np.int64) * N_EXPERTS + e[:, l]).reshape(-1),
                                minlength=N_EXPERTS**2).reshape(N_EXPERTS, N_EXPERTS)
                real = stats.crosslayer[l]
                row[f"cross_tv_{tag}"] = float(0.5 * np.abs(d / d.sum() - real / real.sum()).sum())
    return rows
