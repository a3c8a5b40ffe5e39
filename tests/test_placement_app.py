"""``python -m moegps.placement`` end to end on the synthetic source (hydra compose, small grid)."""

from __future__ import annotations

import pandas as pd
from hydra import compose, initialize_config_dir

from moegps.paths import CONF_DIR, register_resolvers
from moegps.placement.__main__ import main


def test_app_writes_tables(tmp_path, capsys):
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("placement_app", overrides=[f"out={tmp_path}", "system.gpus=[2,4]", "system.extra_slots=[0,1]",
                                                  "incremental_budgets=[0,2]", "milp.max_cells=32", "restarts=2"])
    df = main(cfg)
    printed = capsys.readouterr().out
    assert "balanced" in printed and "incremental re-placement" in printed
    assert "out of sample: random split by request in arrival order" in printed
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert set(summary.phase) == {"all", "prefill", "decode", "per_request"}
    assert set(summary.data) == {"test", "train"}
    assert {"contiguous", "balanced", "prefill_aware", "locality_first", "optimal"} <= set(summary.algorithm)
    assert (summary.imb_mean >= summary.bound_mean - 1e-9).all()
    assert (pd.read_csv(tmp_path / "incremental.csv").copies >= 0).all()
    assert len(df) == len(summary)
