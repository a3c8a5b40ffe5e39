"""Prompt loaders: MMLU from the local copy and from hand-built files, plain text, clear errors."""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest

from moegps.prompts import PromptError, format_mmlu, load_mmlu, load_prompts, load_text


def test_mmlu_local_copy_counts_order_and_format(shared):
    folder = shared / "mmlu" / "test"
    prompts = load_mmlu(folder)
    assert len(prompts) == 14042  # SOURCE.md: 57 subjects, 14,042 questions
    assert [p.request_id for p in prompts] == list(range(14042))
    subjects = [p.subject for p in prompts]
    assert len(set(subjects)) == 57 and subjects == sorted(subjects)  # files in name order
    # the first question, written out by hand from abstract_algebra_test.csv row 0
    assert prompts[0].text == (
        "The following is a multiple choice question about abstract algebra.\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    )
    assert prompts[0].source == "abstract_algebra_test.csv:0"
    # per-subject counts equal the files' row counts (read independently with pandas)
    for name in ("anatomy", "world_religions"):
        n = len(pd.read_csv(folder / f"{name}_test.csv"))
        assert subjects.count(name) == n
    # literal answers such as "None" stay text (pandas' NA parsing would drop them)
    row = pd.read_csv(folder / "college_computer_science_test.csv", keep_default_na=False).iloc[10]
    cs = [p for p in prompts if p.source == "college_computer_science_test.csv:10"][0]
    assert f"A. {row['choice0']}\n" in cs.text and row["choice0"] == "None"
    # limit reads only what it needs and gives the same first prompts
    assert load_mmlu(folder, limit=150) == prompts[:150]


def test_mmlu_jsonl_parquet_and_choices_list(tmp_path, rng):
    rows = [
        {"question": f"q{i} {rng.integers(1000)}?", "choices": [f"c{i}{j}" for j in range(4)], "answer": i % 4,
         "subject": "high_school_physics"}
        for i in range(5)
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_mmlu(tmp_path / "a.jsonl")
    assert [p.text for p in got] == [format_mmlu("high_school_physics", r["question"], r["choices"]) for r in rows]
    assert got[2].text.endswith(f"D. {rows[2]['choices'][3]}\nAnswer:")
    flat = pd.DataFrame([{"question": r["question"], **{f"choice{j}": c for j, c in enumerate(r["choices"])},
                          "answer": r["answer"]} for r in rows])
    (tmp_path / "dir").mkdir()
    flat.to_parquet(tmp_path / "dir" / "virology_dev.parquet")
    got = load_mmlu(tmp_path / "dir")
    assert {p.subject for p in got} == {"virology"}
    assert [p.text for p in got] == [format_mmlu("virology", r["question"], r["choices"]) for r in rows]


def test_mmlu_errors_name_file_and_column(tmp_path):
    bad = tmp_path / "x_test.csv"
    with bad.open("w", newline="") as f:
        csv.writer(f).writerows([["question", "choice0", "choice2", "answer"], ["q?", "a", "b", "0"]])
    with pytest.raises(PromptError, match=r"x_test.csv: missing choice columns"):
        load_mmlu(bad)
    with bad.open("w", newline="") as f:
        csv.writer(f).writerows([["prompt", "choice0", "choice1", "answer"], ["q?", "a", "b", "0"]])
    with pytest.raises(PromptError, match=r"x_test.csv: missing column 'question'"):
        load_mmlu(tmp_path)
    (tmp_path / "y.txt").write_text("hi")
    with pytest.raises(PromptError, match=r"y.txt: unknown file type"):
        load_mmlu(tmp_path / "y.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PromptError, match="holds no MMLU files"):
        load_mmlu(empty)


def test_mmlu_hub_unreachable_says_what_was_tried(tmp_path, monkeypatch):
    import datasets

    calls = []

    def offline(*args, **kwargs):  # what datasets raises without a network (no real hub call in tests)
        calls.append(args)
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PromptError, match=r"missing does not exist; could not load MMLU from the hub as 'cais/mmlu'"):
        load_mmlu(tmp_path / "missing", hub_id="cais/mmlu")
    assert calls == [("cais/mmlu", "all")]


def test_text_blocks_lines_and_limit(tmp_path, rng):
    words = [" ".join(f"w{rng.integers(10**6)}" for _ in range(rng.integers(3, 9))) for _ in range(12)]
    blocks = ["\n".join(words[i:i + 3]) for i in range(0, 12, 3)]
    (tmp_path / "b_texts.txt").write_text("\n\n\n".join(blocks) + "\n\n")
    (tmp_path / "a.txt").write_text("\n".join(words[:4]) + "\n\n" + "x\n")
    got = load_text(tmp_path / "b_texts.txt")
    assert [p.text for p in got] == blocks and {p.subject for p in got} == {"b"}
    got = load_text(tmp_path, split_by="line", min_chars=2)
    assert [p.text for p in got] == words[:4] + words  # a.txt first; "x" is too short
    assert [p.request_id for p in got] == list(range(16))
    assert load_text(tmp_path, split_by="line", min_chars=2, limit=5) == got[:5]
    assert [p.text for p in load_text(tmp_path / "a.txt", split_by="file")] == ["\n".join(words[:4]) + "\n\nx"]
    with pytest.raises(PromptError, match="nope.txt: text file or folder not found"):
        load_text(tmp_path / "nope.txt")
    with pytest.raises(PromptError, match="split_by"):
        load_text(tmp_path, split_by="sentence")


def test_load_prompts_from_dataset_config(shared):
    text = shared / "olmoe-routing" / "text" / "arxiv_texts.txt"
    got = load_prompts({"kind": "text", "path": str(text), "split_by": "blank_line", "min_chars": 20, "limit": 4})
    blocks = [b.strip() for b in text.read_text().split("\n\n") if len(b.strip()) >= 20]
    assert [p.text for p in got] == blocks[:4] and got[0].subject == "arxiv"
    with pytest.raises(PromptError, match="'kind' must be"):
        load_prompts({"kind": "images"})
