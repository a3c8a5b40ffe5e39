"""The real Mixtral tokenizer (SentencePiece, 32,000 tokens), as shipped inside ``mistral-common``.

Token ids in traces recorded with it are Mixtral-8x7B's own, so they line up with the real
Mixtral routing statistics (``olmoe-routing/mistral/eid2token``). The file is found without
importing ``mistral_common`` (whose import pulls in pydantic and more): only its location is needed.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

MIXTRAL_TOKENIZER_FILE = "tokenizer.model.v1"
BOS_ID, EOS_ID = 1, 2


TOKENIZER_ENV = "MOEGPS_MIXTRAL_TOKENIZER"  # a copy of the file, where mistral-common is not installed


def mixtral_tokenizer_path() -> Path:
    """Path of ``$MOEGPS_MIXTRAL_TOKENIZER`` when set (a machine without mistral-common, e.g. a lent GPU
    with no package registry, can be handed the 0.5 MB file alone), else of
    ``mistral_common/data/tokenizer.model.v1``, with a clear error if neither is there."""
    override = os.environ.get(TOKENIZER_ENV)
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"{override}: ${TOKENIZER_ENV} names no file (expected Mixtral's SentencePiece "
                                    f"{MIXTRAL_TOKENIZER_FILE})")
        return Path(override)
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package 'mistral-common' is not installed: pip install mistral-common (or set "
                                f"${TOKENIZER_ENV} to a copy of its data/{MIXTRAL_TOKENIZER_FILE})")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / MIXTRAL_TOKENIZER_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: mistral-common does not ship {MIXTRAL_TOKENIZER_FILE}")
    return path


class MixtralTokenizer:
    """SentencePiece Mixtral tokenizer: ``encode`` text to ids (optionally with BOS), ``decode`` back."""

    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = EOS_ID  # Mixtral has no pad token; padding is masked out anyway
    name = "mistral-common:tokenizer.model.v1"

    def __init__(self, path: str | Path | None = None):
        import sentencepiece as spm

        self.path = Path(path) if path else mixtral_tokenizer_path()
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        assert self.sp.vocab_size() == 32000, f"{self.path}: expected 32,000 tokens, got {self.sp.vocab_size()}"
        assert self.sp.bos_id() == BOS_ID and self.sp.eos_id() == EOS_ID

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str | list[str], bos: bool = True) -> list[int] | list[list[int]]:
        ids = self.sp.encode(text)
        if not bos:
            return ids
        if isinstance(text, str):
            return [BOS_ID] + ids
        return [[BOS_ID] + x for x in ids]

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])


@lru_cache(maxsize=1)
def mixtral_tokenizer() -> MixtralTokenizer:
    return MixtralTokenizer()
