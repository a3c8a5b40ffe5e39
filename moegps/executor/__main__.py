"""``python -m moegps.executor key=value ...`` (hydra; moegps/conf/execute.yaml), under torchrun or alone.

Examples::

    python -m moegps.executor shape=tiny                       # one process, CPU or one GPU
    python -m moegps.executor shape=mixtral-8x7b n_layers=2 phase=decode batch_requests=1
    torchrun --standalone --nproc-per-node=4 -m moegps.executor shape=mixtral-8x7b trace=<trace> \\
        placement=balanced extra_slots=1 predictor=last_batch   # moegps/conf/placement, moegps/conf/predictor groups
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ..configs import check_arguments, hydra_command, validate
from .runner import ExecuteConfig, run


def app(cfg: DictConfig) -> None:
    """The command on a composed config (moegps/conf/execute.yaml): one run, its row written and printed."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    # the placement and predictor config groups (moegps/conf/placement, moegps/conf/predictor) are chosen by name
    choices = HydraConfig.get().runtime.choices
    placement = raw.get("placement") or {}
    raw["placement"] = choices.get("placement") or "contiguous"
    # the option's fields reach the algorithm (an unknown one is an error there)
    raw["placement_fields"] = {k: v for k, v in placement.items() if k not in ("name", "_target_")}
    predictor = None
    if raw.get("predictor"):
        check_arguments(hydra.utils.get_class(raw["predictor"]["_target_"]), raw["predictor"],
                        f"executor: predictor={choices['predictor']}")
        predictor = hydra.utils.instantiate(cfg.predictor)
        raw["predictor"] = choices["predictor"]
    else:
        raw["predictor"] = raw.get("forecast", "none")
    raw.pop("forecast", None)
    row, _ = run(validate(raw, ExecuteConfig, "executor"), predictor=predictor)
    if row.get("config.world_size", 1) == 1 or __import__("os").environ.get("RANK", "0") == "0":
        keys = ("device", "moe_ms", "dispatch_ms", "expert_ms", "combine_ms", "predictor_ms", "migration_ms",
                "total_ms", "imbalance", "tokens", "bytes_all_to_all", "bytes_migrated")
        print(" ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys))
        print(f"run_id={row['run_id']} written under {cfg.out}")


def main() -> None:
    hydra_command(app, "execute", "executor", errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    main()
