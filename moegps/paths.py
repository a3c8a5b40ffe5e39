"""Where things are: the project root, its configs, and the shared real data beside it.

The real data (MMLU, routing statistics, external traces) is never copied into the project; it is
read from ``$MOEGPS_DATA``, by default ``../shared/data`` next to the project root.
"""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_ROOT.parent
CONF_DIR = PACKAGE_ROOT / "conf"  # package data: the hydra configs ship in the wheel
BUNDLED_MODELS = PACKAGE_ROOT / "models" / "bundled"


def work_root() -> Path:
    """Where outputs go by default: the checkout's root when moegps runs from one (a
    ``pyproject.toml`` beside the package), else the current directory (an installed wheel: never
    inside site-packages)."""
    return PROJECT_ROOT if (PROJECT_ROOT / "pyproject.toml").is_file() else Path.cwd()


def data_root() -> Path:
    """Folder of the shared real data: ``$MOEGPS_DATA`` or ``<project>/../shared/data``."""
    return Path(os.environ.get("MOEGPS_DATA", PROJECT_ROOT.parent / "shared" / "data")).resolve()


def shared_data(*parts: str) -> Path:
    """A path under :func:`data_root`, with a clear error when it is absent."""
    path = data_root().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: shared data not found; set MOEGPS_DATA to the folder holding mmlu/, olmoe-routing/, traces/"
        )
    return path


DATA_ROOT_VAR = "$MOEGPS_DATA"


def portable_path(path: str | os.PathLike | None) -> str | None:
    """A path as it means the same on another machine: under the data root as ``$MOEGPS_DATA/<rest>``,
    under the project as relative to its root, anything else (a hub id, a path elsewhere) as given.
    Trace metadata and manifests store paths this way (an absolute data path means nothing elsewhere)."""
    if path is None or str(path) == "":
        return path
    p = Path(str(path)).expanduser()
    if not p.is_absolute():
        return str(path)
    p = p.resolve()
    if p.is_relative_to(data_root()):
        return f"{DATA_ROOT_VAR}/{p.relative_to(data_root())}".rstrip("/")
    if p.is_relative_to(PROJECT_ROOT):
        return str(p.relative_to(PROJECT_ROOT))
    return str(p)


def trace_name(spec: str) -> str:
    """Short name of a trace spec for output folders: the file or folder stem (``deepseek`` as is)."""
    return Path(str(spec)).stem or "trace"


def workload_name(trace: str, train: str | None = None, test: str | None = None) -> str:
    """Short name of a workload for output folders: the trace's, or ``<train>-to-<test>``."""
    if train not in (None, "", "None") and test not in (None, "", "None"):
        return f"{trace_name(train)}-to-{trace_name(test)}"
    return trace_name(trace)


def register_resolvers() -> None:
    """The interpolations that moegps/conf/ uses: ``${moegps.project_root:}`` (:func:`work_root`),
    ``${moegps.data_root:}``, ``${trace_name:<spec>}`` and ``${workload_name:<trace>,<train>,<test>}``.
    Every hydra entry point calls this before composing a config."""
    from omegaconf import OmegaConf

    for name, resolver in (("moegps.project_root", lambda: str(work_root())),
                           ("moegps.data_root", lambda: str(data_root())),
                           ("trace_name", trace_name), ("workload_name", workload_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The project's git commit (with '+dirty' if the tree has changes), or '' outside a checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""
