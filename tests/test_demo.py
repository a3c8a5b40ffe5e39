"""Drive the demo as a person would: in tmux, type a prompt, read the screen."""

import shutil
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")


def _tiny_model(path):
    from transformers import MixtralConfig, MixtralForCausalLM

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


def test_demo_in_tmux(tmp_path):
    model = _tiny_model(tmp_path / "model")
    session = f"moegps-demo-{tmp_path.name}"
    log = tmp_path / "stderr.log"
    cmd = f"{sys.executable} -m moegps.demo --model {model} --max-new-tokens 6 --device cpu 2>{log}; sleep 60"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "50", cmd], check=True)
    try:
        _wait_for(session, "prompt>")
        subprocess.run(["tmux", "send-keys", "-t", session, "What is the capital of France?", "Enter"], check=True)
        screen = _wait_for(session, "prompt>", times=2)  # answered, asking again
        assert "What is the capital of France?" in screen
        assert "answer (6 tokens)" in screen or "answer (" in screen
        assert "transformers" in screen and "tokens/s" in screen
        assert "moegps" in screen and "same tokens" in screen, screen  # the swapped model ran and agreed
        # one heat-map row per MoE layer, each ending with its max/mean imbalance
        rows = [line.split() for line in screen.splitlines() if line.strip()[:1].isdigit() and "." in line.split()[-1]]
        layers = [r[0] for r in rows if len(r) == 8 + 2]
        assert layers[:3] == ["0", "1", "2"], screen
        shares = [[int(x) for x in r[1:9]] for r in rows if len(r) == 10][:3]
        for s in shares:  # percentages of a layer's selections: sum to ~100
            assert 96 <= sum(s) <= 104, (s, screen)
        subprocess.run(["tmux", "send-keys", "-t", session, "exit", "Enter"], check=True)
        _wait_for(session, "bye", timeout=30)
    except AssertionError:
        print(log.read_text() if log.exists() else "no stderr log")  # shown by pytest on failure
        raise
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
