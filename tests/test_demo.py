"""The demo: its timing counts only the decode steps, both paths agree on the bundled model, Ctrl-C
ends an answer (not the demo) and at the prompt ends the demo with code 130; and, driven as a
person would in tmux, the screen it shows."""

import io
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from rich.console import Console
from transformers import MixtralConfig, MixtralForCausalLM

from moegps import demo
from moegps.engine import Engine
from moegps.paths import BUNDLED_MODELS
from moegps.shapes import SHAPES, from_name


@pytest.fixture(autouse=True)
def engine_cpu_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # another module's kernels may have set it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: two OpenMP threads on a busy 2-core machine are slower
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def session():
    return demo.build_session(str(BUNDLED_MODELS / "mixtral-tiny"), "cpu", "auto", max_new_tokens=10, max_len=128)


def test_timed_decode_counts_the_steps_not_the_display():
    """A fake clock: each step takes 10 ms, each display 1 s, a sync 5 ms; the time reported is the
    steps' (with the syncs after them) only, and decoding stops at the stop token."""
    now = [0.0]
    syncs = []

    def step(previous):
        now[0] += 0.010
        return torch.tensor(int(previous) + 1)

    def on_token(tokens, seconds):
        now[0] += 1.0

    def sync():
        syncs.append(now[0])

    tokens, seconds = demo.timed_decode(step, torch.tensor(3), 10, eos_id=7, on_token=on_token, sync=sync,
                                        clock=lambda: now[0])
    assert tokens == [3, 4, 5, 6, 7]  # stopped at the stop token, which is kept
    assert seconds == pytest.approx(4 * 0.010)
    assert len(syncs) == 2 * 4  # before and after every step
    tokens, _ = demo.timed_decode(step, torch.tensor(0), 3, eos_id=-1, on_token=on_token, sync=sync,
                                  clock=lambda: now[0])
    assert tokens == [0, 1, 2]  # max_new_tokens counts the prefill's token


def test_both_paths_agree_and_the_heat_map_counts_the_engine_steps(session):
    shown = []
    stats = demo.answer(session, "The capital of France is", shown.append)
    hf, engine = stats.paths[demo.TRANSFORMERS], stats.paths[demo.ENGINE]
    assert engine.tokens == hf.tokens and len(hf.tokens) >= 2 and "same tokens" in stats.note
    # the engine path is the engine's own greedy generation
    ids = session.tokenizer.encode("The capital of France is")
    direct = Engine(session.model, max_batch=1, max_len=64).generate([ids], 10, stop_tokens=[2]).tokens[0]
    assert engine.tokens == direct
    # one decode step routes one token to top-k experts in every MoE layer
    steps = len(engine.tokens) - 1
    assert stats.counts.shape == (4, 8) and (stats.counts.sum(1) == 2 * steps).all()
    assert engine.tokens_per_s > 0 and 0 < engine.floor_share and 0 < hf.floor_share
    assert len(shown) == len(hf.tokens) + len(engine.tokens) + 1  # every token, then the final note


def test_ctrl_c_during_an_answer_ends_the_answer_only(session):
    calls = []

    def display(stats):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C arrives while the answer streams
            raise KeyboardInterrupt

    stats = demo.answer(session, "Water boils at", display)
    assert stats.interrupted and "interrupted" in stats.note and len(stats.paths) == 1
    assert len(stats.paths[demo.TRANSFORMERS].tokens) == 3  # the tokens shown before Ctrl-C stay
    # the session goes on: the next answer is whole, and the same as an uninterrupted one
    again = demo.answer(session, "Water boils at", lambda stats: None)
    assert not again.interrupted and again.paths[demo.ENGINE].tokens == again.paths[demo.TRANSFORMERS].tokens
    fresh = demo.answer(session, "Water boils at", lambda s: None)
    assert again.paths[demo.ENGINE].tokens == fresh.paths[demo.ENGINE].tokens


def test_main_interrupted_answer_then_ctrl_c_at_the_prompt_exits_130(session, monkeypatch, capsys):
    """Interactive: a prompt whose answer is interrupted, then Ctrl-C at the prompt."""
    inputs = iter(["What is the capital of France?"])

    def fake_input(self, *args, **kwargs):
        try:
            return next(inputs)
        except StopIteration:
            raise KeyboardInterrupt from None

    renders = []
    real_render = demo.render

    def render(stats, session):
        renders.append(1)
        if len(renders) == 4:
            raise KeyboardInterrupt
        return real_render(stats, session)

    monkeypatch.setattr(demo, "build_session", lambda *a, **k: session)
    monkeypatch.setattr(Console, "input", fake_input)
    monkeypatch.setattr(demo, "render", render)
    assert demo.main(["--device", "cpu"]) == 130
    out = capsys.readouterr().out
    assert "answer interrupted (Ctrl-C)" in out and out.rstrip().endswith("interrupted: bye")


def test_step_bytes_counts_what_a_step_reads(rng):
    """Against a hand count over the transformers model's parameters: everything but the experts not
    chosen and the embedding (one row read), plus K and V of the context."""
    cfg = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=24, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                        tie_word_embeddings=False)
    hf = MixtralForCausalLM(cfg)
    model = demo.from_transformers(hf)
    everything = sum(p.nbytes for p in hf.parameters())
    expert = 3 * 32 * 24 * 4
    unused = 3 * (6 - 2) * expert
    embed = 100 * 32 * 4
    context = int(rng.integers(1, 500))
    kv = context * 3 * 2 * 2 * 8 * 4  # layers x (K, V) x KV heads x head_dim x 4 bytes
    assert demo.step_bytes(model, context) == everything - unused - embed + 32 * 4 + kv


def test_copy_rate_is_measured(monkeypatch):
    rate = demo.copy_rate(torch.device("cpu"), 1 << 22)
    assert 1e8 < rate < 1e13  # bytes read + written per second: between 0.1 GB/s and 10 TB/s
    # on a GPU: the engine benchmark's own measurement, so the demo's floor is the bench's
    monkeypatch.setattr(demo, "copy_bandwidth", lambda: 4.2e12)
    assert demo.copy_rate(torch.device("cuda")) == 4.2e12


def test_shape_only_session_runs_the_engine_alone_labelled_random(monkeypatch):
    """--shape on a GPU builds random weights and no transformers model; here with a tiny shape on the CPU."""
    tiny = from_name("mixtral-8x7b").replace(name="tiny", vocab_size=32000, n_layers=2, hidden=32, n_heads=4,
                                             n_kv_heads=2, head_dim=8, expert_ffn=16, n_experts=8, top_k=2)
    monkeypatch.setitem(SHAPES, "tiny", tiny)
    session = demo.build_session("", "cpu", "float32", shape="tiny", max_new_tokens=5, max_len=64)
    assert session.hf is None and session.random_weights
    stats = demo.answer(session, "Hello there", lambda s: None)
    assert list(stats.paths) == [demo.ENGINE] and len(stats.paths[demo.ENGINE].tokens) >= 1
    console = Console(file=io.StringIO(), width=120)
    console.print(demo.render(stats, session))
    screen = console.file.getvalue()
    assert "[random weights: the text is noise]" in screen and "a CPU: floor from a measured memcpy rate" in screen


@pytest.mark.parametrize("argv,message", [
    (["--shape", "mixtral-8x7b", "--device", "cpu"], "needs a GPU"),
    (["--max-new-tokens", "0", "--device", "cpu"], "--max-new-tokens must be >= 1"),
    (["--dtype", "int8", "--device", "cpu"], "--dtype must be one of"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ---- in tmux, as a person would ---------------------------------------------------------------------------------

def _tiny_model(path):
    cfg = MixtralConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=True)
    MixtralForCausalLM(cfg).save_pretrained(path)
    return path


def _screen(session):
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout


def _wait_for(session, text, times=1, timeout=120):
    """The screen once ``text`` shows on it at least ``times`` times."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        screen = _screen(session)
        if screen.count(text) >= times:
            return screen
        time.sleep(0.5)
    raise AssertionError(f"'{text}' never appeared {times} time(s); screen:\n{_screen(session)}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_demo_in_tmux(tmp_path):
    model = _tiny_model(tmp_path / "model")
    session = f"moegps-demo-{tmp_path.name}"
    log = tmp_path / "stderr.log"
    # the engine's CPU path (no interpreter), one thread (tiny shapes)
    cmd = (f"env -u TRITON_INTERPRET OMP_NUM_THREADS=1 {sys.executable} -m moegps.demo --model {model} "
           f"--max-new-tokens 6 --device cpu 2>{log}; echo exit code $?; sleep 60")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "60", cmd], check=True)
    try:
        _wait_for(session, "prompt>")
        subprocess.run(["tmux", "send-keys", "-t", session, "What is the capital of France?", "Enter"], check=True)
        screen = _wait_for(session, "prompt>", times=2)  # answered, asking again
        assert "What is the capital of France?" in screen
        assert "transformers (6 tokens)" in screen and "moegps engine (6 tokens)" in screen, screen
        assert "tokens/s" in screen and "of floor" in screen and "a CPU: floor from a measured memcpy" in screen
        assert "same tokens" in screen, screen  # the engine ran and agreed with transformers
        # one heat-map row per MoE layer, each ending with its max/mean imbalance
        rows = [line.split() for line in screen.splitlines() if line.strip()[:1].isdigit() and "." in line.split()[-1]]
        rows = [r for r in rows if len(r) == 8 + 2]
        assert [r[0] for r in rows][:3] == ["0", "1", "2"], screen
        for r in rows[:3]:  # percentages of a layer's selections: sum to ~100
            assert 96 <= sum(int(x) for x in r[1:9]) <= 104, (r, screen)
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)  # Ctrl-C at the prompt
        screen = _wait_for(session, "exit code", timeout=30)
        assert "interrupted: bye" in screen and "exit code 130" in screen, screen
    except AssertionError:
        print(log.read_text() if log.exists() else "no stderr log")  # shown by pytest on failure
        raise
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_heat_map_share_colours_do_not_overflow(session):
    """A layer whose selections all go to one expert (share 1) still maps to the hottest colour."""
    stats = demo.AnswerStats("x", [0, 1], 8)
    stats.counts = np.array([[5, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    console = Console(file=io.StringIO(), width=120)
    console.print(demo.render(stats, session))
    assert "8.00" in console.file.getvalue() and "1.00" in console.file.getvalue()


def test_a_prompt_too_long_for_the_engine_is_refused_with_a_note(session):
    stats = demo.answer(session, "word " * 200, lambda s: None)
    assert not stats.paths and "exceeds the engine's 128 positions (--max-len)" in stats.note


def test_transformers_only_session_has_no_engine_path(session):
    plain = demo.Session(session.tokenizer, session.hf, None, session.model, session.device,
                         session.copy_bytes_per_s, max_new_tokens=4)
    stats = demo.answer(plain, "Once upon a time", lambda s: None)
    assert list(stats.paths) == [demo.TRANSFORMERS] and len(stats.paths[demo.TRANSFORMERS].tokens) == 4
    console = Console(file=io.StringIO(), width=120)
    console.print(demo.render(stats, plain))
    assert "expert load" not in console.file.getvalue()  # the heat map is the engine's


def test_a_missing_tokenizer_fails_before_any_model_is_built(monkeypatch):
    """On the GPU a shape-only model is 93 GB of random weights: a missing tokenizer package must end
    the demo before that work, not after it (seen on the H200 without mistral-common)."""
    def no_tokenizer():
        raise FileNotFoundError("package 'mistral-common' is not installed: pip install mistral-common")

    def must_not_build(*args, **kwargs):
        raise AssertionError("a model was built before the tokenizer was checked")

    monkeypatch.setattr(demo, "mixtral_tokenizer", no_tokenizer)
    monkeypatch.setattr(demo, "build_model", must_not_build)
    monkeypatch.setattr(demo, "from_transformers", must_not_build)
    with pytest.raises(FileNotFoundError, match="mistral-common"):
        demo.build_session("unused", "cpu", "auto", shape="mixtral-8x7b")
    with pytest.raises(FileNotFoundError, match="mistral-common"):
        demo.build_session(str(BUNDLED_MODELS / "mixtral-tiny"), "cpu", "auto")
