"""What the simulator simulates on: a system profile (``SystemSpec``). Model shapes: :mod:`moegps.shapes`.

Profiles live in ``moegps/conf/system/<name>.yaml`` in human units (GB/s, TFLOP/s, microseconds); in
memory everything is SI (bytes/s, FLOP/s, seconds). Each profile says, per number, whether it is a
datasheet value or a measurement (``provenance``), because a simulator is only as good as its
inputs and users must know which inputs were checked.

Topologies (how the all-to-all time is computed, see :func:`moegps.simulator.cost.all_to_all_time`):

- ``switch``: every GPU has ``link_gbps`` per direction into a non-blocking switch (NVLink/NVSwitch
  within a node); GPUs in different nodes talk at ``inter_node_gbps`` per GPU (one NIC per GPU,
  rail-optimised InfiniBand).
- ``full_mesh``: a dedicated link of ``link_gbps`` per direction between every pair of GPUs
  (MoE-GPS's "fully connected" 4-GPU setting).
- ``mesh2d``: devices on a ``mesh_shape`` grid, ``link_gbps`` per direction on each neighbour link,
  dimension-order routing (the wafer-scale setting of arXiv 2510.05497).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..paths import CONF_DIR

SYSTEM_DIR = CONF_DIR / "system"
TOPOLOGIES = ("switch", "full_mesh", "mesh2d")


class SystemSpecError(ValueError):
    """A system profile that cannot be used; the message names the file and field."""


@dataclass
class SystemSpec:
    """A cluster as the cost model sees it. SI units: bytes/s, FLOP/s, seconds, bytes."""

    name: str = "h100_8gpu"
    n_gpus: int = 8
    gpus_per_node: int = 8
    topology: str = "switch"
    mesh_shape: tuple[int, int] | None = None  # (rows, cols) for mesh2d
    hbm_bandwidth: float = 3.0e12  # effective bytes/s a kernel streams weights at
    matmul_flops: float = 7.5e14  # effective dense bf16 FLOP/s at large shapes
    link_bandwidth: float = 4.5e11  # bytes/s per direction (per GPU for switch; per link otherwise)
    link_latency: float = 5e-6  # seconds per all-to-all (launch + synchronisation)
    inter_node_bandwidth: float = 5e10  # bytes/s per direction per GPU across nodes
    inter_node_latency: float = 1e-5
    memory_bytes: float = 80e9
    extra_slots_per_gpu: int = 0  # expert slots beyond n_experts / n_gpus (room for replicas)
    expert_launch: float = 3e-6  # seconds of fixed cost per active expert GEMM group
    layer_overhead: float = 2e-5  # seconds of fixed cost per MoE layer (routing, permute, align)
    # seconds of fixed cost per layer of a whole-model call beyond its rooflines (serving): the attention block's
    # small kernels' launches and tails (norms, rope and cache write, attention, router)
    block_overhead: float = 0.0
    tile_tokens: int = 16  # expert GEMMs pad each expert's tokens to a multiple of this
    roofline_p: float | None = None  # None: max(memory, compute); p: (mem^p + compute^p)^(1/p), a smooth knee
    provenance: dict[str, str] = field(default_factory=dict)  # field -> "measured: ..." | "datasheet: ..."
    notes: str = ""

    def __post_init__(self):
        if self.mesh_shape is not None:
            self.mesh_shape = tuple(int(x) for x in self.mesh_shape)
        self.check()

    def check(self, where: str = "<SystemSpec>") -> "SystemSpec":
        def bad(name, expected):
            raise SystemSpecError(f"{where}: field '{name}' is {getattr(self, name)!r}, expected {expected}")

        for name in ("n_gpus", "gpus_per_node"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "a positive int")
        if self.n_gpus % self.gpus_per_node:
            bad("gpus_per_node", f"a divisor of n_gpus={self.n_gpus}")
        if self.topology not in TOPOLOGIES:
            bad("topology", f"one of {TOPOLOGIES}")
        if self.topology != "switch" and self.gpus_per_node != self.n_gpus:
            bad("gpus_per_node", f"n_gpus={self.n_gpus}: topology {self.topology} has no nodes (every device is on one "
                "fabric), so gpus_per_node cannot be set to anything else")
        if self.topology == "mesh2d":
            if self.mesh_shape is None or len(self.mesh_shape) != 2 or self.mesh_shape[0] * self.mesh_shape[1] != self.n_gpus:
                bad("mesh_shape", f"(rows, cols) with rows * cols = n_gpus = {self.n_gpus}")
        for name in ("hbm_bandwidth", "matmul_flops", "link_bandwidth", "inter_node_bandwidth", "memory_bytes"):
            if not getattr(self, name) > 0:
                bad(name, "a positive number")
        for name in ("link_latency", "inter_node_latency", "expert_launch", "layer_overhead", "block_overhead"):
            if not getattr(self, name) >= 0:
                bad(name, "a number >= 0")
        if self.roofline_p is not None and not self.roofline_p > 0:
            bad("roofline_p", "null (a sharp max) or a positive number")
        if self.tile_tokens < 1:
            bad("tile_tokens", "an int >= 1")
        if self.extra_slots_per_gpu < 0:
            bad("extra_slots_per_gpu", "an int >= 0")
        return self

    @property
    def n_nodes(self) -> int:
        return self.n_gpus // self.gpus_per_node

    def node_of(self):
        """``[gpu]`` node index of each GPU."""
        import numpy as np

        return np.arange(self.n_gpus) // self.gpus_per_node

    def check_memory(self, slots_per_gpu: int, layers: int, expert_bytes: float) -> None:
        """Raise when ``slots_per_gpu`` expert slots of ``expert_bytes`` for ``layers`` MoE layers exceed a
        GPU's memory (``memory_gb``): such a placement cannot be served."""
        need = slots_per_gpu * layers * expert_bytes
        if need > self.memory_bytes:
            raise SystemSpecError(f"{self.name}: {slots_per_gpu} expert slots x {layers} MoE layers x "
                                  f"{expert_bytes / 1e6:.1f} MB = {need / 1e9:.1f} GB per GPU exceed memory_gb="
                                  f"{self.memory_bytes / 1e9:g}")

    def slots_per_gpu(self, n_experts: int) -> int:
        """Expert slots per GPU for a model of ``n_experts``: an even share plus the extra slots."""
        return -(-n_experts // self.n_gpus) + self.extra_slots_per_gpu

    def replace(self, **changes) -> "SystemSpec":
        """A copy with fields changed (SI units), e.g. ``spec.replace(link_bandwidth=64e9)``."""
        return dataclasses.replace(self, **changes)


# yaml key (human units) -> (SystemSpec field, factor to SI)
_UNITS: dict[str, tuple[str, float]] = {
    "hbm_gbps": ("hbm_bandwidth", 1e9),
    "matmul_tflops": ("matmul_flops", 1e12),
    "link_gbps": ("link_bandwidth", 1e9),
    "link_latency_us": ("link_latency", 1e-6),
    "inter_node_gbps": ("inter_node_bandwidth", 1e9),
    "inter_node_latency_us": ("inter_node_latency", 1e-6),
    "memory_gb": ("memory_bytes", 1e9),
    "expert_launch_us": ("expert_launch", 1e-6),
    "layer_overhead_us": ("layer_overhead", 1e-6),
    "block_overhead_us": ("block_overhead", 1e-6),
}
_PLAIN = ("name", "n_gpus", "gpus_per_node", "topology", "mesh_shape", "extra_slots_per_gpu", "tile_tokens",
          "roofline_p", "notes")


def system_from_dict(raw: dict[str, Any], where: str = "<dict>") -> SystemSpec:
    """A profile from a mapping in yaml units (``hbm_gbps``, ``link_latency_us``, ...).

    A value may be a number or ``{value: x, source: "measured: ..."}``; the sources are collected
    into ``provenance``.
    """
    raw = dict(raw)
    provenance = dict(raw.pop("provenance", {}) or {})
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and "value" in value:
            if "source" in value:
                provenance[key] = str(value["source"])
            value = value["value"]
        if key in _UNITS:
            name, factor = _UNITS[key]
            try:
                kwargs[name] = float(value) * factor
            except (TypeError, ValueError):
                raise SystemSpecError(f"{where}: field '{key}' is {value!r}, expected a number") from None
        elif key in _PLAIN:
            kwargs[key] = value
        else:
            raise SystemSpecError(
                f"{where}: unknown field '{key}'; known: {sorted(list(_UNITS) + list(_PLAIN) + ['provenance'])}"
            )
    unused = [k for k in ("inter_node_gbps", "inter_node_latency_us") if k in raw]
    if unused and kwargs.get("topology", "switch") != "switch":
        raise SystemSpecError(f"{where}: field(s) {unused} cannot be set for topology {kwargs['topology']!r}: it has no "
                              "nodes, so nothing crosses between them (remove them)")
    try:
        spec = SystemSpec(provenance=provenance, **kwargs)
    except SystemSpecError as e:
        raise SystemSpecError(str(e).replace("<SystemSpec>", where)) from None
    return spec


def system_to_dict(spec: SystemSpec) -> dict[str, Any]:
    """The yaml-unit mapping of a profile (inverse of :func:`system_from_dict`)."""
    out: dict[str, Any] = {k: getattr(spec, k) for k in _PLAIN}
    out["mesh_shape"] = list(spec.mesh_shape) if spec.mesh_shape else None
    for key, (name, factor) in _UNITS.items():
        out[key] = getattr(spec, name) / factor
    out["provenance"] = dict(spec.provenance)
    return out


def available_systems() -> list[str]:
    return sorted(p.stem for p in SYSTEM_DIR.glob("*.yaml"))


def load_system(name_or_path: str | Path, **overrides) -> SystemSpec:
    """A profile by name (``moegps/conf/system/<name>.yaml``) or path; ``overrides`` in yaml units."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SYSTEM_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise SystemSpecError(f"{path}: no such system profile; available: {available_systems()}")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise SystemSpecError(f"{path}: expected a mapping of profile fields, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    raw.update(overrides)
    return system_from_dict(raw, where=str(path))


def resolve_system(spec: Any) -> SystemSpec:
    """A profile from a name, a path, or a mapping of yaml fields (what hydra's ``system`` group gives)."""
    if isinstance(spec, SystemSpec):
        return spec
    if isinstance(spec, dict):
        return system_from_dict(spec, where=f"moegps/conf/system/{spec.get('name', '?')}.yaml")
    return load_system(spec)


def hydra_system(config: dict[str, Any]) -> None:
    """Name the hydra-composed ``system`` mapping after the profile file it came from."""
    from hydra.core.hydra_config import HydraConfig  # lazy: hydra only where a hydra app runs

    if isinstance(config.get("system"), dict):
        config["system"].setdefault("name", HydraConfig.get().runtime.choices.get("system", "custom"))
