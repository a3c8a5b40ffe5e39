"""One results row per run, shared by the simulator, the executor, sweeps, reports and notebooks.

A row is a flat dict: the flattened resolved config (``config.<dotted.key>``), then the fields of
:data:`FIELDS`. Speedups are never stored: compute them at read time against a named baseline row.
Rows are written as parquet shards, atomically, and read back as one pandas table.
"""

from __future__ import annotations

import platform
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .paths import git_commit
from .files import atomic_path

# field -> meaning; every row carries all of them (NaN where a backend has no value)
FIELDS: dict[str, str] = {
    "run_id": "unique id of the run (keys the per-layer side table)",
    "backend": "'sim' (simulator) or 'exec' (executor)",
    "device": "what produced the numbers, e.g. 'NVIDIA H100 80GB HBM3 x4' or 'sim:h100_8gpu'",
    "moe_ms": "MoE-layer time per run, all layers and steps, ms",
    "dispatch_ms": "all-to-all dispatch, ms",
    "expert_ms": "expert FFN compute (slowest GPU), ms",
    "combine_ms": "all-to-all combine, ms",
    "predictor_ms": "predictor time on the critical path, ms",
    "migration_ms": "expert weights moved between placements, ms",
    "other_ms": "non-MoE part (attention etc.), ms",
    "total_ms": "end-to-end, ms",
    "imbalance": "max/mean tokens per GPU, averaged over layers and steps",
    "tokens": "tokens processed",
    "bytes_all_to_all": "bytes sent across GPUs by dispatch and combine",
    "bytes_migrated": "bytes of expert weights moved",
    "predictor_accuracy": "predictor's headline accuracy (recall@k for token predictors, 1 - TV for distribution)",
    "predictor_error": "predictor's load-distribution error (total variation), where defined",
    "moegps_version": "package version",
    "git_commit": "project commit that produced the row",
    "host": "machine name",
}


def flatten(config: Mapping[str, Any], prefix: str = "config.") -> dict[str, Any]:
    """Nested mapping -> ``{"config.a.b": value}``; lists become strings so every column is scalar."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = str(list(value))
        else:
            out[name] = value
    return out


def make_row(config: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """A results row: flattened ``config`` plus ``fields`` (unknown field names are an error)."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise KeyError(f"unknown results field(s) {sorted(unknown)}; known: {sorted(FIELDS)}")
    row = {name: float("nan") for name in FIELDS}
    row.update(run_id=uuid.uuid4().hex[:12], moegps_version=__version__, git_commit=git_commit(),
               host=platform.node(), backend="", device="")
    row.update(fields)
    row.update(flatten(config))
    return row


def write_rows(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows as one parquet shard, atomically."""
    table = pa.Table.from_pandas(pd.DataFrame(list(rows)), preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


class ResultsError(RuntimeError):
    """A results shard that cannot be used; the message names the file and what to do."""


def shard_problem(path: str | Path, key: str | None = None) -> str | None:
    """Why the shard at ``path`` is not a finished set of rows (None when it is): unreadable
    (truncated, not parquet), no rows, a field of :data:`FIELDS` missing, or (with ``key``) rows
    of another run. Reads the footer and two columns, not the whole file."""
    try:
        file = pq.ParquetFile(path)
        names = set(file.schema_arrow.names)
        if file.metadata.num_rows == 0:
            return "it holds no rows"
        missing = sorted(set(FIELDS) - names)
        if missing:
            return f"it lacks the results field(s) {missing}"
        if key is not None and "config.key" in names:
            keys = set(file.read(columns=["config.key"]).column(0).to_pylist())
            if keys != {key}:
                return f"its rows belong to run(s) {sorted(map(str, keys))}, not {key}"
        file.read(columns=["run_id", "total_ms"])  # the data pages, not only the footer, must decode
    except (pa.ArrowException, OSError) as e:
        return f"it is not a readable parquet file ({type(e).__name__}: {e})"
    return None


def read_shard(path: str | Path) -> pd.DataFrame:
    """One results shard as a table; :class:`ResultsError` naming the file and the fix when it is unusable."""
    problem = shard_problem(path)
    if problem is None:
        try:
            return pd.read_parquet(path)
        except (pa.ArrowException, OSError) as e:
            problem = f"it is not a readable parquet file ({type(e).__name__}: {e})"
    raise ResultsError(f"{path}: not a usable results shard: {problem}. It was cut short or replaced; delete it and "
                       "rerun the command that wrote it (a sweep reruns only the runs without a usable shard)")


# per-layer side tables (simulator: per_layer.parquet; executor: layers/<run_id>.parquet) and the
# sweep's cached train/test traces live beside results shards; they are not rows
SIDE_TABLES = ("per_layer.parquet",)
SIDE_FOLDERS = ("layers", "cache")


def _side_table(file: Path, root: Path) -> bool:
    return file.name in SIDE_TABLES or any(part in SIDE_FOLDERS for part in file.relative_to(root).parts[:-1])


def read_results(path: str | Path) -> pd.DataFrame:
    """All shards under ``path`` (a file or a folder, searched recursively) as one table; a shard
    that cannot be read is an error naming it (never skipped: a missing run would change a mean)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*.parquet") if not _side_table(f, path))
    if not files:
        raise FileNotFoundError(f"{path}: no results parquet files found")
    return pd.concat([read_shard(f) for f in files], ignore_index=True)
