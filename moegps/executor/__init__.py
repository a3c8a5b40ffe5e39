"""Live expert-parallel (and tensor-parallel) MoE execution on torch.distributed: layers, re-placement, runner."""

from .dist import Comm, init, spawn
from .layer import ExpertParallelMoE, TensorParallelMoE, expert_compute, moe_reference

__all__ = ["Comm", "init", "spawn", "ExpertParallelMoE", "TensorParallelMoE", "expert_compute", "moe_reference"]
