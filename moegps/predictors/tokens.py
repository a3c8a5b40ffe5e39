"""Token-to-expert predictors: each token's top-k experts at each layer, before that layer's router.

``predict(tokens: TokenBatch) -> [token, layer, k]`` int16 expert ids. What each reads, and so
when it can run (MoE-GPS's point: a predictor that needs only the token id and position can
route a token to its experts' GPUs before attention and skip the scatter):

==============  =================================================  ========================
name            reads                                              available
==============  =================================================  ========================
most_frequent   nothing (top-k of each layer's training counts)    before the forward pass
token_table     token_id (table per layer; unseen id -> overall)   before the forward pass
position_table  position (capped at ``max_position``)              before the forward pass
ffn             token_id (embedding -> MLP -> L*E logits, torch)   before the forward pass
sequence        token_id + previous ``window`` ids (GRU, torch)    before the forward pass
cross_layer     routed[:, l-1] (transition table), layer 0: token  after layer l-1's router
lgbm            token_id, position, phase, routed[:, l-1]          after layer l-1's router
mlp             token_id, position, phase, routed[:, l-1] (torch)  after layer l-1's router
==============  =================================================  ========================

"After layer l-1's router" is still before layer l's attention, but on the critical path
between layers. Hidden-state features: traces carry none yet (``TokenBatch.hidden`` is None),
so no predictor uses them; a classifier taking them would append them to ``lgbm``/``mlp``'s inputs.
The torch models train on CPU with fixed seeds on at most ``max_train_tokens`` training tokens.
"""

from __future__ import annotations

import numpy as np

from ..trace import RoutingTrace
from .base import PredictorCost, TokenBatch, Vocab, expert_counts, normalize, register, top_k_ids
from .batching import token_batch

I16, F32 = 2, 4


class _Token:
    name = "token"
    family = "token"

    def _shape(self, train: RoutingTrace):
        m = train.meta
        self.n_layers, self.n_experts, self.top_k = m.n_layers, m.n_experts, m.top_k
        tr = train.by_token()
        self.overall = normalize(
            np.stack([np.bincount(tr.experts[:, l].reshape(-1), minlength=self.n_experts) for l in range(self.n_layers)])
        )  # [L, E]
        return tr

    def _cost(self, **kw) -> PredictorCost:
        # latencies measured by bench.measure_latency on this predictor (CPU, and CUDA if run there)
        return PredictorCost(name=self.name, family=self.family, latency_s=dict(getattr(self, "latency_s", {})),
                             gpu_latency_s=getattr(self, "gpu_latency_s", None), **kw)


@register("most_frequent")
class MostFrequent(_Token):
    name = "most_frequent"

    def fit(self, train):
        self._shape(train)
        self.table = top_k_ids(self.overall, self.top_k)  # [L, k]
        return self

    def predict(self, tokens):
        return np.broadcast_to(self.table, (len(tokens),) + self.table.shape).copy()

    def cost(self):
        return self._cost(bytes_per_batch=self.table.size * I16, memory_bytes=self.table.size * I16,
                          runs_before_attention=True)


class _KeyTable(_Token):
    """Top-k table per (key, layer) from training counts, smoothed towards the overall profile.

    Row 0 is the fallback for keys unseen in training (it holds the overall top-k).
    """

    field = "token_id"

    def __init__(self, smoothing: float = 1.0):
        self.smoothing = smoothing

    def keys(self, tokens: TokenBatch) -> np.ndarray:
        return getattr(tokens, self.field)

    def fit(self, train):
        tr = self._shape(train)
        keys = self.keys(token_batch(tr, window=1, with_routing=False))
        self.vocab = Vocab(keys)
        idx = self.vocab.index(keys)
        V, L, E, k = len(self.vocab), self.n_layers, self.n_experts, self.top_k
        self.table = np.empty((V, L, k), dtype=np.int16)
        for l in range(L):  # per layer keeps the [V, E] count matrix small
            flat = idx[:, None] * E + tr.experts[:, l]
            counts = np.bincount(flat.reshape(-1), minlength=V * E).reshape(V, E).astype(np.float64)
            counts[0] = 0
            scores = counts + self.smoothing * k * self.overall[l]
            self.table[:, l] = top_k_ids(scores, k)
        return self

    def predict(self, tokens):
        return self.table[self.vocab.index(self.keys(tokens))]

    def cost(self):
        row = self.n_layers * self.top_k * I16
        return self._cost(
            flops_per_token=np.log2(max(len(self.vocab), 2)),  # the id -> row search
            bytes_per_token=row + 8, memory_bytes=self.table.nbytes + self.vocab.ids.nbytes,
            runs_before_attention=True, inputs=(self.field,),
        )


@register("token_table")
class TokenTable(_KeyTable):
    """Most frequent experts given the token id (MoE-GPS's 'most frequent given token')."""

    name = "token_table"


@register("position_table")
class PositionTable(_KeyTable):
    name = "position_table"
    field = "position"

    def __init__(self, smoothing: float = 1.0, max_position: int = 4096):
        super().__init__(smoothing)
        self.max_position = max_position

    def keys(self, tokens):
        return np.minimum(tokens.position, self.max_position)


@register("cross_layer")
class CrossLayer(_Token):
    """Layer ``l``: ``score(e) = sum over e' in routed[:, l-1] of P(e at l | e' at l-1)``.

    Layer 0 has no previous layer: the token-id table predicts it.
    """

    name = "cross_layer"

    def __init__(self, smoothing: float = 1.0):
        self.smoothing = smoothing

    def fit(self, train):
        tr = self._shape(train)
        L, E = self.n_layers, self.n_experts
        self.first = TokenTable(self.smoothing).fit(train)
        self.transition = np.zeros((L, E, E))  # [layer, prev expert, expert]
        for l in range(1, L):
            prev, cur = tr.experts[:, l - 1].astype(np.int64), tr.experts[:, l].astype(np.int64)
            pairs = (prev[:, :, None] * E + cur[:, None, :]).reshape(-1)
            c = np.bincount(pairs, minlength=E * E).reshape(E, E) + self.smoothing * self.overall[l]
            self.transition[l] = normalize(c)
        return self

    def predict(self, tokens):
        if tokens.routed is None:
            raise ValueError("cross_layer: TokenBatch.routed (experts of the previous layer) is required")
        out = np.empty((len(tokens), self.n_layers, self.top_k), dtype=np.int16)
        out[:, 0] = self.first.predict(tokens)[:, 0]
        for l in range(1, self.n_layers):
            scores = self.transition[l][tokens.routed[:, l - 1].astype(np.int64)].sum(axis=1)
            out[:, l] = top_k_ids(scores, self.top_k)
        return out

    def cost(self):
        E, k = self.n_experts, self.top_k
        return self._cost(
            flops_per_token=self.n_layers * (k * E + E * np.log2(E)),
            bytes_per_token=self.n_layers * k * E * F32,
            memory_bytes=self.transition.size * F32 + self.first.cost().memory_bytes,
            runs_before_attention=True, on_critical_path=True, inputs=("routed[l-1]", "token_id"),
        )


# ---- learned classifiers ---------------------------------------------------------------------


class _torch_threads:
    """Run torch CPU ops on ``n`` threads, restoring the previous count after.

    These models are tiny: on a shared 2-core CPU, torch's default intra-op threads spin against
    other processes and made training ~100x slower than one thread in our measurements.
    """

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        import torch

        self.prev = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.prev)
        return False


def _train_rows(n: int, limit: int, seed: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _torch_fit(model, inputs: list, target, epochs: int, batch: int, lr: float, seed: int, min_steps: int = 600):
    """Multi-label BCE on ``target`` (0/1 float tensor), Adam, shuffled mini-batches, CPU.

    Runs ``epochs`` epochs, or more when that would be fewer than ``min_steps`` optimiser steps
    (small traces: a few epochs of a few thousand tokens leave these models untrained).
    """
    import math

    import torch

    epochs = max(epochs, math.ceil(min_steps / max(1, math.ceil(len(target) / batch))))

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    n = len(target)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch):
            i = perm[s:s + batch]
            opt.zero_grad()
            loss = loss_fn(model(*[x[i] for x in inputs]), target[i])
            loss.backward()
            opt.step()
    model.eval()
    return model


def _dense_params(model) -> tuple[int, int]:
    """(parameters of dense layers, parameters of embeddings)."""
    import torch

    emb = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    return sum(p.numel() for p in model.parameters()) - emb, emb


class _TorchToken(_Token):
    def __init__(self, dim: int = 64, hidden: int = 128, epochs: int = 3, batch: int = 512, lr: float = 3e-3,
                 max_train_tokens: int = 200_000, seed: int = 0, device: str = "cpu", threads: int | None = 1,
                 min_steps: int = 600):
        self.dim, self.hidden, self.epochs, self.batch, self.lr = dim, hidden, epochs, batch, lr
        self.min_steps = min_steps
        self.threads = threads  # torch CPU threads for fit and predict (None: leave torch's setting)
        self.max_train_tokens, self.seed, self.device = max_train_tokens, seed, device

    def _fit_all_layers(self, tr, window: int):
        """Train ``self.model`` (one ``[L*E]`` logit row per token) on at most ``max_train_tokens`` of
        ``tr``'s tokens, the target being each layer's top-k indicator; inputs from ``_inputs``."""
        import torch

        L, E = self.n_layers, self.n_experts
        rows = _train_rows(len(tr.token_id), self.max_train_tokens, self.seed)
        tb = token_batch(tr, window=window, with_routing=False).select(rows)
        y = torch.as_tensor(expert_counts(tr.experts[rows], E).reshape(len(rows), L * E), dtype=torch.float32)
        with _torch_threads(self.threads):
            _torch_fit(self.model, self._inputs(tb), y, self.epochs, self.batch, self.lr, self.seed,
                       self.min_steps)
        return self

    def _logits_to_ids(self, logits) -> np.ndarray:
        import torch

        L, E, k = self.n_layers, self.n_experts, self.top_k
        ids = torch.topk(logits.reshape(-1, L, E), k, dim=-1).indices
        return ids.to(torch.int16).cpu().numpy()

    def predict(self, tokens):
        import torch

        out = []
        with torch.inference_mode(), _torch_threads(self.threads):
            for s in range(0, len(tokens), 65536):
                out.append(self._logits_to_ids(self.model(*self._inputs(tokens.select(slice(s, s + 65536))))))
        return np.concatenate(out) if out else np.zeros((0, self.n_layers, self.top_k), np.int16)

    def to(self, device: str):
        """Move the model (e.g. to ``"cuda"`` for the benchmark)."""
        self.device = device
        self.model.to(device)
        return self


@register("ffn")
class TokenFFN(_TorchToken):
    """Embedding of the token id -> Linear -> ReLU -> Linear to ``L*E`` logits; top-k per layer."""

    name = "ffn"

    def _inputs(self, tokens):
        import torch

        return [torch.as_tensor(self.vocab.index(tokens.token_id), device=self.device)]

    def fit(self, train):
        import torch

        tr = self._shape(train)
        torch.manual_seed(self.seed)
        self.vocab = Vocab(tr.token_id)
        L, E = self.n_layers, self.n_experts
        self.model = torch.nn.Sequential(
            torch.nn.Embedding(len(self.vocab), self.dim), torch.nn.Linear(self.dim, self.hidden), torch.nn.ReLU(),
            torch.nn.Linear(self.hidden, L * E),
        )
        return self._fit_all_layers(tr, window=1)

    def cost(self):
        dense, emb = _dense_params(self.model)
        return self._cost(
            flops_per_token=2.0 * dense, bytes_per_batch=dense * F32, bytes_per_token=self.dim * F32,
            memory_bytes=(dense + emb) * F32, runs_before_attention=True, inputs=("token_id",),
        )


class _GRU:
    """Built lazily so that importing this module does not import torch."""

    @staticmethod
    def make(n_vocab, dim, hidden, n_out):
        import torch

        class GRUModel(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(n_vocab + 1, dim)  # last row: padding before the request
                self.gru = torch.nn.GRU(dim, hidden, batch_first=True)
                self.out = torch.nn.Linear(hidden, n_out)

            def forward(self, seq):  # seq [n, window + 1] oldest first, current token last
                _, h = self.gru(self.emb(seq))
                return self.out(h[-1])

        return GRUModel()


@register("sequence")
class TokenSequence(_TorchToken):
    """A GRU over the previous ``window`` token ids and the current one -> ``L*E`` logits (MoE-GPS's LSTM)."""

    name = "sequence"

    def __init__(self, window: int = 8, dim: int = 32, hidden: int = 64, epochs: int = 2,
                 max_train_tokens: int = 100_000, **kw):
        super().__init__(dim=dim, hidden=hidden, epochs=epochs, max_train_tokens=max_train_tokens, **kw)
        self.window = window

    def _inputs(self, tokens):
        import torch

        if tokens.context_ids is None or tokens.context_ids.shape[1] < self.window:
            raise ValueError(f"sequence: TokenBatch.context_ids must hold >= {self.window} previous ids")
        ids = np.concatenate([tokens.context_ids[:, :self.window][:, ::-1], tokens.token_id[:, None]], axis=1)
        idx = np.where(ids < 0, len(self.vocab), self.vocab.index(ids))
        return [torch.as_tensor(idx, device=self.device)]

    def fit(self, train):
        import torch

        tr = self._shape(train)
        torch.manual_seed(self.seed)
        self.vocab = Vocab(tr.token_id)
        L, E = self.n_layers, self.n_experts
        self.model = _GRU.make(len(self.vocab), self.dim, self.hidden, L * E)
        return self._fit_all_layers(tr, window=self.window)

    def cost(self):
        d, h = self.dim, self.hidden
        gru = 3 * (d * h + h * h + 2 * h)
        dense, emb = _dense_params(self.model)
        return self._cost(
            flops_per_token=2.0 * ((self.window + 1) * gru + h * self.n_layers * self.n_experts),
            bytes_per_batch=dense * F32, bytes_per_token=(self.window + 1) * d * F32,
            memory_bytes=(dense + emb) * F32, runs_before_attention=True, inputs=("token_id", "context_ids"),
        )


def _layer_features(tokens: TokenBatch, layer: int, vocab: Vocab, n_experts: int) -> np.ndarray:
    """``[token, 3 + E]``: token index (categorical), position, phase, multi-hot of routed[:, layer-1]."""
    prev = np.zeros((len(tokens), n_experts), dtype=np.float32)
    if layer > 0:
        if tokens.routed is None:
            raise ValueError("TokenBatch.routed (experts of the previous layer) is required for layers >= 1")
        prev = expert_counts(tokens.routed[:, layer - 1], n_experts).astype(np.float32)
    base = np.stack([vocab.index(tokens.token_id), tokens.position, tokens.phase], axis=1).astype(np.float32)
    return np.concatenate([base, prev], axis=1)


@register("lgbm")
class TokenLGBM(_Token):
    """Per layer, a LightGBM multiclass model on (token id [categorical], position, phase,
    previous layer's experts [multi-hot]); top-k of its class probabilities.

    Each training token contributes ``k`` rows, one per chosen expert, so the class
    probabilities estimate each expert's share of the token's top-k.
    """

    name = "lgbm"

    def __init__(self, n_estimators: int = 15, num_leaves: int = 7, learning_rate: float = 0.2,
                 max_train_tokens: int = 3_000, seed: int = 0, n_jobs: int = 1):
        self.n_estimators, self.num_leaves, self.learning_rate = n_estimators, num_leaves, learning_rate
        self.max_train_tokens, self.seed, self.n_jobs = max_train_tokens, seed, n_jobs

    def fit(self, train):
        import lightgbm as lgb

        tr = self._shape(train)
        self.vocab = Vocab(tr.token_id)
        rows = _train_rows(len(tr.token_id), self.max_train_tokens, self.seed)
        tb = token_batch(tr, window=1).select(rows)
        k, E = self.top_k, self.n_experts
        self.models = []
        for l in range(self.n_layers):
            X = np.repeat(_layer_features(tb, l, self.vocab, E), k, axis=0)
            y = tb.routed[:, l].reshape(-1).astype(np.int64)
            present = np.unique(y)
            if len(present) < 2:  # a layer that always picks the same experts: nothing to learn
                self.models.append(present)
                continue
            clf = lgb.LGBMClassifier(
                n_estimators=self.n_estimators, num_leaves=self.num_leaves, learning_rate=self.learning_rate,
                min_child_samples=5, max_bin=63, random_state=self.seed, n_jobs=self.n_jobs, verbose=-1,
            )
            clf.fit(X, y, categorical_feature=[0])
            self.models.append(clf)
        return self

    def predict(self, tokens):
        E, k = self.n_experts, self.top_k
        out = np.empty((len(tokens), self.n_layers, k), dtype=np.int16)
        for l, clf in enumerate(self.models):
            scores = np.tile(self.overall[l] * 1e-6, (len(tokens), 1))  # ties -> overall order
            if isinstance(clf, np.ndarray):
                scores[:, clf] += 1.0
            else:
                p = clf.predict_proba(_layer_features(tokens, l, self.vocab, E))
                scores[:, clf.classes_] += p
            out[:, l] = top_k_ids(scores, k)
        return out

    def cost(self):
        trees = sum(m.booster_.num_trees() for m in self.models if not isinstance(m, np.ndarray))
        size = sum(len(m.booster_.model_to_string()) for m in self.models if not isinstance(m, np.ndarray))
        depth = max(1, int(np.ceil(np.log2(self.num_leaves))))
        return self._cost(
            flops_per_token=trees * depth + self.n_layers * self.n_experts * 4,
            bytes_per_token=trees * depth * 16, memory_bytes=size,
            runs_before_attention=True, on_critical_path=True,
            inputs=("token_id", "position", "phase", "routed[l-1]"),
        )


@register("mlp")
class TokenMLP(_TorchToken):
    """One MLP shared by all layers on [token embedding, layer embedding, log position, phase,
    previous layer's experts (multi-hot; zeros at layer 0)] -> ``E`` logits."""

    name = "mlp"

    def __init__(self, dim: int = 32, hidden: int = 128, epochs: int = 3, max_train_tokens: int = 400_000, **kw):
        super().__init__(dim=dim, hidden=hidden, epochs=epochs, max_train_tokens=max_train_tokens, **kw)

    def _build(self):
        import torch

        E, L, d, h = self.n_experts, self.n_layers, self.dim, self.hidden

        class MLP(torch.nn.Module):
            def __init__(self, n_vocab):
                super().__init__()
                self.tok = torch.nn.Embedding(n_vocab, d)
                self.lay = torch.nn.Embedding(L, 8)
                self.net = torch.nn.Sequential(
                    torch.nn.Linear(d + 8 + 2 + E, h), torch.nn.ReLU(), torch.nn.Linear(h, h), torch.nn.ReLU(),
                    torch.nn.Linear(h, E),
                )

            def forward(self, tok, lay, dense):
                return self.net(torch.cat([self.tok(tok), self.lay(lay), dense], dim=-1))

        return MLP(len(self.vocab))

    def _pairs(self, tokens: TokenBatch, layers: np.ndarray):
        """Inputs for every (token, layer in ``layers``), token-major."""
        import torch

        n, E = len(tokens), self.n_experts
        lay = np.tile(layers, n)
        tok_i = np.repeat(np.arange(n), len(layers))
        prev = np.zeros((n * len(layers), E), dtype=np.float32)
        has_prev = lay > 0
        if has_prev.any():
            if tokens.routed is None:
                raise ValueError("mlp: TokenBatch.routed (experts of the previous layer) is required")
            prev[has_prev] = expert_counts(tokens.routed[tok_i[has_prev], lay[has_prev] - 1], E)
        pos = np.log1p(tokens.position[tok_i]).astype(np.float32) / np.log(4096.0)
        dense = np.concatenate([pos[:, None], tokens.phase[tok_i, None], prev], axis=1).astype(np.float32)
        t = lambda a: torch.as_tensor(a, device=self.device)  # noqa: E731
        return [t(self.vocab.index(tokens.token_id[tok_i])), t(lay.astype(np.int64)), t(dense)]

    def fit(self, train):
        import torch

        tr = self._shape(train)
        torch.manual_seed(self.seed)
        self.vocab = Vocab(tr.token_id)
        self.model = self._build()
        rows = _train_rows(len(tr.token_id), self.max_train_tokens, self.seed)
        tb = token_batch(tr, window=1).select(rows)
        L = self.n_layers
        y = torch.as_tensor(expert_counts(tb.routed, self.n_experts).reshape(len(rows) * L, -1), dtype=torch.float32)
        with _torch_threads(self.threads):
            _torch_fit(self.model, self._pairs(tb, np.arange(L)), y, self.epochs, self.batch, self.lr, self.seed,
                       self.min_steps)
        return self

    def predict(self, tokens):
        import torch

        L, k = self.n_layers, self.top_k
        out = []
        with torch.inference_mode(), _torch_threads(self.threads):
            step = max(1, 65536 // L)
            for s in range(0, len(tokens), step):
                part = tokens.select(slice(s, s + step))
                logits = self.model(*self._pairs(part, np.arange(L)))
                out.append(torch.topk(logits, k, dim=-1).indices.reshape(len(part), L, k).to(torch.int16).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, L, k), np.int16)

    def cost(self):
        dense, emb = _dense_params(self.model)
        return self._cost(
            flops_per_token=2.0 * dense * self.n_layers, bytes_per_batch=dense * F32,
            bytes_per_token=(self.dim + 8) * F32 * self.n_layers, memory_bytes=(dense + emb) * F32,
            runs_before_attention=True, on_critical_path=True,
            inputs=("token_id", "position", "phase", "routed[l-1]"),
        )
