"""One table of MoE model shapes: every stage that needs a model's sizes asks here.

    from moegps.shapes import from_name, from_hf_config
    shape = from_name("mixtral-8x7b")            # the decoder's geometry
    shape.expert_weight_bytes                     # 352 MB for Mixtral-8x7B in bf16

A shape is geometry only (no weights): the simulator charges bytes and FLOPs by it, the placement
CLI moves experts of its size, the kernels' benchmark times its expert GEMMs, and the engine builds
a random-weight model of it directly on the device. Names follow the Hugging Face model they come
from; the numbers are those models' ``config.json`` (in the spirit of gpt-fast's ``transformer_configs``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only MoE model's sizes. Every layer past ``dense_layers`` is an MoE layer.

    Attention is grouped-query attention with ``n_heads`` query and ``n_kv_heads`` key/value heads of
    ``head_dim``; ``shared_ffn`` > 0 adds an always-on SwiGLU expert of that width to every MoE layer
    (DeepSeek, Qwen-MoE); ``dense_layers`` leading layers have a dense SwiGLU MLP of ``dense_ffn``.
    ``attention_params_override`` replaces the GQA count for attention of another form (DeepSeek's
    MLA), so that costs stay right where the engine cannot build it.
    """

    name: str
    vocab_size: int
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    expert_ffn: int
    n_experts: int
    top_k: int
    shared_ffn: int = 0
    dense_layers: int = 0
    dense_ffn: int = 0
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    dtype_bytes: int = 2
    attention_params_override: float | None = None

    def __post_init__(self):
        for field in ("vocab_size", "n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "expert_ffn",
                      "n_experts", "top_k", "dtype_bytes"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model shape {self.name!r}: field {field!r} must be a positive integer, got {value!r}")
        if self.top_k > self.n_experts:
            raise ValueError(f"model shape {self.name!r}: top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model shape {self.name!r}: n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")

    # ---- per expert ---------------------------------------------------------------------------------

    @property
    def expert_weight_bytes(self) -> float:
        """Bytes of one routed expert's three SwiGLU matrices (gate, up, down)."""
        return 3.0 * self.hidden * self.expert_ffn * self.dtype_bytes

    @property
    def expert_flops_per_token(self) -> float:
        """FLOPs one token spends in one routed expert (three matrix-vector products)."""
        return 2.0 * 3 * self.hidden * self.expert_ffn

    @property
    def token_bytes(self) -> float:
        """Bytes of one token's hidden state, as sent in an all-to-all dispatch or combine."""
        return float(self.hidden * self.dtype_bytes)

    # ---- per layer ------------------------------------------------------------------------------------

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.dense_layers

    @property
    def attention_params(self) -> float:
        """Weights of one layer's attention projections (q, k, v, o)."""
        if self.attention_params_override is not None:
            return float(self.attention_params_override)
        return float(self.hidden * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads))

    @property
    def non_expert_params_per_layer(self) -> float:
        """Weights read once per step by every MoE layer besides its routed experts: attention, the
        router, the shared expert and two norms."""
        return (self.attention_params + self.hidden * self.n_experts + 3.0 * self.hidden * self.shared_ffn
                + 2.0 * self.hidden)

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes one token of context holds in one layer."""
        return 2.0 * self.n_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def total_params(self) -> float:
        dense = self.dense_layers * (self.attention_params + 3.0 * self.hidden * self.dense_ffn + 2 * self.hidden)
        moe = self.n_moe_layers * (self.non_expert_params_per_layer + self.n_experts * 3.0 * self.hidden
                                   * self.expert_ffn)
        return dense + moe + 2.0 * self.vocab_size * self.hidden + self.hidden

    def replace(self, **overrides) -> "ModelShape":
        return dataclasses.replace(self, **overrides)


SHAPES: dict[str, ModelShape] = {
    # mistralai/Mixtral-8x7B-v0.1 config.json
    "mixtral-8x7b": ModelShape(
        name="mixtral-8x7b", vocab_size=32000, n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, head_dim=128,
        expert_ffn=14336, n_experts=8, top_k=2, rope_theta=1e6),
    # mistralai/Mixtral-8x22B-v0.1 config.json
    "mixtral-8x22b": ModelShape(
        name="mixtral-8x22b", vocab_size=32768, n_layers=56, hidden=6144, n_heads=48, n_kv_heads=8, head_dim=128,
        expert_ffn=16384, n_experts=8, top_k=2, rope_theta=1e6),
    # deepseek-ai/DeepSeek-V2-Lite config.json: 64 routed experts top-6 of width 1408, 2 shared experts
    # (2816), layer 0 dense (10944), MLA attention (q 2048x3072, kv_a 2048x576, kv_b 512x(16x256), o
    # 2048x2048). The engine builds MLA as 16-head attention of head_dim 128 (same bytes order).
    "deepseek-v2-lite": ModelShape(
        name="deepseek-v2-lite", vocab_size=102400, n_layers=27, hidden=2048, n_heads=16, n_kv_heads=16,
        head_dim=128, expert_ffn=1408, n_experts=64, top_k=6, shared_ffn=2816, dense_layers=1, dense_ffn=10944,
        rope_theta=1e4, norm_eps=1e-6,
        attention_params_override=2048 * 3072 + 2048 * 576 + 512 * 16 * 256 + 2048 * 2048),
    # allenai/OLMoE-1B-7B-0924 config.json: 64 experts top-8, no shared expert
    "olmoe-1b-7b": ModelShape(
        name="olmoe-1b-7b", vocab_size=50304, n_layers=16, hidden=2048, n_heads=16, n_kv_heads=16, head_dim=128,
        expert_ffn=1024, n_experts=64, top_k=8, rope_theta=1e4),
    # Qwen/Qwen3-30B-A3B config.json: 128 experts top-8
    "qwen3-30b-a3b": ModelShape(
        name="qwen3-30b-a3b", vocab_size=151936, n_layers=48, hidden=2048, n_heads=32, n_kv_heads=4, head_dim=128,
        expert_ffn=768, n_experts=128, top_k=8, rope_theta=1e6, norm_eps=1e-6),
}


def names() -> list[str]:
    return sorted(SHAPES)


def from_name(name: str, **overrides) -> ModelShape:
    """The shape called ``name`` (see :func:`names`), with any field overridden."""
    if name not in SHAPES:
        raise KeyError(f"unknown model shape {name!r}; known: {names()}")
    return SHAPES[name].replace(**overrides) if overrides else SHAPES[name]


def from_hf_config(config: dict, name: str | None = None) -> ModelShape:
    """A shape from a Hugging Face MoE ``config.json`` (a dict): Mixtral, OLMoE, Qwen-MoE, DeepSeek keys."""
    def need(*keys):
        for key in keys:
            if config.get(key) is not None:
                return config[key]
        raise ValueError(f"model config {name or config.get('model_type', '?')!r}: none of the fields "
                         f"{list(keys)} is set (expected a Hugging Face MoE config.json)")

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    shared = int(config.get("shared_expert_intermediate_size") or 0)
    if not shared and config.get("n_shared_experts"):
        shared = int(config["n_shared_experts"]) * int(need("moe_intermediate_size"))
    dense_layers = int(config.get("first_k_dense_replace") or 0)
    return ModelShape(
        name=name or str(config.get("_name_or_path") or config.get("model_type") or "model"),
        vocab_size=int(need("vocab_size")), n_layers=int(need("num_hidden_layers")), hidden=hidden,
        n_heads=heads, n_kv_heads=kv_heads, head_dim=int(config.get("head_dim") or hidden // heads),
        expert_ffn=int(need("moe_intermediate_size", "intermediate_size")),
        n_experts=int(need("num_local_experts", "num_experts", "n_routed_experts")),
        top_k=int(need("num_experts_per_tok", "top_k")), shared_ffn=shared, dense_layers=dense_layers,
        dense_ffn=int(config.get("intermediate_size") or 0) if dense_layers else 0,
        rope_theta=float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 1e4),
        norm_eps=float(config.get("rms_norm_eps") or 1e-5))
