"""The bundled trained models load as Mixtral and reproduce the logits saved when they were trained."""

import json

import numpy as np
import pytest
import torch

from moegps.paths import BUNDLED_MODELS

# name -> (experts, top-k)
BUNDLED = {"mixtral-tiny": (8, 2), "mixtral-tiny-64e": (64, 8)}


@pytest.fixture(scope="module", params=sorted(BUNDLED))
def bundled(request):
    from transformers import MixtralForCausalLM

    folder = BUNDLED_MODELS / request.param
    model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, folder, model


def test_config_is_mixtral_with_the_right_routing(bundled):
    name, folder, model = bundled
    config = json.loads((folder / "config.json").read_text())
    experts, top_k = BUNDLED[name]
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (experts, top_k)
    assert config["vocab_size"] == 32000 and config["tie_word_embeddings"] is True
    # tied: the output matrix is the input embedding itself, stored once
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert (folder / "model.safetensors").stat().st_size < 40e6


def test_logits_match_those_saved_at_training_time(bundled):
    """Stored weights (bf16) reloaded in float32 on a CPU: the same computation as at training
    time, up to float32 summation order across machines and library versions."""
    _, folder, model = bundled
    ref = np.load(folder / "reference_logits.npz")
    ids = torch.as_tensor(ref["input_ids"])[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double().numpy()
    np.testing.assert_allclose(logits[:, ref["vocab_ids"]], ref["logits"], rtol=0, atol=5e-4)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    np.testing.assert_allclose(lse, ref["logsumexp"], rtol=0, atol=5e-4)
    # a trained model: its greedy next tokens are the saved ones, and far from uniform
    assert (logits.argmax(-1) == ref["argmax"]).mean() > 0.95
    assert (lse - logits.max(-1)).mean() < np.log(32000) - 2


def test_training_log_reports_a_trained_specialised_model(bundled):
    """The log bundled with the weights says what the model card says: held-out perplexity far
    below the untrained model's, token-id hit rate above chance, skew measured on five domains."""
    name, folder, model = bundled
    log = json.loads((folder / "train_log.json").read_text())
    experts, top_k = BUNDLED[name]
    # held-out perplexity far below the untrained model's, as logged at training time
    assert log["best"]["perplexity"] < log["untrained"]["perplexity"] / 100
    hits = [v for d, vals in log["full_text"]["token_id_hit_rate"].items() for v in vals]
    assert min(hits) > top_k / experts  # token-id specialisation above chance
    skew = log["full_text"]["load_skew"]
    assert set(skew) == {"arxiv", "book", "c4", "github", "wikipedia"}
    assert all(len(v) == model.config.num_hidden_layers and min(v) >= 1 for v in skew.values())
