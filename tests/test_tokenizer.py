"""The Mixtral tokenizer's file: found in mistral-common, or named by $MOEGPS_MIXTRAL_TOKENIZER."""

import shutil

import pytest

from moegps.models import tokenizer as T


def test_a_copy_named_by_the_variable_is_used(tmp_path, monkeypatch, rng):
    """A copy of the file elsewhere (mistral-common's own location then unused) encodes and decodes alike."""
    original = T.mixtral_tokenizer_path()
    copy = tmp_path / "tok.model"
    shutil.copy(original, copy)
    monkeypatch.setenv(T.TOKENIZER_ENV, str(copy))
    assert T.mixtral_tokenizer_path() == copy
    words = " ".join(rng.choice(["expert", "routing", "load", "balance", "GPU", "token"], size=12))
    from_copy = T.MixtralTokenizer()
    assert from_copy.path == copy
    ids = from_copy.encode(words)
    assert ids[0] == T.BOS_ID and ids == T.MixtralTokenizer(original).encode(words)
    assert from_copy.decode(ids[1:]) == words


def test_a_variable_naming_no_file_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv(T.TOKENIZER_ENV, str(tmp_path / "missing.model"))
    with pytest.raises(FileNotFoundError, match=r"missing\.model: \$MOEGPS_MIXTRAL_TOKENIZER names no file"):
        T.mixtral_tokenizer_path()
