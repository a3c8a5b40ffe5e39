"""Prompts for trace collection: MMLU questions (hub or local files) and plain text documents.

Every loader returns a list of :class:`Prompt` in a deterministic order, with ``request_id`` equal
to the prompt's index in that order: the same source and options always give the same ids, so a
resumed collection (or a larger ``limit``) lines up with what was already written.

MMLU comes through ``datasets``: from the hub (``cais/mmlu``, config ``all``, split ``test``) or
from local files in the hub's layout, one file per subject (``<subject>_test.csv`` with columns
``question,choice0..choice3,answer``, as in ``../shared/data/mmlu/test``; JSONL and parquet too).
Each question is formatted the way MMLU is usually prompted (Hendrycks et al.'s template,
zero-shot): subject line, question, lettered choices, ``Answer:``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MMLU_HUB_ID = "cais/mmlu"
LETTERS = "ABCDEFGHIJ"
_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class PromptError(ValueError):
    """A prompt source that cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Prompt:
    """One request: its id, the text fed to the model, its subject/domain and where it came from."""

    request_id: int
    text: str
    subject: str
    source: str  # e.g. "abstract_algebra_test.csv:12" or "cais/mmlu:all:test:5"


def format_mmlu(subject: str, question: str, choices: list[str], answer: int | None = None) -> str:
    """The MMLU prompt, the one template of the project (collect, the importers' reconstruction, the
    bundled models' training text): subject line, question, lettered choices, then ``Answer:``; with
    ``answer`` (0-3) its letter ends the text (an answered example)."""
    lines = [f"The following is a multiple choice question about {subject.replace('_', ' ')}.", "", question.strip()]
    lines += [f"{LETTERS[i]}. {str(c).strip()}" for i, c in enumerate(choices)]
    lines.append("Answer:" + (f" {LETTERS[answer]}" if answer is not None else ""))
    return "\n".join(lines)


def load_mmlu(
    path: str | Path | None = None,
    hub_id: str = MMLU_HUB_ID,
    hub_config: str = "all",
    split: str = "test",
    limit: int | None = None,
) -> list[Prompt]:
    """MMLU questions as prompts, from local files when ``path`` is given and exists, else the hub.

    ``path`` is a folder of per-subject files (``*.csv``, ``*.jsonl``, ``*.parquet``; subject from
    the file name minus ``_test``/``_dev``/``_val``, or a ``subject`` column when present) or one
    such file. Files are read in sorted name order, rows in file order; only as many files as
    ``limit`` needs are read. With no usable local path, ``datasets.load_dataset(hub_id,
    hub_config, split=split)`` is tried (needs the hub or its local cache).
    """
    if path is not None and Path(path).exists():
        return _load_mmlu_local(Path(path), limit)
    try:
        import datasets

        ds = datasets.load_dataset(hub_id, hub_config, split=split)
    except Exception as e:  # offline, no cache, unknown id: say what was tried
        where = f"local path {path} does not exist; " if path is not None else ""
        raise PromptError(
            f"{where}could not load MMLU from the hub as {hub_id!r} (config {hub_config!r}, split {split!r}): {e}"
        ) from e
    return _mmlu_rows(ds, f"{hub_id}:{hub_config}:{split}", default_subject=None, start=0, limit=limit)


def load_text(
    path: str | Path,
    split_by: Literal["blank_line", "line", "file"] = "blank_line",
    min_chars: int = 1,
    limit: int | None = None,
    domain: str | None = None,
) -> list[Prompt]:
    """Plain-text documents as prompts: one per blank-line-separated block, per line, or per file.

    ``path`` is a ``.txt`` file or a folder of them (sorted by name). Blocks shorter than
    ``min_chars`` (after stripping) are dropped. The domain is ``domain`` or the file's stem
    (``arxiv_texts.txt`` -> ``arxiv``).
    """
    path = Path(path)
    if not path.exists():
        raise PromptError(f"{path}: text file or folder not found")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise PromptError(f"{path}: folder holds no *.txt files")
    if split_by not in ("blank_line", "line", "file"):
        raise PromptError(f"split_by must be 'blank_line', 'line' or 'file', got {split_by!r}")
    prompts: list[Prompt] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise PromptError(f"{file}: not UTF-8 text ({e})") from None
        if split_by == "file":
            blocks = [text]
        elif split_by == "line":
            blocks = text.splitlines()
        else:
            blocks = _blank_line_blocks(text)
        name = domain or file.stem.removesuffix("_texts")
        for i, block in enumerate(blocks):
            block = block.strip()
            if len(block) < max(min_chars, 1):
                continue
            prompts.append(Prompt(len(prompts), block, name, f"{file.name}:{i}"))
            if limit is not None and len(prompts) >= limit:
                return prompts
    return prompts


def load_prompts(cfg) -> list[Prompt]:
    """Prompts described by a dataset config (``moegps/conf/dataset/*.yaml``): ``kind`` is mmlu or text."""
    kind = cfg.get("kind", "mmlu")
    limit = cfg.get("limit")
    if kind == "mmlu":
        return load_mmlu(
            path=cfg.get("path"),
            hub_id=cfg.get("hub_id") or MMLU_HUB_ID,
            hub_config=cfg.get("hub_config", "all"),
            split=cfg.get("split", "test"),
            limit=limit,
        )
    if kind == "text":
        if not cfg.get("path"):
            raise PromptError("dataset config: kind 'text' needs 'path' (a .txt file or a folder of them)")
        return load_text(
            cfg["path"], split_by=cfg.get("split_by", "blank_line"), min_chars=cfg.get("min_chars", 1),
            limit=limit, domain=cfg.get("domain"),
        )
    raise PromptError(f"dataset config: 'kind' must be 'mmlu' or 'text', got {kind!r}")


# ---- helpers ------------------------------------------------------------------------------


def _blank_line_blocks(text: str) -> list[str]:
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


def _load_mmlu_local(path: Path, limit: int | None) -> list[Prompt]:
    import datasets

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _FORMATS and not p.name.startswith("."))
        if not files:
            raise PromptError(f"{path}: folder holds no MMLU files (*.csv, *.jsonl, *.parquet)")
    else:
        if path.suffix not in _FORMATS:
            raise PromptError(f"{path}: unknown file type {path.suffix!r}; expected .csv, .jsonl or .parquet")
        files = [path]
    prompts: list[Prompt] = []
    progress = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        for file in files:
            try:
                fmt = _FORMATS[file.suffix]
                # MMLU has literal answers like "None" and "NA": keep CSV cells as written
                extra = {"keep_default_na": False} if fmt == "csv" else {}
                ds = datasets.load_dataset(fmt, data_files=str(file), split="train", **extra)
            except Exception as e:
                raise PromptError(f"{file}: could not be read as {_FORMATS[file.suffix]} ({e})") from e
            subject = file.stem
            for suffix in ("_test", "_dev", "_val", "_validation"):
                subject = subject.removesuffix(suffix)
            left = None if limit is None else limit - len(prompts)
            prompts += _mmlu_rows(ds, file.name, subject, start=len(prompts), limit=left)
            if limit is not None and len(prompts) >= limit:
                break
    finally:
        if progress:
            datasets.enable_progress_bars()
    return prompts


def _mmlu_rows(ds, where: str, default_subject: str | None, start: int, limit: int | None) -> list[Prompt]:
    """Format the rows of one MMLU table (choices as a ``choices`` list or ``choice0..`` columns)."""
    cols = set(ds.column_names)
    if "question" not in cols:
        raise PromptError(f"{where}: missing column 'question' (has {sorted(cols)})")
    if "choices" in cols:
        choice_cols = None
    else:
        choice_cols = [c for c in (f"choice{i}" for i in range(len(LETTERS))) if c in cols]
        if len(choice_cols) < 2 or choice_cols != [f"choice{i}" for i in range(len(choice_cols))]:
            raise PromptError(
                f"{where}: missing choice columns: expected 'choices' (a list) or 'choice0', 'choice1', ... "
                f"(has {sorted(cols)})"
            )
    if default_subject is None and "subject" not in cols:
        raise PromptError(f"{where}: missing column 'subject' (needed when the subject is not in the file name)")
    n = len(ds) if limit is None else min(len(ds), max(limit, 0))
    out = []
    for i, row in enumerate(ds.select(range(n))):
        choices = row["choices"] if choice_cols is None else [row[c] for c in choice_cols]
        if row["question"] is None or any(c is None for c in choices):
            raise PromptError(f"{where}: row {i} has an empty question or choice")
        subject = row.get("subject") or default_subject
        out.append(Prompt(start + i, format_mmlu(subject, row["question"], choices), subject, f"{where}:{i}"))
    return out
