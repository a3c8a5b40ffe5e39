"""Writing files safely: every stage's outputs go through here.

    from moegps.files import atomic_path, save_png
    with atomic_path("out/rows.csv") as tmp:   # write tmp; renamed onto out/rows.csv on success
        frame.to_csv(tmp)
    save_png(fig, "out/figure.png")            # a matplotlib figure, written atomically, closed
    markdown_table(rows)                       # dict rows as a markdown table (reports, logs)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class atomic_path:
    """Context manager yielding a temporary path beside ``path``; renamed onto ``path`` on success.

    An interrupted write leaves at most a stray ``.tmp`` file, never a truncated ``path``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes files owner-only; give them the usual mode
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
        return False


def save_png(fig, path: str | os.PathLike, dpi: int = 130, **savefig) -> Path:
    """Write a matplotlib figure as PNG through ``atomic_path`` and close it; returns the path.
    ``savefig``: more arguments for ``fig.savefig`` (e.g. ``bbox_inches="tight"``)."""
    import matplotlib.pyplot as plt  # lazy: matplotlib is heavy and only plots need it

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", **savefig)
    plt.close(fig)
    return Path(path)


def markdown_table(rows: list[dict], number: str = "{:.4g}") -> str:
    """``rows`` (dicts; the first one's keys are the columns, a key a row lacks is left blank) as a markdown
    table, floats written with ``number``; "" for no rows."""
    if not rows:
        return ""
    keys = list(rows[0])
    cell = lambda v: number.format(v) if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows])
