"""Training text for the bundled tiny models: load, cut into documents, deduplicate, split, tokenise.

Sources (both read from the shared data, never copied into the project):

- the five domain corpora of ``olmoe-routing/text`` (the very texts on which the real Mixtral-8x7B
  and OLMoE routing counts were measured), and
- the MMLU *dev* questions (285, five per subject), formatted as MMLU prompts with their answer.
  MMLU *test* is the tracing workload and is never read here.

The corpus files carry no document separators (the OLMoE analysis script tokenised each file as
one stream), and each file holds its text about twice: the second half repeats most of the first.
So documents are cut by content, not by offset: a new document starts at a natural marker (a
``# `` heading in wikipedia, ``\\title`` in arxiv) or at a line whose hash falls in a fixed bucket
(content-defined chunking, mean ``lines_per_document`` lines). Identical text therefore yields
identical documents wherever it occurs, and the duplicates are removed before the held-out split,
so no held-out text was seen in training. A document is also dropped when most of its non-trivial
lines already appeared in kept documents (the partial copies at the edges of a repeat).

``python -m moegps.models.data --out .carry/train/tokens.npz`` writes the tokenised corpus as one
``.npz`` (uint16 ids), which the GPU training run reads without needing the tokenizer.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moegps.paths import shared_data
from moegps.models.tokenizer import mixtral_tokenizer
from moegps.prompts import format_mmlu

# domain name -> file in olmoe-routing/text (names follow the routing pickles: b3g is "book")
CORPUS_FILES = {
    "arxiv": "arxiv_texts.txt",
    "book": "b3g_texts.txt",
    "c4": "c4_texts.txt",
    "github": "github_oss_with_stack_texts.txt",
    "wikipedia": "wikipedia_texts.txt",
}
MMLU_DOMAIN = "mmlu_dev"
DOMAINS = (*CORPUS_FILES, MMLU_DOMAIN)
# lines that start a new document where the corpus has a natural marker
DOCUMENT_MARKERS = {"wikipedia": ("# ",), "arxiv": ("\\title", "\\documentclass")}
SPLIT_TRAIN, SPLIT_HELDOUT = 0, 1
# a fixed text, tokenised here and stored with the tokens: the logits test's input
REFERENCE_TEXT = (
    "The following is a multiple choice question about high school physics.\n\n"
    "A ball is thrown upward. At the top of its path, its acceleration is\nA. zero\nB. g downward\n"
    "C. g upward\nD. 2g downward\nAnswer: B\n\ndef expert_load(counts):\n    return counts.max() / counts.mean()\n"
)


def _line_hash(line: str) -> int:
    return int.from_bytes(hashlib.blake2b(line.encode(), digest_size=8).digest(), "little")


def split_documents(text: str, domain: str, lines_per_document: int = 48) -> list[str]:
    """Cut one corpus file into documents by content (see the module docstring).

    A line starts a new document if it begins with one of the domain's markers, or if it is a
    non-blank line whose hash is 0 modulo ``lines_per_document``. Returns the documents' texts
    (lines joined by newlines, blank-only documents dropped), in file order.
    """
    markers = DOCUMENT_MARKERS.get(domain, ())
    docs, current = [], []
    for line in text.split("\n"):
        starts = line.startswith(markers) if markers else False
        starts = starts or (line.strip() != "" and _line_hash(line) % lines_per_document == 0)
        if starts and current:
            docs.append("\n".join(current))
            current = []
        current.append(line)
    if current:
        docs.append("\n".join(current))
    return [d.strip("\n") for d in docs if d.strip()]


def _normalise(text: str) -> str:
    return " ".join(text.split())


def drop_duplicates(docs: list[str], min_line_chars: int = 20, max_seen_share: float = 0.5) -> tuple[list[str], int, int]:
    """Remove exact duplicate documents, then near duplicates, keeping the first occurrence.

    Exact: same text after collapsing whitespace. Near: more than ``max_seen_share`` of the
    document's lines of at least ``min_line_chars`` characters already occur in kept documents.
    Returns (kept documents, number of exact duplicates dropped, number of near duplicates dropped).
    """
    seen_docs: set[str] = set()
    seen_lines: set[str] = set()
    kept, n_exact, n_near = [], 0, 0
    for doc in docs:
        key = hashlib.blake2b(_normalise(doc).encode(), digest_size=16).hexdigest()
        if key in seen_docs:
            n_exact += 1
            continue
        seen_docs.add(key)
        lines = [ln.strip() for ln in doc.split("\n") if len(ln.strip()) >= min_line_chars]
        if lines and sum(ln in seen_lines for ln in lines) > max_seen_share * len(lines):
            n_near += 1
            continue
        seen_lines.update(lines)
        kept.append(doc)
    return kept, n_exact, n_near


def read_mmlu_csv(path: Path) -> list[tuple[str, list[str], int]]:
    """Rows ``question,choice0..choice3,answer`` of one MMLU csv -> (question, choices, answer)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            try:
                rows.append((row["question"], [row[f"choice{j}"] for j in range(4)], int(row["answer"])))
            except (KeyError, ValueError) as err:
                raise ValueError(
                    f"{path}: row {i + 2}: expected columns question,choice0..choice3,answer (answer 0-3): {err}"
                ) from err
    return rows


def mmlu_dev_documents(mmlu_dir: Path) -> list[str]:
    """The MMLU dev questions (``<subject>_dev.csv``) as answered prompts, one document each."""
    files = sorted(Path(mmlu_dir, "dev").glob("*_dev.csv"))
    if not files:
        raise FileNotFoundError(f"{mmlu_dir}/dev: no *_dev.csv files (expected MMLU's dev split)")
    docs = []
    for path in files:
        subject = path.name[: -len("_dev.csv")]
        docs += [format_mmlu(subject, q, c, a) for q, c, a in read_mmlu_csv(path)]
    return docs


@dataclass
class CorpusStats:
    """Counts per domain: documents cut, duplicates removed, documents and tokens per split."""

    documents: dict[str, int] = field(default_factory=dict)
    exact_duplicates: dict[str, int] = field(default_factory=dict)
    near_duplicates: dict[str, int] = field(default_factory=dict)
    train_documents: dict[str, int] = field(default_factory=dict)
    heldout_documents: dict[str, int] = field(default_factory=dict)
    train_tokens: dict[str, int] = field(default_factory=dict)
    heldout_tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class Corpus:
    """Deduplicated documents with their domain and split (``SPLIT_TRAIN`` or ``SPLIT_HELDOUT``)."""

    texts: list[str]
    domain: np.ndarray  # [doc] int8 index into DOMAINS
    split: np.ndarray  # [doc] int8
    stats: CorpusStats
    settings: dict


def build_corpus(heldout_fraction: float = 0.1, seed: int = 0, lines_per_document: int = 48,
                 data: Path | None = None) -> Corpus:
    """Read, cut, deduplicate and split (by document, seeded, per domain) all training text."""
    text_dir = Path(data, "olmoe-routing", "text") if data else shared_data("olmoe-routing", "text")
    mmlu_dir = Path(data, "mmlu") if data else shared_data("mmlu")
    rng = np.random.default_rng(seed)
    stats = CorpusStats()
    texts, domain, split = [], [], []
    for d, name in enumerate(DOMAINS):
        if name == MMLU_DOMAIN:
            raw = mmlu_dev_documents(mmlu_dir)
        else:
            path = text_dir / CORPUS_FILES[name]
            if not path.exists():
                raise FileNotFoundError(f"{path}: corpus file for domain '{name}' not found")
            raw = split_documents(path.read_text(encoding="utf-8"), name, lines_per_document)
        kept, n_exact, n_near = drop_duplicates(raw)
        n_held = max(1, round(heldout_fraction * len(kept)))
        is_held = np.zeros(len(kept), dtype=bool)
        is_held[rng.choice(len(kept), size=n_held, replace=False)] = True
        stats.documents[name] = len(raw)
        stats.exact_duplicates[name] = n_exact
        stats.near_duplicates[name] = n_near
        stats.train_documents[name] = int((~is_held).sum())
        stats.heldout_documents[name] = int(is_held.sum())
        texts += kept
        domain += [d] * len(kept)
        split += [SPLIT_HELDOUT if h else SPLIT_TRAIN for h in is_held]
    settings = dict(heldout_fraction=heldout_fraction, seed=seed, lines_per_document=lines_per_document)
    return Corpus(texts, np.array(domain, np.int8), np.array(split, np.int8), stats, settings)


def tokenize_corpus(corpus: Corpus, tokenizer=None) -> dict[str, np.ndarray]:
    """Tokenise every document as ``BOS ids EOS`` and concatenate.

    Returns arrays: ``tokens`` [n] uint16, ``doc_offsets`` [docs + 1] int64 (document i is
    ``tokens[doc_offsets[i]:doc_offsets[i + 1]]``), ``doc_domain`` [docs] int8, ``doc_split``
    [docs] int8, ``domains`` [len(DOMAINS)] str, ``reference_ids`` [m] int64 (REFERENCE_TEXT),
    and ``meta`` (a JSON string: tokenizer, settings and CorpusStats).
    """
    if tokenizer is None:

        tokenizer = mixtral_tokenizer()
    ids = tokenizer.encode(corpus.texts, bos=True)
    ids = [x + [tokenizer.eos_id] for x in ids]
    lengths = np.array([len(x) for x in ids], np.int64)
    tokens = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lengths.sum()))
    assert tokens.max() < 2**16, "token ids must fit uint16"
    for name_idx, name in enumerate(DOMAINS):
        sel = corpus.domain == name_idx
        corpus.stats.train_tokens[name] = int(lengths[sel & (corpus.split == SPLIT_TRAIN)].sum())
        corpus.stats.heldout_tokens[name] = int(lengths[sel & (corpus.split == SPLIT_HELDOUT)].sum())
    meta = dict(tokenizer=getattr(tokenizer, "name", type(tokenizer).__name__), settings=corpus.settings,
                stats=asdict(corpus.stats), reference_text=REFERENCE_TEXT)
    return dict(
        tokens=tokens.astype(np.uint16),
        doc_offsets=np.concatenate([[0], np.cumsum(lengths)]),
        doc_domain=corpus.domain,
        doc_split=corpus.split,
        domains=np.array(DOMAINS),
        reference_ids=np.array(tokenizer.encode(REFERENCE_TEXT, bos=True), np.int64),
        meta=np.array(json.dumps(meta)),
    )


def save_tokens(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays of :func:`tokenize_corpus` atomically as one compressed ``.npz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load_tokens(path: str | Path) -> dict:
    """Read a tokens ``.npz``; ``meta`` comes back parsed. Clear error if a field is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: tokens file not found; build it with python -m moegps.models.data --out {path}")
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    need = ("tokens", "doc_offsets", "doc_domain", "doc_split", "domains", "reference_ids", "meta")
    missing = [k for k in need if k not in out]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}; expected {need}")
    out["meta"] = json.loads(str(out["meta"]))
    out["domains"] = [str(d) for d in out["domains"]]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".carry/train/tokens.npz")
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lines-per-document", type=int, default=48)
    args = parser.parse_args(argv)
    corpus = build_corpus(args.heldout_fraction, args.seed, args.lines_per_document)
    arrays = tokenize_corpus(corpus)
    save_tokens(args.out, arrays)
    print(json.dumps(asdict(corpus.stats), indent=1))
    print(f"wrote {args.out}: {len(arrays['tokens']):,} tokens in {len(arrays['doc_domain']):,} documents")


if __name__ == "__main__":
    main()
