"""Import the per-token DeepSeek-V2-Lite routing CSVs (``traces/deepseek-v2-lite-puffin``).

One file per prompt, ``prompt_<n>_data.csv`` (request id ``n``), one row per (MoE layer, token):

    Layer ID,Batch Number,Token,Activated Expert IDs
    1,0,<｜begin▁of▁sentence｜>,"[8, 26, 56, 57, 60, 43]"

Model layers 1..26 (the MoE layers of DeepSeek-V2-Lite; layer 0 is dense) become trace layers
0..25 with ``layer_ids = [1, ..., 26]``; 64 routed experts, top-6; prefill only (step 0). A token's
position is its order within the file at its layer, and every layer must list the same tokens in the
same order (checked). The files carry token *strings*, not ids, and DeepSeek's tokenizer is not at
hand offline, so ``token_id`` is trace-local: the index of the string in the sorted vocabulary of
strings seen in the imported files, which is stored in ``meta.model_config['token_vocab']``. Equal
strings get equal ids, which is what a per-token-id predictor needs.

The expert lists are kept in file order. In all 579,462 rows of the 300 files the first five ids are
ascending, so that order is not the router's score order: treat each row as a set.

Reading is vectorised with pyarrow (CSV parse, regex check and list split in C++): the 300 files
(22 MB) import in about a second or two.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from ..trace import PREFILL, RoutingTrace, TraceError, TraceMeta

MODEL = "deepseek-ai/DeepSeek-V2-Lite-Chat"
LAYER_IDS = list(range(1, 27))
N_EXPERTS = 64
TOP_K = 6
COLUMNS = ["Layer ID", "Batch Number", "Token", "Activated Expert IDs"]
FILE_PATTERN = re.compile(r"^prompt_(\d+)_data\.csv$")
_LIST_PATTERN = r"^\[\s*-?\d+(\s*,\s*-?\d+)*\s*\]$"
# the vocabulary goes into the footer metadata only while it stays small
MAX_VOCAB_IN_META = 100_000


def _numbered(path: Path) -> list[tuple[int, Path]]:
    """``[(n, file)]`` of one folder or file, sorted by n."""
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix == ".csv"]
        if not files:
            raise TraceError(f"{path}: folder holds no prompt_<n>_data.csv files")
    elif path.exists():
        files = [path]
    else:
        raise TraceError(f"{path}: no such file or folder")
    out = []
    for f in files:
        m = FILE_PATTERN.match(f.name)
        if not m:
            raise TraceError(f"{f}: file name must be prompt_<n>_data.csv (n = request id)")
        out.append((int(m.group(1)), f))
    return sorted(out)


def deepseek_files(path: str | os.PathLike | list) -> list[tuple[int, Path]]:
    """``[(request_id, file)]`` in request order, for a folder, one file, or a list of folders and
    files. Request ids are the files' ``n``; when the sources of a list repeat an ``n`` (two folders
    both starting at prompt_0), each source's ids are shifted past the previous source's largest,
    so the list's order is the requests' arrival order."""
    sources = [_numbered(Path(p)) for p in (path if isinstance(path, (list, tuple)) else [path])]
    out = [rf for source in sources for rf in source]
    ids = [r for r, _ in out]
    if len(set(ids)) != len(ids):
        if len(sources) == 1 or any(len({r for r, _ in s}) != len(s) for s in sources):
            raise TraceError(f"two files share a request id among {[str(f) for _, f in out]}")
        out, offset = [], 0
        for source in sources:
            out += [(offset + r, f) for r, f in source]
            offset += max(r for r, _ in source) + 1
    return sorted(out)


def _read_one(path: Path) -> dict[str, np.ndarray]:
    """Parse one file into ``layer[rows]`` (0-based), ``token[rows]`` (object), ``experts[rows, 6]``."""
    where = str(path)
    try:
        table = pcsv.read_csv(
            path,
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in COLUMNS}, strings_can_be_null=False, null_values=[]
            ),
        )
    except pa.ArrowInvalid as e:
        raise TraceError(f"{where}: not a readable CSV of columns {COLUMNS} ({e})") from None
    if table.column_names != COLUMNS:
        raise TraceError(f"{where}: header is {table.column_names}, expected {COLUMNS}")
    n = table.num_rows
    if n == 0:
        raise TraceError(f"{where}: no rows")

    def bad_row(mask, column: str, expected: str, values=None):
        row = int(np.argmax(mask))
        shown = (values if values is not None else table.column(column).to_numpy(zero_copy_only=False))[row]
        shown = shown.item() if isinstance(shown, np.generic) else shown
        raise TraceError(f"{where}: row {row + 1} (line {row + 2}), column '{column}' is {shown!r}; expected {expected}")

    ints = {}
    for name in ("Layer ID", "Batch Number"):
        col = table.column(name)
        ok = pc.match_substring_regex(col, r"^\s*-?\d+\s*$").to_numpy(zero_copy_only=False)
        if not ok.all():
            bad_row(~ok, name, "an integer")
        ints[name] = pc.cast(pc.utf8_trim_whitespace(col), pa.int64()).to_numpy()
    layer_id = ints["Layer ID"]
    bad = (layer_id < LAYER_IDS[0]) | (layer_id > LAYER_IDS[-1])
    if bad.any():
        bad_row(bad, "Layer ID", f"a MoE layer {LAYER_IDS[0]}..{LAYER_IDS[-1]}", layer_id)

    lists = table.column("Activated Expert IDs")
    ok = pc.match_substring_regex(lists, _LIST_PATTERN).to_numpy(zero_copy_only=False)
    if not ok.all():
        bad_row(~ok, "Activated Expert IDs", f"a JSON list of {TOP_K} integer expert ids like \"[8, 26, 56, 57, 60, 43]\"")
    parts = pc.split_pattern(pc.replace_substring_regex(lists, r"[\[\]\s]", ""), ",")
    lengths = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    if (lengths != TOP_K).any():
        bad_row(lengths != TOP_K, "Activated Expert IDs", f"a list of exactly top_k={TOP_K} ids")
    experts = pc.cast(pc.list_flatten(parts), pa.int64()).to_numpy().reshape(n, TOP_K)
    bad = ((experts < 0) | (experts >= N_EXPERTS)).any(axis=1)
    if bad.any():
        bad_row(bad, "Activated Expert IDs", f"expert ids in 0..{N_EXPERTS - 1}")
    s = np.sort(experts, axis=1)
    dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
    if dup.any():
        bad_row(dup, "Activated Expert IDs", f"{TOP_K} distinct expert ids")

    token = table.column("Token").to_numpy(zero_copy_only=False)
    layer = (layer_id - LAYER_IDS[0]).astype(np.int64)
    # every layer must list the same tokens in the same order
    per_layer = np.bincount(layer, minlength=len(LAYER_IDS))
    if (per_layer != per_layer[0]).any() or per_layer[0] == 0:
        missing = [LAYER_IDS[i] for i in np.flatnonzero(per_layer != per_layer.max())]
        raise TraceError(
            f"{where}: layers hold different numbers of tokens ({dict(zip(LAYER_IDS, per_layer.tolist()))}); "
            f"layer(s) {missing} differ; expected the same tokens at all {len(LAYER_IDS)} MoE layers"
        )
    T = int(per_layer[0])
    order = np.argsort(layer, kind="stable")  # rows of each layer, in file order
    tok_grid = token[order].reshape(len(LAYER_IDS), T)
    mismatch = (tok_grid != tok_grid[0]).any(axis=0)
    if mismatch.any():
        p = int(np.argmax(mismatch))
        li = int(np.argmax(tok_grid[:, p] != tok_grid[0, p]))
        raise TraceError(
            f"{where}: token {p} is {tok_grid[0, p]!r} at layer {LAYER_IDS[0]} but {tok_grid[li, p]!r} at layer "
            f"{LAYER_IDS[li]}; expected the same token sequence at every layer"
        )
    # token-major: [position, layer]
    rows = order.reshape(len(LAYER_IDS), T).T.reshape(-1)
    return {"tokens": tok_grid[0], "experts": experts[rows], "T": T}


def read_deepseek_tokens(path, limit: int | None = None) -> dict[int, list[str]]:
    """``{request_id: [token string per position]}`` (the prompt text as DeepSeek's tokens)."""
    files = deepseek_files(path)[:limit]
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        parsed = list(pool.map(lambda rf: _read_one(rf[1]), files))
    return {r: p["tokens"].tolist() for (r, _), p in zip(files, parsed)}


def read_deepseek_csv(path, limit: int | None = None, vocab: list[str] | None = None) -> RoutingTrace:
    """Read the DeepSeek-V2-Lite CSVs (a folder, one file, or a list of folders and files) into a
    :class:`RoutingTrace`. ``limit`` keeps the first ``limit`` files by request id. Rows are ordered
    (request, position, layer). Errors name the file, row (1-based, header excluded) and column.

    ``vocab``: token strings whose index is the id (another import's ``token_vocab``), so that two
    imports share one id space; strings it lacks get ids after it, in sorted order. Without it the
    vocabulary is the sorted strings of these files. Either way it travels in the trace's metadata.
    """
    files = deepseek_files(path)[:limit]
    if not files:
        raise TraceError(f"{path}: no files to read (limit={limit})")
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        parsed = list(pool.map(lambda rf: _read_one(rf[1]), files))
    lengths = np.array([p["T"] for p in parsed])
    all_tokens = np.concatenate([p["tokens"] for p in parsed])
    strings = all_tokens.astype(str)
    if vocab is None:
        vocab, token_id = np.unique(strings, return_inverse=True)
    else:
        vocab = np.array(list(vocab) + sorted(set(strings.tolist()) - set(vocab)), dtype=object)
        index = {s: i for i, s in enumerate(vocab.tolist())}
        token_id = np.array([index[s] for s in strings.tolist()], dtype=np.int64)
    L = len(LAYER_IDS)
    request = np.repeat([r for r, _ in files], lengths)
    position = np.concatenate([np.arange(t) for t in lengths])
    meta = TraceMeta(
        model=MODEL,
        n_layers=L,
        n_experts=N_EXPERTS,
        top_k=TOP_K,
        layer_ids=list(LAYER_IDS),
        model_config={
            "n_routed_experts": N_EXPERTS,
            "num_experts_per_tok": TOP_K,
            "moe_layers": list(LAYER_IDS),
            "token_vocab": vocab.tolist() if len(vocab) <= MAX_VOCAB_IN_META else None,
            "token_vocab_size": int(len(vocab)),
        },
        tokenizer="deepseek-v2 byte-level BPE (strings only; token_id = index into model_config['token_vocab'])",
        dataset="Puffin chat prompts (ngavhane/moe-beyond, training_data_eamc)",
        source="import:deepseek-csv",
        recorded={
            "path": [str(p) for p in path] if isinstance(path, (list, tuple)) else str(path),
            "files": len(files),
            "phase": "prefill only",
            "quantisation": "8-bit",
        },
        notes=(
            "Imported from per-token CSVs of DeepSeek-V2-Lite-Chat (8-bit) prefill. token_id is trace-local: the "
            "index of the token string in model_config['token_vocab'] (sorted strings seen in these files), not "
            "DeepSeek's tokenizer id. Expert ids are in file order, which is not router score order (the first five "
            "are always ascending): treat each row as a set. No gate weights."
        ),
    )
    T = len(token_id)
    return RoutingTrace.from_token_major(
        meta,
        request_id=request,
        step=np.zeros(T, dtype=np.int32),
        position=position,
        token_id=token_id,
        experts=np.concatenate([p["experts"] for p in parsed]).reshape(T, L, TOP_K),
    ).validate(str(path))


assert PREFILL == 0  # step 0 rows are prefill (from_token_major derives phase from step)
