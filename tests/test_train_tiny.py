"""Training data preparation and the tiny-model trainer: CPU smoke run, dedup/split, statistics."""

import json

import numpy as np
import pytest

from moegps.models import data as D
from moegps.models import train_tiny as T


class ByteTokenizer:
    """Stand-in tokenizer (bytes + 3): keeps these tests independent of SentencePiece."""

    eos_id = 2
    name = "bytes"

    def encode(self, text, bos=True):
        if isinstance(text, list):
            return [self.encode(t, bos) for t in text]
        return ([1] if bos else []) + [b + 3 for b in text.encode()]


def _random_text(rng, n_lines):
    words = ["alpha", "beta", "gamma", "delta", "expert", "router", "token", "layer", "load", "skew"]
    return "\n".join(" ".join(rng.choice(words, size=rng.integers(4, 12))) + f" {rng.integers(1e9)}"
                     for _ in range(n_lines))


def test_split_documents_is_content_defined(rng):
    """A repeated text cuts into the same documents, wherever it sits in the file."""
    body = _random_text(rng, 300)
    prefix = _random_text(rng, 17)
    docs_alone = D.split_documents(body, "c4", lines_per_document=8)
    docs_shifted = D.split_documents(prefix + "\n" + body, "c4", lines_per_document=8)
    assert len(docs_alone) > 10
    assert docs_alone[1:] == docs_shifted[-(len(docs_alone) - 1):]
    assert "\n".join(docs_alone) == body  # nothing lost


def test_drop_duplicates_exact_and_near(rng):
    docs = D.split_documents(_random_text(rng, 400), "c4", lines_per_document=8)
    long_doc = next(d for d in docs if d.count("\n") >= 2)  # 3+ lines: all but one already seen
    partial = "\n".join(long_doc.split("\n")[:-1] + ["a fresh line that was never seen before, long enough"])
    fresh = "a wholly new document line one, long enough\nand its second new line, long enough too"
    kept, n_exact, n_near = D.drop_duplicates(docs + docs[:5] + [" " + docs[7] + "  "] + [partial, fresh])
    assert kept == docs + [fresh] and n_exact == 6 and n_near == 1


def test_mmlu_prompt_format():
    from moegps.prompts import format_mmlu  # the one template (collect's prompts too)

    text = format_mmlu("high_school_physics", " Q? ", ["w", "x ", "y", "z"], 2)
    assert text == ("The following is a multiple choice question about high school physics.\n\nQ?\n"
                    "A. w\nB. x\nC. y\nD. z\nAnswer: C")


def test_corpus_split_is_by_document_and_disjoint(shared):
    corpus = D.build_corpus(heldout_fraction=0.1, seed=3)
    held = {t for t, s in zip(corpus.texts, corpus.split) if s == D.SPLIT_HELDOUT}
    train = {t for t, s in zip(corpus.texts, corpus.split) if s == D.SPLIT_TRAIN}
    assert held and train and not (held & train)
    # duplicates removed: each corpus repeats its text, so about half its documents go
    for name in D.CORPUS_FILES:
        assert corpus.stats.exact_duplicates[name] > 0.3 * corpus.stats.documents[name]
    # MMLU test questions are never training text
    test_q = D.read_mmlu_csv(next((shared / "mmlu" / "test").glob("*.csv")))[0][0]
    assert not any(test_q in t for t in corpus.texts)
    again = D.build_corpus(heldout_fraction=0.1, seed=3)
    assert np.array_equal(again.split, corpus.split)


def test_load_skew_and_hit_rate_against_brute_force(rng):
    counts = rng.integers(1, 100, size=(3, 8))
    expected = [max(row) / (sum(row) / len(row)) for row in counts.tolist()]
    np.testing.assert_allclose(T.load_skew(counts), expected)
    # hit rate: build routing from a known lookup, then corrupt a known share of tokens
    n_ids, n_experts, k = 50, 8, 2
    table = np.zeros((n_ids, n_experts), np.int64)
    hits = total = 0
    for t in range(n_ids):
        favourite = rng.choice(n_experts, size=k, replace=False)
        for _ in range(int(rng.integers(5, 20))):
            chosen = favourite if rng.random() < 0.8 else rng.choice(n_experts, size=k, replace=False)
            table[t, chosen] += 1
    for t in range(n_ids):  # brute force: best k-set of experts per id
        hits += sorted(table[t].tolist(), reverse=True)[0] + sorted(table[t].tolist(), reverse=True)[1]
        total += table[t].sum()
    assert T.token_id_hit_rate(table, k) == pytest.approx(hits / total)


def test_cpu_smoke_training_run(tmp_path, rng):
    """A few steps of the real trainer on tiny shapes: saves a loadable Mixtral folder whose logits
    match the saved reference, a log, and loss falls below the untrained model's."""
    texts = [_random_text(rng, 10) for _ in range(40)]
    corpus = D.Corpus(texts, np.array([i % len(D.DOMAINS) for i in range(40)], np.int8),
                      np.array([D.SPLIT_HELDOUT if i % 5 == 0 else D.SPLIT_TRAIN for i in range(40)], np.int8),
                      D.CorpusStats(), dict(seed=0))
    arrays = D.tokenize_corpus(corpus, ByteTokenizer())
    D.save_tokens(tmp_path / "tokens.npz", arrays)
    cfg = T.TrainConfig(
        name="smoke", tokens=str(tmp_path / "tokens.npz"), seq_len=32, batch_size=8, max_steps=8,
        evals_per_epoch=20, warmup_steps=2, lr=3e-3, save_dtype="float32", eval_tokens_per_domain=256,
        stats_tokens_per_domain=256, aux_loss_per_layer=True, router_aux_loss_coef=0.1,
        model=T.ModelShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, vocab_size=384))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread avoids contention with parallel test workers
    try:
        log = T.train(cfg, tmp_path)
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path / "model"
    saved = json.loads((folder / "train_log.json").read_text())
    assert saved["best"]["perplexity"] < saved["untrained"]["perplexity"]
    assert log["steps"] == 8 and len(saved["history"]) >= 2
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = np.load(folder / "reference_logits.npz")
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ref["input_ids"])[None]).logits[0].numpy()
    np.testing.assert_allclose(logits[:, ref["vocab_ids"]], ref["logits"], atol=1e-4, rtol=0)
    assert model.config.num_local_experts == 4 and model.config.num_experts_per_tok == 2


def test_choose_run_prefers_target_skew_within_perplexity_slack():
    def log(ppl, skew):
        return {"best": {"perplexity": ppl}, "config": {"skew_target": [1.08, 1.33]},
                "full_text": {"load_skew": {d: [skew, skew] for d in T.CORPUS_DOMAINS}}}

    runs = [log(100, 2.5), log(105, 1.2), log(130, 1.1)]
    assert T.choose_run(runs) == 1  # in range, within 10% of the best perplexity
    assert T.choose_run(runs, perplexity_slack=1.01) == 0
