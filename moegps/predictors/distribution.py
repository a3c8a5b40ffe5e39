"""Distribution-only predictors: each layer's expert-load fractions for the next batch.

All return ``[layer, expert]`` float64 fractions (rows sum to 1) from
``predict_next(past_loads [t, layer, expert] counts, context: BatchContext)``. What each reads:

==================  ===========================================================  ==============
name                reads at run time                                            state
==================  ===========================================================  ==============
uniform             nothing                                                      none
global_profile      nothing (the per-layer MLE of the training trace: MoE-GPS)   [L, E]
phase_profile       context.phase                                                [2, L, E]
step_profile        context.steps (a profile per generation step, offline)       [S, L, E]
last_batch          past_loads, past_phase (last batch of the same phase)        none
sliding_window      past_loads, past_phase (last ``window`` same-phase batches)  none
ema                 past_loads, past_phase (EMA of same-phase batch fractions)   none
own_prefill         context.request_prefill_loads (decode: blend of the batch    [2, L, E] + a
                    requests' own prefill routing with the decode profile)
token_mix           context.token_ids (mean of P(expert | token id) per layer)   [V, L, E]
learned             past_loads, phase, batch size, hashed bag of token ids       ridge/GBM
from_tokens         context.tokens -> a token predictor, counts aggregated       its token model
==================  ===========================================================  ==============

Recent-history predictors fall back to the fitted phase profile until they have history.
"""

from __future__ import annotations

import math

import numpy as np

from ..trace import DECODE, PREFILL, RoutingTrace
from .base import BatchContext, PredictorCost, TokenPredictor, normalize, register

FLOAT = 8  # bytes of a float64 state entry


class _Distribution:
    """Shared fitted state: the phase profiles (also every predictor's fallback)."""

    name = "distribution"
    family = "distribution"

    def fit(self, train: RoutingTrace):
        m = train.meta
        self.n_layers, self.n_experts, self.top_k = m.n_layers, m.n_experts, m.top_k
        self.profile = normalize(train.loads(by="all").counts[0])
        self.phase_profiles = np.stack([self.profile, self.profile])
        for ph, label in ((PREFILL, "prefill"), (DECODE, "decode")):
            c = train.loads(by="all", phase=label).counts[0]
            if c.sum() > 0:
                self.phase_profiles[ph] = normalize(c)
        return self

    def _cost(self, **kw) -> PredictorCost:
        # latencies measured by bench.measure_latency on this predictor (CPU, and CUDA if run there)
        return PredictorCost(name=self.name, family=self.family, latency_s=dict(getattr(self, "latency_s", {})),
                             gpu_latency_s=getattr(self, "gpu_latency_s", None), **kw)


@register("uniform")
class Uniform(_Distribution):
    name = "uniform"

    def predict_next(self, past_loads, context):
        return np.full((self.n_layers, self.n_experts), 1.0 / self.n_experts)

    def cost(self):
        return self._cost()


@register("global_profile")
class GlobalProfile(_Distribution):
    """MoE-GPS's distribution predictor: the training trace's per-layer load fractions (MLE)."""

    name = "global_profile"

    def predict_next(self, past_loads, context):
        return self.profile

    def cost(self):
        # known before serving: placement is computed once offline, nothing runs per batch
        return self._cost(memory_bytes=self.profile.size * FLOAT)


@register("phase_profile")
class PhaseProfile(_Distribution):
    """Separate MLE profiles for prefill and decode batches."""

    name = "phase_profile"

    def predict_next(self, past_loads, context):
        return self.phase_profiles[context.phase]

    def cost(self):
        return self._cost(memory_bytes=self.phase_profiles.size * FLOAT, inputs=("phase",))


@register("step_profile")
class StepProfile(_Distribution):
    """A profile per generation step: prefill (step 0) and each decode step ``s`` get their own MLE.

    Decode batches of a static-batching server hold one step of each request; when requests
    generate similar text (templates, answer formats), the tokens fed in at step ``s`` and so
    the loads depend on ``s`` far more than one decode profile says. The table is fitted offline
    and costs nothing per batch beyond a lookup; a batch mixing steps (continuous batching) gets
    the token-weighted mean of its steps' profiles. Each step's counts are smoothed towards the
    phase profile with ``prior`` pseudo-tokens, so rare steps fall back to it; steps beyond
    ``max_step`` share the row of ``max_step``.
    """

    name = "step_profile"

    def __init__(self, max_step: int = 256, prior: float = 16.0):
        if max_step < 1 or prior < 0:
            raise ValueError(f"step_profile: max_step must be >= 1 and prior >= 0, got {max_step}, {prior}")
        self.max_step, self.prior = int(max_step), float(prior)

    def fit(self, train):
        super().fit(train)
        L, E, k = self.n_layers, self.n_experts, self.top_k
        S = min(self.max_step, int(train.step.max()) if len(train.step) else 0) + 1
        step = np.minimum(train.step.astype(np.int64), S - 1)
        flat = (step[:, None] * L + train.layer[:, None].astype(np.int64)) * E + train.experts
        counts = np.bincount(flat.reshape(-1), minlength=S * L * E).reshape(S, L, E) / k  # tokens per expert
        phase_of_step = np.where(np.arange(S) == 0, PREFILL, DECODE)
        n = counts.sum(-1, keepdims=True)
        self.table = (counts + self.prior * self.phase_profiles[phase_of_step]) / np.maximum(n + self.prior, 1e-12)
        return self

    def predict_next(self, past_loads, context):
        if context.steps is None or len(context.steps) == 0:
            return self.phase_profiles[context.phase]
        w = np.bincount(np.minimum(np.asarray(context.steps, dtype=np.int64), len(self.table) - 1),
                        minlength=len(self.table))
        return normalize(np.tensordot(w / w.sum(), self.table, axes=1))

    def cost(self):
        le = self.n_layers * self.n_experts
        # a static batch is one step: one row read; a mixed batch reads one row per distinct step
        return self._cost(flops_per_token=1.0, bytes_per_batch=le * FLOAT, memory_bytes=self.table.size * FLOAT,
                          inputs=("phase", "steps"))


def same_phase_history(past_loads: np.ndarray, past_phase: np.ndarray | None, phase: int, m: int) -> np.ndarray:
    """The last ``m`` (or fewer) batches of ``phase`` in ``past_loads``, oldest first: ``[<=m, L, E]``.

    Scans backwards in growing chunks, so a call costs O(m x gap between same-phase batches), not O(t).
    """
    t = len(past_loads)
    if past_phase is None:
        return past_loads[max(0, t - m):]
    chunk, start = max(2 * m, 16), t
    found: list[np.ndarray] = []
    n_found = 0
    while start > 0 and n_found < m:
        lo = max(0, start - chunk)
        idx = lo + np.flatnonzero(past_phase[lo:start] == phase)
        found.append(idx)
        n_found += len(idx)
        start, chunk = lo, chunk * 2
    idx = np.sort(np.concatenate(found))[-m:] if found else np.zeros(0, dtype=np.int64)
    return past_loads[idx]


class _Recent(_Distribution):
    history = 1  # batches read

    def predict_next(self, past_loads, context):
        recent = same_phase_history(past_loads, context.past_phase, context.phase, self.history)
        if len(recent) == 0:
            return self.phase_profiles[context.phase]
        return self.combine(recent)

    def cost(self):
        le = self.n_layers * self.n_experts
        return self._cost(
            flops_per_batch=2.0 * self.history * le, bytes_per_batch=self.history * le * FLOAT,
            memory_bytes=self.history * le * FLOAT, inputs=("past_loads", "past_phase"),
        )


@register("last_batch")
class LastBatch(_Recent):
    name = "last_batch"

    def combine(self, recent):
        return normalize(recent[-1])


@register("sliding_window")
class SlidingWindow(_Recent):
    """Token-weighted load fractions over the last ``window`` batches of the same phase."""

    name = "sliding_window"

    def __init__(self, window: int = 8):
        self.history = int(window)
        self.name = f"sliding_window_{window}"

    def combine(self, recent):
        return normalize(recent.sum(axis=0))


@register("ema")
class EMA(_Recent):
    """Exponential moving average of same-phase batch fractions, weight ``decay**age``.

    Truncated where ``decay**age < 1e-3`` (so the call cost is bounded; the tail it drops is <0.1%).
    """

    name = "ema"

    def __init__(self, decay: float = 0.7):
        if not 0 <= decay < 1:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.history = 1 if decay == 0 else max(1, math.ceil(math.log(1e-3) / math.log(decay)))
        self.name = f"ema_{decay:g}"

    def combine(self, recent):
        w = self.decay ** np.arange(len(recent))[::-1]
        return normalize(np.tensordot(w, normalize(recent), axes=1))


@register("own_prefill")
class OwnPrefill(_Distribution):
    """Decode batches: ``a * mean(own prefill fractions of the batch's requests) + (1-a) * decode profile``.

    ``a`` is fitted on the training requests (grid search, least L1 per request); prefill batches
    get the prefill profile (nothing of the batch has run yet).
    """

    name = "own_prefill"

    def __init__(self, grid: int = 21):
        self.grid = grid

    def fit(self, train):
        super().fit(train)
        pre = train.loads(by="request", phase="prefill")
        dec = train.loads(by="request", phase="decode")
        both, ip, idc = np.intersect1d(pre.groups["request_id"], dec.groups["request_id"], return_indices=True)
        self.alpha = 0.0
        if len(both):
            p = normalize(pre.counts[ip])
            d = normalize(dec.counts[idc])
            alphas = np.linspace(0, 1, self.grid)
            errs = [np.abs(a * p + (1 - a) * self.phase_profiles[DECODE] - d).sum(-1).mean() for a in alphas]
            self.alpha = float(alphas[int(np.argmin(errs))])
        return self

    def predict_next(self, past_loads, context):
        rpl = context.request_prefill_loads
        if context.phase == PREFILL or rpl is None or len(rpl) == 0:
            return self.phase_profiles[context.phase]
        own = normalize(rpl).mean(axis=0)
        return self.alpha * own + (1 - self.alpha) * self.phase_profiles[DECODE]

    def cost(self):
        le = self.n_layers * self.n_experts
        return self._cost(
            flops_per_batch=3.0 * le, bytes_per_batch=le * FLOAT, bytes_per_token=le * FLOAT,
            memory_bytes=self.phase_profiles.size * FLOAT, inputs=("phase", "request_prefill_loads"),
        )


def hashed_bag(token_ids: np.ndarray, n_buckets: int) -> np.ndarray:
    """``[n_buckets]`` float64 share of the batch's tokens per hash bucket (multiplicative hash)."""
    h = (np.asarray(token_ids, dtype=np.uint64) * np.uint64(2654435761)) % np.uint64(n_buckets)
    return np.bincount(h.astype(np.int64), minlength=n_buckets) / max(len(token_ids), 1)


@register("learned")
class Learned(_Distribution):
    """A regression from cheap batch features to the next batch's load fractions.

    Features: phase, log batch size (tokens), the last same-phase batch's fractions ``[L*E]``
    (phase profile when none) and a hashed bag of the batch's token ids (``n_buckets``). Target:
    the batch's fractions minus its phase profile, so the model learns only the correction.
    ``model="ridge"`` (scikit-learn, multi-output, closed form) or ``"lightgbm"`` (one booster
    per principal component of the target, ``n_components``). Trained on batches formed from the
    training trace exactly as the evaluation forms them (``batch_requests``), in the trace's own
    request order plus ``n_orders - 1`` shuffled orders (at most ``max_train_batches`` batches in all,
    sampled evenly from the orders).
    """

    name = "learned"

    def __init__(self, model: str = "ridge", batch_requests: int = 8, n_buckets: int = 512,
                 alpha: float = 1.0, n_orders: int = 4, n_components: int = 16, n_estimators: int = 60,
                 use_history: bool = True, max_train_batches: int = 8000, seed: int = 0):
        if model not in ("ridge", "lightgbm"):
            raise ValueError(f"learned: model must be 'ridge' or 'lightgbm', got {model!r}")
        self.model, self.batch_requests, self.n_buckets, self.alpha = model, batch_requests, n_buckets, alpha
        self.n_orders, self.n_components, self.n_estimators, self.seed = n_orders, n_components, n_estimators, seed
        self.use_history, self.max_train_batches = use_history, max_train_batches
        self.name = f"learned_{model}"

    def features(self, past_loads, context) -> np.ndarray:
        parts = [np.array([float(context.phase), math.log1p(context.n_tokens)])]
        if self.use_history:
            last = same_phase_history(past_loads, context.past_phase, context.phase, 1)
            parts.append((normalize(last[-1]) if len(last) else self.phase_profiles[context.phase]).reshape(-1))
        ids = context.token_ids if context.token_ids is not None else np.zeros(0, dtype=np.int64)
        parts.append(hashed_bag(ids, self.n_buckets))
        return np.concatenate(parts)

    def fit(self, train):
        from .batching import batch_context, batch_stream

        super().fit(train)
        tr = train.by_token()
        X, Y = [], []
        for i in range(self.n_orders):
            # order 0 keeps the trace's own request order (any temporal pattern in it); the rest
            # are shuffles that add batch compositions for the token-bag features
            s = batch_stream(train, self.batch_requests, seed=None if i == 0 else self.seed + i, window=1, tr=tr)
            picks = np.arange(len(s))
            per_order = max(1, self.max_train_batches // self.n_orders)
            if len(picks) > per_order:  # large traces: a random subset of batches keeps fit to seconds
                picks = np.sort(np.random.default_rng(self.seed + i).choice(picks, per_order, replace=False))
            for b in picks:
                ctx = batch_context(s, b)
                X.append(self.features(s.loads[:b], ctx))
                Y.append((normalize(s.loads[b]) - self.phase_profiles[ctx.phase]).reshape(-1))
        X, Y = np.asarray(X), np.asarray(Y)
        self.x_mean, self.x_scale = X.mean(0), X.std(0) + 1e-6
        Xs = (X - self.x_mean) / self.x_scale
        if self.model == "ridge":
            from sklearn.linear_model import Ridge

            self.reg = Ridge(alpha=self.alpha * len(X)).fit(Xs, Y)
            self.n_params = self.reg.coef_.size
        else:
            import lightgbm as lgb
            from sklearn.decomposition import PCA

            nc = max(1, min(self.n_components, len(X) - 1, Y.shape[1]))
            self.pca = PCA(n_components=nc, random_state=self.seed).fit(Y)
            Z = self.pca.transform(Y)
            self.boosters = [
                lgb.LGBMRegressor(n_estimators=self.n_estimators, num_leaves=15, learning_rate=0.1,
                                  min_child_samples=5, random_state=self.seed, verbose=-1, n_jobs=1)
                .fit(Xs, Z[:, j]) for j in range(nc)
            ]
            self.n_params = self.pca.components_.size
        self.n_features = X.shape[1]
        return self

    def predict_next(self, past_loads, context):
        x = ((self.features(past_loads, context) - self.x_mean) / self.x_scale)[None]
        if self.model == "ridge":
            delta = self.reg.predict(x)[0]
        else:
            z = np.array([[b.booster_.predict(x)[0] for b in self.boosters]])  # raw booster: no sklearn checks
            delta = self.pca.inverse_transform(z)[0]
        pred = self.phase_profiles[context.phase] + delta.reshape(self.n_layers, self.n_experts)
        return normalize(np.clip(pred, 1e-6, None))

    def cost(self):
        le = self.n_layers * self.n_experts
        if self.model == "ridge":
            flops, params = 2.0 * self.n_features * le, self.reg.coef_.size + le
        else:
            trees = sum(b.booster_.num_trees() for b in self.boosters)
            flops = 4.0 * trees + 2.0 * self.pca.components_.size  # ~4 compares per tree + inverse PCA
            params = self.pca.components_.size + trees * 32
        return self._cost(
            flops_per_batch=flops, flops_per_token=2.0, bytes_per_batch=params * FLOAT, bytes_per_token=4.0,
            memory_bytes=int(params * FLOAT), inputs=("past_loads", "past_phase", "phase", "n_tokens", "token_ids"),
        )


@register("token_mix")
class TokenMix(_Distribution):
    """The mean, over the batch's tokens, of each token id's expert distribution per layer.

    ``P(e | token, layer)`` is counted on the training trace and smoothed towards the phase
    profile with ``prior`` pseudo-tokens (unseen ids get the profile). A soft, distribution-level
    use of the token-id table: it needs only the batch's token ids, which the scheduler has.
    """

    name = "token_mix"

    def __init__(self, prior: float = 5.0):
        self.prior = prior

    def fit(self, train):
        from .base import Vocab

        super().fit(train)
        L, E, k = self.n_layers, self.n_experts, self.top_k
        self.vocab = Vocab(train.token_id)
        idx = self.vocab.index(train.token_id)
        flat = (idx[:, None] * L + train.layer[:, None].astype(np.int64)) * E + train.experts
        counts = np.bincount(flat.reshape(-1), minlength=len(self.vocab) * L * E).reshape(-1, L, E) / k
        counts[0] = 0
        den = counts.sum(-1, keepdims=True) + self.prior
        mix = (counts + self.prior * self.profile) / np.where(den > 0, den, 1)
        self.table = np.where(den > 0, mix, self.profile).astype(np.float32)  # row 0 (unseen ids): the profile
        return self

    def predict_next(self, past_loads, context):
        if context.token_ids is None or len(context.token_ids) == 0:
            return self.phase_profiles[context.phase]
        rows = self.table[self.vocab.index(context.token_ids)]  # [n, L, E]
        return normalize(rows.mean(axis=0, dtype=np.float64))

    def cost(self):
        le = self.n_layers * self.n_experts
        return self._cost(
            flops_per_token=le + np.log2(max(len(self.vocab), 2)), bytes_per_token=le * 4 + 8,
            memory_bytes=self.table.nbytes + self.vocab.ids.nbytes, inputs=("token_ids",),
        )


@register("from_tokens")
class FromTokens(_Distribution):
    """Aggregate a token predictor's per-token experts into each layer's load fractions.

    Lets token-to-expert predictors feed the same placement as distribution predictors; costs
    what the token predictor costs plus a histogram.
    """

    def __init__(self, token: TokenPredictor | str = "token_table", **token_kwargs):
        from .base import make

        self.token = make(token, **token_kwargs) if isinstance(token, str) else token
        self.name = f"from_tokens:{self.token.name}"

    def fit(self, train):
        super().fit(train)
        self.token.fit(train)
        return self

    def predict_next(self, past_loads, context: BatchContext):
        if context.tokens is None:
            raise ValueError(f"{self.name}: BatchContext.tokens is required (the batch's TokenBatch)")
        return loads_from_experts(self.token.predict(context.tokens), self.n_experts)

    def cost(self):
        c = self.token.cost()
        c.name, c.family = self.name, "distribution"
        c.flops_per_token += self.top_k * self.n_layers  # the histogram
        return c


def loads_from_experts(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """``[token, layer, k]`` ids -> ``[layer, expert]`` fractions of the selections."""
    T, L, k = experts.shape
    flat = np.arange(L)[None, :, None] * n_experts + experts
    return normalize(np.bincount(flat.reshape(-1), minlength=L * n_experts).reshape(L, n_experts))
