"""The moegps engine: a compact MoE decoder at the hardware floor (see ``docs/engine.md``).

    from moegps.engine import Engine, build_model
    engine = Engine(build_model("mixtral-tiny"), max_batch=4, max_len=512)
    out = engine.generate([[1, 415, 5565]], max_new_tokens=16)

``model.py`` holds the weights, the KV cache and the forward passes; ``kernels.py`` the fused
Triton kernels between the GEMMs; ``generate.py`` batching, sampling and CUDA graphs; ``serve.py``
requests arriving over time, batched continuously; ``bench.py`` the benchmark against transformers.
"""

from .model import KVCache, Model, decode_step, from_transformers, load_checkpoint, prefill, random_model

__all__ = ["Engine", "Generation", "Sampling", "build_model", "KVCache", "Model", "decode_step",
           "from_transformers", "load_checkpoint", "prefill", "random_model"]


def __getattr__(name: str):
    # generate.py is also the CLI (python -m moegps.engine.generate): importing it here, before runpy
    # runs it as __main__, would load it twice (runpy warns); so its names load on first use.
    if name in ("Engine", "Generation", "Sampling", "build_model"):
        from . import generate
        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
