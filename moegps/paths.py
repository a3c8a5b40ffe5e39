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
CONF_DIR = PROJECT_ROOT / "conf"
BUNDLED_MODELS = PACKAGE_ROOT / "models" / "bundled"


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


def trace_name(spec: str) -> str:
    """Short name of a trace spec for output folders: the file or folder stem (``deepseek`` as is)."""
    return Path(str(spec)).stem or "trace"


def register_resolvers() -> None:
    """The interpolations that conf/ uses: ``${moegps.project_root:}``, ``${moegps.data_root:}`` and
    ``${trace_name:<spec>}``. Every hydra entry point calls this before composing a config."""
    from omegaconf import OmegaConf

    for name, resolver in (("moegps.project_root", lambda: str(PROJECT_ROOT)),
                           ("moegps.data_root", lambda: str(data_root())),
                           ("trace_name", trace_name)):
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
