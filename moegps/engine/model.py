"""A compact MoE decoder: weights, KV cache, prefill and one decode step.

The model is plain tensors in a dataclass (no nn.Module tree to walk at run time), built one of
three ways: from a Hugging Face checkpoint folder (config.json + safetensors, Mixtral's per-expert
or fused expert layout), from a transformers model already in memory (sharing its tensors), or as
a *shape-only* model: random bf16 weights of a named shape (``moegps.shapes``) drawn directly on
the device, so that a real-size run needs no download and never holds an fp32 copy.

A layer, in order (the kernels are in ``kernels.py``; the routed experts are moegps's fused MoE
kernels, ``moegps.kernels.fused_moe``):

    x = add_rmsnorm(resid, delta_of_previous_layer)      one launch
    q = rope(x @ wqkv^T), k/v -> cache                   decode: one launch, the skinny GEMM with the rotary
                                                         embedding and cache write in its epilogue; longer
                                                         batches: cuBLAS's QKV GEMM, then one rotary launch
    o = attention(q, cache)                              decode: split-K Triton kernel; prefill: SDPA (flash)
    x, ids, gates = add_rmsnorm_router(resid, o @ wo^T)  GEMM + one launch (norm, router logits, top-k)
    delta = fused_moe(x, ids, gates) [+ shared expert: in it, or beside it]

Learned from gpt-fast (a whole decoder in one readable file) and vLLM (static caches, fused
QKV, fused residual norms). Written for this project.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..kernels import fused_moe, moe_reference
from ..shapes import ModelShape, from_hf_config
from .kernels import (add_rmsnorm, add_rmsnorm_router, decode_attention, linear, qkv_rope_cache_write, rope_tables,
                      use_triton)


@dataclass
class Layer:
    """One decoder layer's weights. ``w_gate_up is None`` marks a dense layer (its MLP in ``shared_*``)."""

    wqkv: torch.Tensor            # [(n_heads + 2 n_kv) D, H]
    wo: torch.Tensor              # [H, n_heads D]
    attn_norm: torch.Tensor       # [H]
    mlp_norm: torch.Tensor        # [H]
    router: torch.Tensor | None = None      # [E, H]
    w_gate_up: torch.Tensor | None = None   # [E (+ n_shared), 2F, H], rows 0..F-1 gate (w1), F..2F-1 up (w3)
    w_down: torch.Tensor | None = None      # [E (+ n_shared), H, F] (with ``experts``: this rank's slots only)
    n_shared: int = 0                       # the last n_shared experts are a shared expert cut along its FFN
                                            # into expert-sized pieces, chosen by every token with gate 1
    experts: Callable | None = None         # ``(x [T, H], ids, gates [T, k + n_shared]) -> [T, H]``: the routed
                                            # experts when they are not all local (moegps.engine.parallel)
    shared_gate_up: torch.Tensor | None = None  # [2S, H]: an always-on SwiGLU expert, or a dense MLP
    shared_down: torch.Tensor | None = None     # [H, S]


@dataclass
class Model:
    shape: ModelShape
    embed: torch.Tensor           # [V, H]
    layers: list[Layer]
    norm: torch.Tensor            # [H]
    lm_head: torch.Tensor         # [V, H] (the embedding itself when tied)
    renormalize: bool = True      # top-k gate weights renormalised to sum 1 (Mixtral, Qwen3); not DeepSeek/OLMoE
    rope: tuple[torch.Tensor, torch.Tensor] = field(default=None, repr=False)  # (cos, sin) [max_pos, D/2]
    source: str = ""
    routing_counts: torch.Tensor | None = field(default=None, repr=False)  # [layers, E] int64: set to record
    expert_ids: list | None = field(default=None, repr=False)  # set to []: each MoE call's ids [T, k] appended
                                                               # as its experts get them (eager runs; probes, tests)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers with routed experts (the others are dense)."""
        return [i for i, layer in enumerate(self.layers) if layer.w_gate_up is not None]

    def ensure_rope(self, max_positions: int) -> None:
        if self.rope is None or self.rope[0].shape[0] < max_positions:
            self.rope = rope_tables(max(max_positions, 4096), self.shape.head_dim, self.shape.rope_theta,
                                    self.device)

    def count_routes(self) -> torch.Tensor:
        """Start counting the experts chosen: ``routing_counts [layers, E]`` set to zeros and returned; every MoE
        layer then adds its tokens' top-k (a CUDA graph captured after this adds to it too). Set
        ``routing_counts`` to None to stop."""
        self.routing_counts = torch.zeros(len(self.layers), self.shape.n_experts, dtype=torch.long,
                                          device=self.device)
        return self.routing_counts


class KVCache:
    """Static K and V caches ``[layers, slots, n_kv, max_len, D]``; a sequence owns one slot (its batch row).

    Zero-filled, not empty: prefill attends over right-padded rows, and although masked positions
    get zero weight, 0 x NaN from uninitialised memory would still poison the sum.
    """

    def __init__(self, shape: ModelShape, slots: int, max_len: int, dtype: torch.dtype, device):
        size = (shape.n_layers, slots, shape.n_kv_heads, max_len, shape.head_dim)
        self.k = torch.zeros(size, dtype=dtype, device=device)
        self.v = torch.zeros(size, dtype=dtype, device=device)

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


# ---- building a model ------------------------------------------------------------------------------

def random_model(shape: ModelShape, device="cuda", dtype=torch.bfloat16, seed: int = 0,
                 renormalize: bool = True, fold_shared: bool = True) -> Model:
    """A shape-only model: every weight drawn on ``device`` in ``dtype`` with std fan_in^-0.5 (norms 1).
    ``fold_shared``: hold a shared expert as extra experts where its width allows (Layer.n_shared).

    Random weights give random text but real timings: routing of a random router is near uniform,
    which for a batch decides how many distinct experts a step reads (the floor counts them)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    S = shape

    def w(*size):
        return torch.empty(size, dtype=dtype, device=device).normal_(0, size[-1] ** -0.5, generator=gen)

    def ones(n):
        return torch.ones(n, dtype=dtype, device=device)

    layers = []
    for index in range(S.n_layers):
        layer = Layer(wqkv=w((S.n_heads + 2 * S.n_kv_heads) * S.head_dim, S.hidden),
                      wo=w(S.hidden, S.n_heads * S.head_dim),
                      attn_norm=ones(S.hidden), mlp_norm=ones(S.hidden))
        if index < S.dense_layers:
            layer.shared_gate_up, layer.shared_down = w(2 * S.dense_ffn, S.hidden), w(S.hidden, S.dense_ffn)
        else:
            layer.router = w(S.n_experts, S.hidden)
            # A shared expert whose width is a whole number of experts' widths rides in the routed
            # kernels as that many extra experts (SwiGLU sums over its FFN columns, so cutting it
            # there changes nothing): one fused MoE launch instead of routed + shared GEMMs and their
            # elementwise ops (SGLang's shared-experts fusion for DeepSeek does the same).
            fold = (S.shared_ffn // S.expert_ffn
                    if fold_shared and S.shared_ffn and S.shared_ffn % S.expert_ffn == 0 else 0)
            layer.w_gate_up = w(S.n_experts + fold, 2 * S.expert_ffn, S.hidden)
            layer.w_down = w(S.n_experts + fold, S.hidden, S.expert_ffn)
            if fold:  # the shared expert's down projection has fan-in shared_ffn, not expert_ffn
                layer.w_down[S.n_experts:].normal_(0, S.shared_ffn ** -0.5, generator=gen)
                layer.n_shared = fold
            elif S.shared_ffn:
                layer.shared_gate_up, layer.shared_down = w(2 * S.shared_ffn, S.hidden), w(S.hidden, S.shared_ffn)
        layers.append(layer)
    return Model(shape=S, embed=w(S.vocab_size, S.hidden), layers=layers, norm=ones(S.hidden),
                 lm_head=w(S.vocab_size, S.hidden), renormalize=renormalize, source=f"random {S.name} (shape only)")


def _layer_from_tensors(get, prefix: str, n_experts: int) -> Layer:
    """One Mixtral-family layer from a tensor lookup ``get(name)``: per-expert (w1/w2/w3, the
    checkpoint layout) or fused (gate_up_proj/down_proj, transformers 5's in-memory layout) experts."""
    attn = f"{prefix}.self_attn"
    layer = Layer(wqkv=torch.cat([get(f"{attn}.q_proj.weight"), get(f"{attn}.k_proj.weight"),
                                  get(f"{attn}.v_proj.weight")]),
                  wo=get(f"{attn}.o_proj.weight"), attn_norm=get(f"{prefix}.input_layernorm.weight"),
                  mlp_norm=get(f"{prefix}.post_attention_layernorm.weight"))
    fused = get(f"{prefix}.mlp.experts.gate_up_proj", None)
    if fused is not None:
        layer.router = get(f"{prefix}.mlp.gate.weight")
        layer.w_gate_up, layer.w_down = fused, get(f"{prefix}.mlp.experts.down_proj")
    else:
        moe = f"{prefix}.block_sparse_moe"
        layer.router = get(f"{moe}.gate.weight")
        experts = [f"{moe}.experts.{e}" for e in range(n_experts)]
        layer.w_gate_up = torch.stack([torch.cat([get(f"{x}.w1.weight"), get(f"{x}.w3.weight")]) for x in experts])
        layer.w_down = torch.stack([get(f"{x}.w2.weight") for x in experts])
    return layer


def _from_tensors(get, shape: ModelShape, tied: bool, renormalize: bool, source: str) -> Model:
    if shape.shared_ffn or shape.dense_layers:
        raise ValueError(f"{source}: loading checkpoints with shared experts or dense layers is not supported yet "
                         "(Mixtral-family checkpoints only); use a shape name for a random-weight model")
    layers = [_layer_from_tensors(get, f"model.layers.{i}", shape.n_experts) for i in range(shape.n_layers)]
    embed = get("model.embed_tokens.weight")
    lm_head = embed if tied else get("lm_head.weight")
    return Model(shape=shape, embed=embed, layers=layers, norm=get("model.norm.weight"), lm_head=lm_head,
                 renormalize=renormalize, source=source)


def load_checkpoint(folder: str | Path, device="cuda", dtype=torch.bfloat16) -> Model:
    """A Mixtral-family Hugging Face checkpoint folder (config.json + one or more *.safetensors)."""
    from safetensors import safe_open

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") not in ("mixtral", None):
        raise ValueError(f"{config_path}: field 'model_type' is {config.get('model_type')!r}; the engine "
                         "loads 'mixtral' checkpoints (other families: build a shape-only model by name)")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    where = {}
    handles = [safe_open(str(f), framework="pt", device=str(device)) for f in files]
    for handle in handles:
        for key in handle.keys():
            where[key] = handle
    missing = object()

    def get(name, default=missing):
        if name not in where:
            if default is not missing:
                return default
            raise KeyError(f"{folder}: tensor {name!r} not found in {[f.name for f in files]}")
        return where[name].get_tensor(name).to(dtype)

    shape = from_hf_config(config, name=folder.name)
    return _from_tensors(get, shape, bool(config.get("tie_word_embeddings", False)),
                         renormalize=bool(config.get("norm_topk_prob", True)), source=str(folder))


def from_transformers(hf_model) -> Model:
    """The engine over a transformers Mixtral model's own tensors (views, no copy except the fused QKV)."""
    state = {name: p.detach() for name, p in hf_model.state_dict().items()}
    missing = object()

    def get(name, default=missing):
        if name not in state:
            if default is not missing:
                return default
            raise KeyError(f"{type(hf_model).__name__}: no tensor {name!r}")
        return state[name]

    config = hf_model.config.to_dict()
    shape = from_hf_config(config, name=config.get("_name_or_path") or "transformers model")
    tied = bool(config.get("tie_word_embeddings", False))
    return _from_tensors(get, shape, tied, renormalize=bool(config.get("norm_topk_prob", True)),
                         source=f"transformers {type(hf_model).__name__}")


def weight_bytes_per_step(model: Model, distinct_experts: list[float]) -> float:
    """Bytes a decode step must read besides the KV cache: every non-expert weight of every layer,
    the final norm and lm_head, and each layer's distinct experts touched (``distinct_experts[l]``)
    and shared expert pieces (``Layer.n_shared``), at the tensors' own element sizes."""
    def nbytes(*tensors):
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    total = nbytes(model.norm, model.lm_head)
    for layer, touched in zip(model.layers, distinct_experts):
        total += nbytes(layer.wqkv, layer.wo, layer.attn_norm, layer.mlp_norm, layer.router, layer.shared_gate_up,
                        layer.shared_down)
        if layer.w_gate_up is not None:
            total += (touched + layer.n_shared) * nbytes(layer.w_gate_up[0], layer.w_down[0])
    return float(total)


# ---- the forward passes --------------------------------------------------------------------------

def _swiglu(x, gate_up, down):
    """A dense SwiGLU MLP: ``x [T, H]``, ``gate_up [2S, H]``, ``down [H, S]`` -> ``[T, H]``."""
    g, u = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(g) * u) @ down.T


def _mlp(model: Model, index: int, resid: torch.Tensor, attn_out: torch.Tensor,
         route_as: torch.Tensor | None = None) -> torch.Tensor:
    """The residual add and norm after attention, then the MoE (router, routed experts, shared expert)
    or a dense layer's MLP; returns the MLP's output ``[T, H]``. ``route_as [T]``: row t computes the
    experts row ``route_as[t]`` picked (a decode bucket's free rows, whose outputs are dropped, then read
    no expert of their own); None: every row its own."""
    layer, S = model.layers[index], model.shape
    out = None
    if layer.w_gate_up is None:
        x = add_rmsnorm(resid, attn_out, layer.mlp_norm, S.norm_eps)
    else:
        x, ids, gates = add_rmsnorm_router(resid, attn_out, layer.mlp_norm, S.norm_eps, layer.router, S.top_k,
                                           model.renormalize, shared=layer.n_shared)
        if model.routing_counts is not None:  # the demo's heat map; two small launches, no host sync
            flat = ids[:, :S.top_k].reshape(-1).long()
            model.routing_counts[index].scatter_add_(0, flat, torch.ones_like(flat))
        if route_as is not None:
            ids = ids.index_select(0, route_as)
        if model.expert_ids is not None:
            model.expert_ids.append(ids[:, :S.top_k].clone())
        if layer.experts is not None:
            out = layer.experts(x, ids, gates)
        else:
            experts = fused_moe if use_triton(x) else moe_reference
            out = experts(x, layer.w_gate_up, layer.w_down, ids, gates)
    if layer.shared_gate_up is not None:
        shared = _swiglu(x, layer.shared_gate_up, layer.shared_down)
        out = shared if out is None else out + shared
    return out


def _layers(model: Model, cache: KVCache, resid: torch.Tensor, positions, slots, attend,
            route_as: torch.Tensor | None = None) -> torch.Tensor:
    """All layers over ``resid [T, H]`` (updated in place); returns the last layer's MLP output
    (the caller adds it with the final norm). ``attend(q [T, n_heads, D], layer_index) -> [T, n_heads, D]``;
    ``route_as``: see ``_mlp``."""
    S = model.shape
    cos, sin = model.rope
    delta = None
    for index, layer in enumerate(model.layers):
        x = add_rmsnorm(resid, delta, layer.attn_norm, S.norm_eps)
        q = qkv_rope_cache_write(x, layer.wqkv, cache.k[index], cache.v[index], positions, slots, cos, sin,
                                 S.n_heads, S.n_kv_heads)
        o = attend(q, index)
        o = linear(o.reshape(o.shape[0], -1), layer.wo)
        delta = _mlp(model, index, resid, o, route_as)
    return delta


def decode_step(model: Model, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                attention_split: int | None = None, route_as: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per sequence: ``tokens [B]`` at ``positions [B]`` (sequence b in cache slot b,
    positions[b] = its length so far) -> logits ``[B, V]`` in float32. ``route_as [B]``: row b's MoE
    layers compute the experts row ``route_as[b]`` picked (``_mlp``). No host synchronisation: the step
    can be captured in a CUDA graph."""
    B = tokens.shape[0]
    slots = torch.arange(B, device=tokens.device)
    lengths = (positions + 1).to(torch.int32)

    def attend(q, index):
        return decode_attention(q, cache.k[index], cache.v[index], lengths, split=attention_split)

    resid = model.embed[tokens]
    delta = _layers(model, cache, resid, positions, slots, attend, route_as)
    x = add_rmsnorm(resid, delta, model.norm, model.shape.norm_eps)
    return linear(x, model.lm_head).float()


def decode_step_with_chunk(model: Model, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                           chunk: torch.Tensor, chunk_slot: torch.Tensor, chunk_start: torch.Tensor,
                           chunk_last: torch.Tensor, route_as: torch.Tensor | None = None) -> torch.Tensor:
    """``decode_step`` of ``tokens [B]`` at ``positions [B]`` (slots 0..B-1) and, in the same GEMMs and MoE
    calls, a chunk of a prompt being prefilled: ``chunk [C]`` tokens at positions ``chunk_start [1]`` + 0..C-1
    of cache slot ``chunk_slot [1]``, whose positions before ``chunk_start`` the chunks before it filled
    (chunked prefill beside decode: Sarathi-Serve, Agrawal et al., OSDI 2024). Rows of the chunk past the
    prompt's end are padding: their K/V land past it (clamped to the cache), where nothing valid is yet and
    what follows overwrites them before any read. The slot's own row among the B decode rows must not
    write inside the prompt: park it at the chunk's end. Returns ``[B + 1, V]`` float32: the decode rows'
    logits, then those of the chunk's row ``chunk_last [1]`` (the prompt's last token, in its last chunk).
    ``route_as [B]``: as in ``decode_step``, for the decode rows; given, the chunk's padding rows route as its
    prompt rows, cyclically (row i as row i mod (chunk_last + 1)): left to route as themselves, token 0 at
    consecutive positions picks the same few experts in every layer and piles up to a whole chunk's rows on them
    (a 90-token piece padded to 256 on random Mixtral-size layers: 179 and 214 rows on two of the eight experts,
    one more 128-row block each), where cycling keeps each expert's share of the prompt's rows and adds no expert
    (on an H100 the step took 0.96-1.00x the time on 64 experts, 0.97-1.02x on Mixtral: docs/engine.md).
    No host synchronisation: capturable in a CUDA graph."""
    B, C, S = tokens.shape[0], chunk.shape[0], model.shape
    device = tokens.device
    chunk_positions = (chunk_start + torch.arange(C, device=device)).clamp(max=cache.max_len - 1)
    slots = torch.cat([torch.arange(B, device=device), chunk_slot.expand(C)])
    lengths = (positions + 1).to(torch.int32)
    group, D = S.n_heads // S.n_kv_heads, S.head_dim
    # chunk row i sees the slot's keys 0..chunk_start + i (the chunks before it and its own rows up to i);
    # its query heads of one KV group are rows of one sequence (row i * group + g), so SDPA needs no GQA
    # expansion: with a mask, enable_gqa has only the math backend on a GPU, which holds every score
    visible = (torch.arange(cache.max_len, device=device)[None, :] <= chunk_positions[:, None]).repeat_interleave(
        group, 0)

    def attend(q, index):
        decoded = decode_attention(q[:B], cache.k[index], cache.v[index], lengths)
        k, v = cache.k[index].index_select(0, chunk_slot), cache.v[index].index_select(0, chunk_slot)
        rows = q[B:].reshape(C, S.n_kv_heads, group, D).transpose(0, 1).reshape(1, S.n_kv_heads, C * group, D)
        o = F.scaled_dot_product_attention(rows, k, v, attn_mask=visible)
        return torch.cat([decoded, o.view(S.n_kv_heads, C, group, D).transpose(0, 1).reshape(C, S.n_heads, D)])

    if route_as is not None:
        route_as = torch.cat([route_as, B + torch.arange(C, device=device) % (chunk_last + 1)])
    resid = model.embed[torch.cat([tokens, chunk])]
    delta = _layers(model, cache, resid, torch.cat([positions, chunk_positions]), slots, attend, route_as)
    rows = torch.cat([torch.arange(B, device=device), B + chunk_last])
    x = add_rmsnorm(resid[rows].contiguous(), delta[rows].contiguous(), model.norm, S.norm_eps)
    return linear(x, model.lm_head).float()


def gathered_slots(slots: list[int] | None, n: int) -> bool:
    """Whether ``n`` prompts go to other cache slots than 0..n-1 (their attention then gathers its K/V)."""
    return slots is not None and list(slots) != list(range(n))


def check_fits(cache: KVCache, lengths: list[int], slots: list[int] | None = None) -> None:
    """A clear error when prompts of these lengths (prompt b in slot ``slots[b]``, default b) do not fit the
    cache."""
    if len(lengths) > cache.slots or max(lengths) > cache.max_len:
        raise ValueError(f"{len(lengths)} prompts of up to {max(lengths)} tokens do not fit a cache of "
                         f"{cache.slots} slots x {cache.max_len} positions")
    if slots is not None and (len(slots) != len(lengths) or len(set(slots)) != len(slots)
                              or not all(0 <= s < cache.slots for s in slots)):
        raise ValueError(f"cache slots {slots} for {len(lengths)} prompts: need one distinct slot per prompt in "
                         f"[0, {cache.slots})")


def prefill(model: Model, cache: KVCache, prompts: list[torch.Tensor], all_positions: bool = False,
            slots: list[int] | None = None) -> torch.Tensor:
    """Prompts of any lengths (prompt b in cache slot ``slots[b]``, by default b, from position 0), packed into
    one token batch for every GEMM and the MoE; attention per sequence through SDPA on the right-padded
    batch (causal: no valid query sees a padded key). Returns the last position's logits ``[B, V]`` float32,
    or with ``all_positions`` every token's ``[sum of lengths, V]`` (teacher-forced checks). Other slots'
    cache entries are left as they are (the serving loop prefills newcomers beside running sequences)."""
    device = model.device
    # the index tensors are built on the host and copied before any kernel is queued: a read of a device
    # tensor back to the host (or a copy from pageable memory behind queued work) makes the host wait
    # for the GPU, which then idles while the host queues what follows
    lengths = [len(p) for p in prompts]
    check_fits(cache, lengths, slots)
    model.ensure_rope(cache.max_len)
    tokens = torch.cat([p.to(device) for p in prompts])
    rows = torch.cat([torch.full((n,), b) for b, n in enumerate(lengths)]).to(device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    last = (torch.tensor(lengths).cumsum(0) - 1).to(device)  # each prompt's last row in the packed batch
    prompt_slots = torch.tensor(slots).to(device) if gathered_slots(slots, len(lengths)) else None
    return prefill_packed(model, cache, tokens, rows, positions, last, lengths, all_positions, prompt_slots)


# SDPA's backends for a padded batch of several prompts, eager: its shape is new with almost every batch, and
# the cuDNN backend (first in torch 2.11's order on Hopper) builds an execution plan for each new shape: 43-60 ms
# a shape on an H100, past a first call of 1.0-1.1 s in a process, against a prefill of 30-40 ms
# (benchmarks/engine/first_call_probe.py; pytorch#155958 makes it rebuild less). The flash and memory-efficient
# kernels build nothing (0.2 ms at a new shape). One prompt keeps the default order: its shapes are the prefill
# graphs' length classes, each planned once at capture.
PADDED_BATCH_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def prefill_packed(model: Model, cache: KVCache, tokens: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                   last: torch.Tensor, lengths: list[int], all_positions: bool = False,
                   prompt_slots: torch.Tensor | None = None) -> torch.Tensor:
    """``prefill`` on its device inputs: ``tokens``, ``rows``, ``positions`` ``[sum of lengths]`` (prompt b's
    tokens, b, positions from 0), ``last [B]`` (each prompt's last row), ``prompt_slots [B]`` (prompt b's
    cache slot; None: slot b, read as a view of the cache, the others gathered); ``lengths`` on the host
    fixes every shape. Call ``model.ensure_rope(cache.max_len)`` first. No host synchronisation: capturable
    in a CUDA graph (generate.PrefillGraphs)."""
    longest = max(lengths)
    S = model.shape
    single = len(lengths) == 1
    slots = rows if prompt_slots is None else prompt_slots[rows]

    def attend(q, index):
        if prompt_slots is None:
            k = cache.k[index, :len(lengths), :, :longest]
            v = cache.v[index, :len(lengths), :, :longest]
        else:
            k = cache.k[index][prompt_slots, :, :longest]
            v = cache.v[index][prompt_slots, :, :longest]
        if single:
            qp = q.view(1, longest, S.n_heads, S.head_dim).transpose(1, 2)
        else:
            qp = q.new_zeros(len(lengths), longest, S.n_heads, S.head_dim)
            qp[rows, positions] = q
            qp = qp.transpose(1, 2)
        o = F.scaled_dot_product_attention(qp, k, v, is_causal=True, enable_gqa=S.n_heads != S.n_kv_heads)
        o = o.transpose(1, 2)
        return o.reshape(longest, S.n_heads, S.head_dim) if single else o[rows, positions]

    resid = model.embed[tokens]
    with (sdpa_kernel(PADDED_BATCH_SDPA) if not single and tokens.is_cuda else contextlib.nullcontext()):
        delta = _layers(model, cache, resid, positions, slots, attend)
    if all_positions:
        return linear(add_rmsnorm(resid, delta, model.norm, S.norm_eps), model.lm_head).float()
    x = add_rmsnorm(resid[last].contiguous(), delta[last].contiguous(), model.norm, S.norm_eps)
    return linear(x, model.lm_head).float()


def prefill_block_diagonal(model: Model, cache: KVCache, tokens: torch.Tensor, rows: torch.Tensor,
                           positions: torch.Tensor, slots: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Prompts packed as one sequence: ``tokens``, ``rows``, ``positions``, ``slots`` ``[T]`` (each token's prompt,
    its position from 0 and its prompt's cache slot; row and slot -1: padding, which writes no K/V and whose
    outputs are dropped) -> the logits ``[P, V]`` float32 of rows ``last [P]`` of the pack. Attention runs over the
    whole pack under a block-diagonal causal mask built on the device (a token sees its own prompt's tokens up
    to its position), so every shape is T's: one CUDA graph per T serves any number of prompts of any lengths
    (generate.PrefillGraphs), where ``prefill_packed``'s shapes follow the prompts' count and longest length.
    The price: attention over T^2 pairs against the sum of the prompts' squared lengths, small beside the GEMMs
    for the short packs this serves (a serving loop's newcomers). Call ``model.ensure_rope(cache.max_len)``
    first. No host synchronisation."""
    S = model.shape
    group = S.n_heads // S.n_kv_heads
    mask = (rows[:, None] == rows[None, :]) & (positions[None, :] <= positions[:, None])
    readable = slots.clamp(min=0)  # padding reads slot 0's first entry, which the mask hides from prompts

    def attend(q, index):
        k, v = (c[index][readable, :, positions] for c in (cache.k, cache.v))  # [T, n_kv, D]
        # the heads of a group repeated rather than SDPA's enable_gqa, which not every version's masked
        # (memory-efficient) kernel takes
        k, v = (x.repeat_interleave(group, dim=1).transpose(0, 1)[None] for x in (k, v))
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask)
        return o[0].transpose(0, 1)

    resid = model.embed[tokens]
    delta = _layers(model, cache, resid, positions, slots, attend)
    x = add_rmsnorm(resid[last].contiguous(), delta[last].contiguous(), model.norm, S.norm_eps)
    return linear(x, model.lm_head).float()
