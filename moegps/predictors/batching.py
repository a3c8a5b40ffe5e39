"""Form batches the way a server would, so distribution predictors are judged on real batch loads.

A static-batching server takes ``batch_requests`` requests at a time: one prefill batch holding
their whole prompts, then decode step ``s = 1, 2, ...`` across those of them still generating,
then the next group. The stream of batches is ordered group-major, step-minor. Everything here
is vectorised over tokens (no Python loop per token or per batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..trace import PREFILL, RoutingTrace, TokenRouting
from .base import BatchContext, TokenBatch


def token_batch(tr: TokenRouting, window: int = 8, with_routing: bool = True) -> TokenBatch:
    """All tokens of a token-major view as one :class:`TokenBatch` (order kept).

    ``context_ids[i, j]`` is the token id ``j + 1`` places before token ``i`` in the same request
    (sequence order = (step, position), as ``by_token`` sorts), -1 before the request starts.
    ``routed`` is the true routing (``[token, layer, k]``) when ``with_routing``.
    """
    n = len(tr.token_id)
    ctx = np.full((n, window), -1, dtype=np.int64)
    for j in range(1, window + 1):
        if j >= n:
            break
        same = tr.request_id[j:] == tr.request_id[:-j]
        ctx[j:, j - 1] = np.where(same, tr.token_id[:-j], -1)
    return TokenBatch(
        token_id=tr.token_id.astype(np.int64), position=tr.position.astype(np.int64),
        phase=tr.phase.astype(np.int8), request_id=tr.request_id, context_ids=ctx,
        routed=tr.experts if with_routing else None,
    )


@dataclass
class BatchStream:
    """A sequence of server batches over a trace's tokens.

    Token arrays are ``[token]`` in ``tokens`` order (``TokenRouting`` order); batch arrays are
    ``[batch]`` in service order. ``order`` sorts tokens by batch; batch ``b``'s tokens are
    ``order[offsets[b]:offsets[b+1]]``. ``members[g]`` are the request indices (into
    ``requests``) of group ``g``; ``prefill_loads`` ``[request, layer, expert]`` their prefill counts.
    """

    tokens: TokenBatch
    experts: np.ndarray  # [token, layer, k]
    token_batch_id: np.ndarray  # [token]
    order: np.ndarray  # [token]
    offsets: np.ndarray  # [batch + 1]
    phase: np.ndarray  # [batch] int8
    group: np.ndarray  # [batch]
    step: np.ndarray  # [batch]
    n_tokens: np.ndarray  # [batch]
    n_requests: np.ndarray  # [batch]
    loads: np.ndarray  # [batch, layer, expert] int64 counts
    requests: np.ndarray  # [request] ids
    token_request: np.ndarray  # [token] request index
    members: list[np.ndarray]
    prefill_loads: np.ndarray  # [request, layer, expert]

    def __len__(self) -> int:
        return len(self.phase)

    def batch_tokens(self, b: int) -> np.ndarray:
        return self.order[self.offsets[b]:self.offsets[b + 1]]

    def batch_members(self, b: int) -> np.ndarray:
        """Request indices in batch ``b`` (decode batches: those still generating at that step)."""
        return np.unique(self.token_request[self.batch_tokens(b)])


def batch_stream(
    trace: RoutingTrace, batch_requests: int = 8, seed: int | None = None, window: int = 8,
    tr: TokenRouting | None = None,
) -> BatchStream:
    """Batches of ``batch_requests`` requests (in trace order, or a ``seed``-ed random order)."""
    if batch_requests < 1:
        raise ValueError(f"batch_requests must be >= 1, got {batch_requests}")
    tr = tr if tr is not None else trace.by_token()
    m = trace.meta
    L, E = m.n_layers, m.n_experts
    requests, token_request = np.unique(tr.request_id, return_inverse=True)
    rank = np.arange(len(requests))
    if seed is not None:
        rank = np.random.default_rng(seed).permutation(len(requests))
    group_of_request = rank // batch_requests
    token_group = group_of_request[token_request]
    step = tr.step.astype(np.int64)
    key = token_group.astype(np.int64) * (int(step.max()) + 1 if len(step) else 1) + step
    uniq, token_batch_id = np.unique(key, return_inverse=True)
    nb = len(uniq)
    order = np.argsort(token_batch_id, kind="stable")
    counts = np.bincount(token_batch_id, minlength=nb)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    first = order[offsets[:-1]]
    per_req_batch = np.unique(np.stack([token_batch_id, token_request]), axis=1)
    n_requests = np.bincount(per_req_batch[0], minlength=nb)
    T, _, k = tr.experts.shape
    layer = np.broadcast_to(np.arange(L)[None, :, None], tr.experts.shape)
    flat = (token_batch_id[:, None, None] * L + layer) * E + tr.experts
    loads = np.bincount(flat.reshape(-1), minlength=nb * L * E).reshape(nb, L, E)
    is_prefill = tr.phase == PREFILL
    flat_r = ((token_request[is_prefill, None, None] * L + layer[is_prefill]) * E + tr.experts[is_prefill])
    prefill_loads = np.bincount(flat_r.reshape(-1), minlength=len(requests) * L * E).reshape(len(requests), L, E)
    n_groups = int(group_of_request.max()) + 1 if len(requests) else 0
    by_group = np.argsort(group_of_request, kind="stable")
    bounds = np.searchsorted(group_of_request[by_group], np.arange(n_groups + 1))
    members = [by_group[bounds[g]:bounds[g + 1]] for g in range(n_groups)]
    return BatchStream(
        tokens=token_batch(tr, window), experts=tr.experts, token_batch_id=token_batch_id, order=order,
        offsets=offsets, phase=tr.phase[first].astype(np.int8), group=token_group[first], step=step[first],
        n_tokens=counts, n_requests=n_requests, loads=loads, requests=requests, token_request=token_request,
        members=members, prefill_loads=prefill_loads,
    )


def batch_context(stream: BatchStream, b: int, with_tokens: bool = False) -> BatchContext:
    """What the scheduler knows of batch ``b`` before it runs (see :class:`BatchContext`).

    ``past_phase`` covers batches ``0..b-1``; the caller passes ``stream.loads[:b]`` as the past.
    ``tokens`` carries ``routed`` only if the stream's tokens do (the evaluation's cross-layer case).
    """
    idx = stream.batch_tokens(b)
    phase = int(stream.phase[b])
    rpl = None
    if phase != PREFILL:
        rpl = stream.prefill_loads[stream.batch_members(b)]
    return BatchContext(
        phase=phase, n_tokens=int(stream.n_tokens[b]), n_requests=int(stream.n_requests[b]),
        token_ids=stream.tokens.token_id[idx], past_phase=stream.phase[:b],
        request_prefill_loads=rpl, tokens=stream.tokens.select(idx) if with_tokens else None,
        steps=np.full(len(idx), stream.step[b]),  # a static batch is one step of its group
    )
