"""collect on tiny random MoE models: the recorded routing is the router's own, token by token.

The reference is independent of ``moegps.collect`` and ``moegps.models.adapters``: a global
forward hook (``torch.nn.modules.module.register_module_forward_hook``) keeps every router call's
input hidden states; the test recomputes ``hidden @ gate.weight.T`` in float64, applies the family's
published selection rule, and maps each call's tokens to (request, step, position) from the batch
layout (left padding, one token per request per decode step) on its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from moegps.configs import ConfigError

from moegps.collect import CollectError, collect
from moegps.collect import main as collect_main
from moegps.models.tokenizer import mixtral_tokenizer
from moegps.paths import BUNDLED_MODELS, CONF_DIR, PROJECT_ROOT
from moegps.prompts import load_mmlu
from moegps.trace import RoutingTrace

ROUTER_CLASSES = ("MixtralTopKRouter", "OlmoeTopKRouter", "Qwen3MoeTopKRouter", "DeepseekV3TopkRouter")


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("collect", overrides=overrides)


# ---- tiny models ---------------------------------------------------------------------------


def tiny_mixtral(path: Path, seed: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
    )
    model = _init_tiny(MixtralForCausalLM, cfg, seed)
    model.save_pretrained(path)
    return model


def tiny_olmoe(path: Path, seed: int):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False,
        max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = _init_tiny(OlmoeForCausalLM, cfg, seed)
    model.save_pretrained(path)
    return model


def tiny_qwen3(path: Path, seed: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=1024, eos_token_id=2, bos_token_id=1,
    )
    model = _init_tiny(Qwen3MoeForCausalLM, cfg, seed)
    model.save_pretrained(path)
    return model


def tiny_deepseek_v3(path: Path, seed: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=32000, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=1024, eos_token_id=2, bos_token_id=1,
    )
    model = _init_tiny(DeepseekV3ForCausalLM, cfg, seed)
    with torch.no_grad():  # a non-zero correction bias, so that selection and weights differ
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
    model.save_pretrained(path)
    return model


def _init_tiny(model_cls, cfg, seed: int):
    """A seeded random model of cfg whose router weights are larger than the 0.02 init, so that
    routing depends clearly on the token."""
    torch.manual_seed(seed)
    model = model_cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
    return model


# ---- independent reference -----------------------------------------------------------------


def reference_routing(family: str, router, hidden: np.ndarray):
    """``(experts [T, k], weights [T, k], scores [T, E])`` in float64 from the router's input."""
    W = router.weight.detach().double().numpy()
    logits = hidden.astype(np.float64) @ W.T
    k = router.top_k
    if family == "deepseek_v3":
        scores = 1.0 / (1.0 + np.exp(-logits))
        choice = scores + router.e_score_correction_bias.detach().double().numpy()
        T, E = choice.shape
        groups = choice.reshape(T, router.num_group, E // router.num_group)
        group_score = np.sort(groups, axis=-1)[..., -2:].sum(-1)
        best_groups = np.argsort(-group_score, axis=-1, kind="stable")[:, : router.topk_group]
        allowed = np.zeros((T, router.num_group), bool)
        np.put_along_axis(allowed, best_groups, True, axis=1)
        choice = np.where(np.repeat(allowed, E // router.num_group, axis=1), choice, -np.inf)
        experts = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
        weights = np.take_along_axis(scores, experts, 1)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        return experts, weights * router.routed_scaling_factor, choice
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, experts, 1)
    if family == "mixtral" or getattr(router, "norm_topk_prob", False):
        weights = weights / weights.sum(-1, keepdims=True)
    return experts, weights, probs


class RouterCalls:
    """Every router forward call (module, input hidden ``[T, H]``), in call order, for any model."""

    def __enter__(self):
        self.calls = []

        def hook(module, inputs, output):
            if type(module).__name__ in ROUTER_CLASSES:
                self.calls.append((module, inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().numpy().copy()))

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def check_against_reference(family: str, out_dir: Path, calls, batch_size: int, max_new_tokens: int, eos: set[int],
                            stop_at_eos: bool):
    """Walk the router calls batch by batch and compare every real token's routing with the trace."""
    trace = RoutingTrace.read(out_dir)
    L = trace.meta.n_layers
    requests = [json.loads(line) for f in sorted(out_dir.glob("shard-*.requests.jsonl")) for line in f.open()]
    tok = trace.by_token()
    index = {(int(r), int(s), int(p)): i for i, (r, s, p) in enumerate(zip(tok.request_id, tok.step, tok.position))}
    assert len(index) == len(tok.request_id), "duplicate (request, step, position) rows"

    call = 0
    seen = 0
    checked_weights = 0
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        lens = np.array([r["prompt_tokens"] for r in batch])
        gens = [r["generated_ids"] for r in batch]
        for r, g in zip(batch, gens):
            if stop_at_eos:
                assert 1 <= len(g) <= max_new_tokens
                assert all(t not in eos for t in g[:-1]), "generation continued past EOS"
                assert len(g) == max_new_tokens or g[-1] in eos
            else:
                assert len(g) == max_new_tokens
        S = int(lens.max())
        n_forwards = 1 + max(len(g) - 1 for g in gens)
        for f in range(n_forwards):
            rows = []  # (calls row, request_id, step, position, token id)
            for b, r in enumerate(batch):
                if f == 0:
                    for s in range(S - lens[b], S):
                        rows.append((b * S + s, r["request_id"], 0, s - (S - lens[b]), r["prompt_ids"][s - (S - lens[b])]))
                elif f <= len(gens[b]) - 1:
                    rows.append((b, r["request_id"], f, lens[b] + f - 1, gens[b][f - 1]))
            for layer in range(L):
                router, hidden = calls[call]
                call += 1
                assert hidden.shape[0] == (len(batch) * S if f == 0 else len(batch))
                ref_experts, ref_weights, scores = reference_routing(family, router, hidden)
                for c, rid, step, pos, token in rows:
                    i = index[(rid, step, pos)]
                    assert tok.token_id[i] == token
                    got = tok.experts[i, layer].astype(np.int64)
                    want = ref_experts[c]
                    if family == "deepseek_v3":  # unsorted topk: compare as sets, weights per expert
                        order_got, order_want = np.argsort(got), np.argsort(want)
                        got, want = got[order_got], want[order_want]
                        got_w, want_w = tok.weights[i, layer][order_got], ref_weights[c][order_want]
                    else:
                        got_w, want_w = tok.weights[i, layer], ref_weights[c]
                    if not np.array_equal(got, want):
                        # allowed only at a float32 near-tie between the k-th and (k+1)-th expert
                        s = np.sort(scores[c])[::-1]
                        k = len(want)
                        assert abs(s[k - 1] - s[k]) < 1e-5, (rid, step, pos, layer, got, want, scores[c])
                        continue
                    np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-6)
                    checked_weights += 1
            seen += len(rows)
    assert call == len(calls), f"{len(calls) - call} router calls not accounted for"
    assert seen == len(tok.request_id), "trace has rows no router call produced"
    assert checked_weights >= 0.99 * seen * L
    return trace, requests


def check_structure(trace: RoutingTrace, requests: list[dict], max_prompt_tokens: int):
    """Steps, phases and positions per request; prompt ids are the tokenizer's own."""
    t = trace.by_token()
    for r in requests:
        m = t.request_id == r["request_id"]
        steps, pos, ids = t.step[m], t.position[m], t.token_id[m]
        n_prompt = r["prompt_tokens"]
        assert np.count_nonzero(steps == 0) == n_prompt
        assert (t.phase[m] == (steps > 0)).all()
        np.testing.assert_array_equal(pos, np.arange(len(pos)))  # consecutive, prefill then decode
        n_decode = len(r["generated_ids"]) - 1
        np.testing.assert_array_equal(steps[n_prompt:], np.arange(1, n_decode + 1))  # one per step
        np.testing.assert_array_equal(ids[:n_prompt], r["prompt_ids"])
        np.testing.assert_array_equal(ids[n_prompt:], r["generated_ids"][:-1])
        assert n_prompt <= max_prompt_tokens


# ---- tests ---------------------------------------------------------------------------------


FAMILIES = {
    "mixtral": (tiny_mixtral, "mixtral"),
    "olmoe": (tiny_olmoe, "mixtral"),
    "qwen3_moe": (tiny_qwen3, "mixtral"),
    "deepseek_v3": (tiny_deepseek_v3, "mixtral"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_recorded_routing_is_the_routers_own(family, tmp_path, shared, rng):
    make, tokenizer = FAMILIES[family]
    model = make(tmp_path / "model", seed=int(rng.integers(1 << 30)))
    batch_size, max_new_tokens, max_prompt = 3, 5, 96  # MMLU prompts: 61-108 tokens
    limit = 7  # a short last batch
    cfg = compose_cfg([
        f"model.path={tmp_path / 'model'}", f"model.tokenizer={tokenizer}", f"model.name=tiny-{family}",
        f"out_dir={tmp_path / 'out'}", f"limit={limit}", f"batch_size={batch_size}",
        f"max_new_tokens={max_new_tokens}", f"max_prompt_tokens={max_prompt}", "progress=false", "device=cpu",
    ])
    with RouterCalls() as rc:
        out = collect(cfg)
    trace, requests = check_against_reference(family, out, rc.calls, batch_size, max_new_tokens, {2}, False)
    assert [r["request_id"] for r in requests] == list(range(limit))
    lengths = [r["prompt_tokens"] for r in requests]
    assert len(set(lengths[:batch_size])) > 1 and max(lengths) == max_prompt  # padding and truncation ran
    check_structure(trace, requests, max_prompt)
    # prompts are the MMLU questions, tokenised by the real Mixtral tokenizer and cut to max_prompt
    prompts = load_mmlu(shared / "mmlu" / "test", limit=limit)
    tok = mixtral_tokenizer()
    for p, r in zip(prompts, requests):
        assert r["prompt_ids"] == tok.encode(p.text)[:max_prompt]
    assert trace.meta.model == f"tiny-{family}"
    assert trace.meta.layer_ids == ([1, 2] if family == "deepseek_v3" else [0, 1])
    assert trace.meta.top_k == model.config.num_experts_per_tok
    assert trace.meta.recorded["git_commit"] is not None and trace.meta.recorded["batch_size"] == batch_size
    assert (out / "config.yaml").exists() and json.loads((out / "manifest.json").read_text())["complete"]


def test_generation_matches_model_generate_and_padding_changes_nothing(tmp_path, shared, rng):
    """Batch 1: exactly ``model.generate``'s greedy tokens. Batch 3 (left-padded): the same tokens and routing."""
    model = tiny_mixtral(tmp_path / "model", seed=int(rng.integers(1 << 30)))
    common = [f"model.path={tmp_path / 'model'}", "limit=3", "max_new_tokens=6", "max_prompt_tokens=96",
              "progress=false", "device=cpu"]
    single = collect(compose_cfg(common + ["batch_size=1", f"out_dir={tmp_path / 'single'}"]))
    batched = collect(compose_cfg(common + ["batch_size=3", f"out_dir={tmp_path / 'batched'}"]))
    read = lambda out: [json.loads(line) for f in sorted(out.glob("*.requests.jsonl")) for line in f.open()]  # noqa: E731
    for r in read(single):
        ids = torch.tensor([r["prompt_ids"]])
        want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                              pad_token_id=2)[0, ids.shape[1]:].tolist()
        assert r["generated_ids"] == want
    assert len({r["prompt_tokens"] for r in read(batched)}) == 3  # padding was needed
    assert [r["generated_ids"] for r in read(batched)] == [r["generated_ids"] for r in read(single)]
    a, b = RoutingTrace.read(single), RoutingTrace.read(batched)
    for name in ("request_id", "step", "position", "token_id", "layer"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    same = (a.experts == b.experts).all(axis=1)
    assert same.mean() > 0.99  # float32 noise from padding may flip a near-tie, nothing more
    np.testing.assert_allclose(a.weights[same], b.weights[same], atol=1e-4)


def test_stop_at_eos_drops_finished_requests_only(tmp_path, shared, rng):
    """A request that emits EOS leaves the batch: its rows stop there, everyone else's are unchanged."""
    model = tiny_mixtral(tmp_path / "model", seed=int(rng.integers(1 << 30)))
    common = ["limit=4", "batch_size=4", "max_new_tokens=6", "max_prompt_tokens=96", "progress=false", "device=cpu"]
    free = collect(compose_cfg(common + [f"model.path={tmp_path / 'model'}", f"out_dir={tmp_path / 'free'}"]))
    free_gen = [json.loads(line)["generated_ids"] for line in (free / "shard-00000.requests.jsonl").open()]
    # make a mid-sequence token of request 0 (its first occurrence) an end-of-sequence token, through
    # the model's generation_config EOS list, which collect honours
    first = next((i for i in range(1, 5) if free_gen[0][i] not in free_gen[0][:i]), 0)
    stop = free_gen[0][first]
    model.generation_config.eos_token_id = [2, stop]
    model.save_pretrained(tmp_path / "model_eos")
    with RouterCalls() as rc:
        out = collect(compose_cfg(common + [f"model.path={tmp_path / 'model_eos'}", f"out_dir={tmp_path / 'eos'}",
                                            "stop_at_eos=true"]))
    trace, requests = check_against_reference("mixtral", out, rc.calls, 4, 6, {2, stop}, True)
    want = [g[: g.index(stop) + 1] if stop in g else g for g in free_gen]
    assert [r["generated_ids"] for r in requests] == want
    assert [r["first_eos"] for r in requests] == [g.index(stop) if stop in g else None for g in free_gen]
    assert len(requests[0]["generated_ids"]) == first + 1
    # the rows kept are exactly the free run's rows up to each request's EOS, bit for bit
    ref = RoutingTrace.read(free)
    last_step = {r["request_id"]: len(r["generated_ids"]) - 1 for r in requests}
    keep = ref.step <= np.array([last_step[int(r)] for r in ref.request_id])
    sub = ref.select(keep)
    for name in ("request_id", "step", "position", "token_id", "layer", "experts", "weights"):
        np.testing.assert_array_equal(getattr(trace, name), getattr(sub, name), err_msg=name)
    assert len(trace) < len(ref)


def test_interrupted_collect_resumes_without_duplicates_or_loss(tmp_path, shared, rng):
    tiny_olmoe(tmp_path / "model", seed=int(rng.integers(1 << 30)))
    common = [
        f"model.path={tmp_path / 'model'}", "model.tokenizer=mixtral", "limit=9", "batch_size=2",
        "max_new_tokens=4", "max_prompt_tokens=32", "progress=false", "device=cpu",
    ]
    reference = RoutingTrace.read(collect(compose_cfg(common + [f"out_dir={tmp_path / 'ref'}"])))

    class Interrupt(Exception):
        pass

    def stop_after(n):
        def on_shard(path, written):
            if written == n:
                raise Interrupt
        return on_shard

    cfg = compose_cfg(common + [f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(Interrupt):
        collect(cfg, on_shard=stop_after(2))
    assert len(list((tmp_path / "run").glob("shard-*.parquet"))) == 2
    (tmp_path / "run" / ".shard-00002.parquet.x.tmp").write_bytes(b"half a shard")  # a killed write
    assert not json.loads((tmp_path / "run" / "manifest.json").read_text())["complete"]
    with pytest.raises(Interrupt):  # resume, interrupted again
        collect(cfg, on_shard=stop_after(1))
    collect(cfg)  # and finished
    got = RoutingTrace.read(tmp_path / "run")
    assert len(list((tmp_path / "run").glob("shard-*.parquet"))) == 5
    assert not list((tmp_path / "run").glob("*.tmp"))
    keys = np.stack([got.request_id, got.step, got.position, got.layer], 1)
    assert len(np.unique(keys, axis=0)) == len(got), "duplicate rows after resume"
    np.testing.assert_array_equal(got.requests(), np.arange(9))
    for name in ("request_id", "step", "phase", "position", "token_id", "layer", "experts", "weights"):
        np.testing.assert_array_equal(getattr(got, name), getattr(reference, name), err_msg=name)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["requests_done"] == 9 and len(manifest["shards"]) == 5

    # a second run over a finished folder does nothing; other settings are refused, not mixed in
    collect(cfg)
    assert len(list((tmp_path / "run").glob("shard-*.parquet"))) == 5
    with pytest.raises(CollectError, match="other settings"):
        collect(compose_cfg(common[:-4] + ["max_new_tokens=5", "max_prompt_tokens=32", "progress=false",
                                           "device=cpu", f"out_dir={tmp_path / 'run'}"]))


def test_hydra_entry_point_with_auto_tokenizer(tmp_path, shared, rng, monkeypatch):
    """The hydra entry point (``python -m moegps.collect ...``) with a Qwen3-MoE model and its own HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tiny_qwen3(tmp_path / "model", seed=int(rng.integers(1 << 30)))
    texts = [p.text for p in load_mmlu(shared / "mmlu" / "test", limit=40)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    argv = [
        "moegps.collect", f"model.path={tmp_path / 'model'}", "model.tokenizer=auto",
        "model.name=tiny-qwen3", "limit=5", "batch_size=2", "max_new_tokens=3", "max_prompt_tokens=64",
        f"out_dir={out}", "device=cpu", "progress=false",
    ]
    # in-process (a subprocess would pay torch's import again): hydra parses sys.argv as from a shell
    monkeypatch.setattr(sys, "argv", argv)
    collect_main()
    trace = RoutingTrace.read(out)
    requests = [json.loads(line) for f in sorted(out.glob("*.requests.jsonl")) for line in f.open()]
    for p, r in zip(load_mmlu(shared / "mmlu" / "test", limit=5), requests):
        assert r["prompt_ids"] == hf(p.text)["input_ids"][:64]
    check_structure(trace, requests, 64)
    assert trace.meta.tokenizer.endswith("PreTrainedTokenizerFast") or "Tokenizer" in trace.meta.tokenizer
    assert (out / "config.yaml").exists() and (out / ".hydra" / "config.yaml").exists()


def test_default_config_composes_and_points_at_bundled_model():
    cfg = compose_cfg([])
    assert cfg.model.name == "mixtral-tiny" and cfg.model.tokenizer == "mixtral"
    assert (PROJECT_ROOT / cfg.model.path).resolve() == (BUNDLED_MODELS / "mixtral-tiny").resolve()
    assert cfg.dataset.name == "mmlu" and Path(cfg.dataset.path).name == "test"
    assert cfg.limit <= 128 and cfg.max_new_tokens <= 64  # the default runs in about a minute on a CPU
    assert Path(cfg.out_dir) == PROJECT_ROOT / "runs" / "collect" / "mixtral-tiny-mmlu"
    big = compose_cfg(["model=mixtral_8x7b"])
    assert big.model.hub_id == "mistralai/Mixtral-8x7B-Instruct-v0.1" and big.model.dtype == "bfloat16"
    for name in ("olmoe", "qwen3_moe", "qwen2_moe", "mixtral_tiny_64e"):
        assert compose_cfg([f"model={name}"]).model.name
    for name in ("mmlu_hub", "text"):
        assert compose_cfg([f"dataset={name}"]).dataset.kind in ("mmlu", "text")


@pytest.mark.skipif(not (BUNDLED_MODELS / "mixtral-tiny" / "config.json").exists(), reason="bundled model absent")
def test_default_config_on_the_bundled_model(tmp_path, shared):
    """The default model and dataset (fewer prompts and tokens), checked against the reference."""
    cfg = compose_cfg([f"out_dir={tmp_path / 'out'}", "limit=3", "max_new_tokens=4", "progress=false", "device=cpu"])
    with RouterCalls() as rc:
        out = collect(cfg)
    trace, requests = check_against_reference("mixtral", out, rc.calls, cfg.batch_size, 4, {2}, False)
    check_structure(trace, requests, cfg.max_prompt_tokens)
    assert trace.meta.model == "mixtral-tiny" and trace.meta.n_experts == 8 and trace.meta.top_k == 2
    assert trace.meta.tokenizer == mixtral_tokenizer().name and trace.meta.dataset.startswith("mmlu")


def test_missing_model_and_bad_settings_are_named(tmp_path):
    cfg = compose_cfg([f"model.path={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'out'}", "limit=1"])
    with pytest.raises(CollectError, match="nowhere"):
        collect(cfg)
    with pytest.raises(ConfigError, match="'max_new_tokens' is 0"):
        collect(compose_cfg([f"out_dir={tmp_path / 'out'}", "max_new_tokens=0"]))
    with pytest.raises(CollectError, match="exactly one of 'path'"):
        collect(compose_cfg([f"out_dir={tmp_path / 'out'}", "model.hub_id=org/model"]))


def test_summary_reports_each_phases_skew(rng):
    """A hand-built trace: prefill sends every token of layer 0 to experts (0, 1) of 8 (max/mean 4),
    layer 1 to all 8 experts evenly; decode tokens of layer 0 go to a random pair each."""
    from moegps.collect import summary
    from moegps.trace import TraceMeta

    n_prefill, n_decode = int(rng.integers(3, 9)) * 4, int(rng.integers(2, 6))
    T = n_prefill + n_decode
    experts = np.empty((T, 2, 2), dtype=np.int16)
    experts[:n_prefill, 0] = [0, 1]
    experts[:n_prefill, 1] = np.arange(2 * n_prefill).reshape(-1, 2) % 8
    experts[n_prefill:] = rng.permutation(8)[:2]  # one fixed pair for every decode token: max/mean 4
    step = np.r_[np.zeros(n_prefill, int), np.arange(1, n_decode + 1)]
    trace = RoutingTrace.from_token_major(TraceMeta("hand", 2, 8, 2), np.zeros(T, int), step,
                                          np.arange(T), rng.integers(0, 100, T), experts)
    text = summary(trace, Path("somewhere"))
    assert f"1 requests, {T} tokens x 2 MoE layers = {2 * T} rows" in text
    assert "prefill max/mean expert load per layer: 4.00 1.00" in text
    assert "decode  max/mean expert load per layer: 4.00 4.00" in text
    assert "python -m moegps.report routing somewhere" in text


def test_cache_argument_follows_the_forward_signature():
    """The KV cache goes by `cache` where the forward takes it (transformers >= 5.24) and by `past_key_values`
    before (the GPU machines' 5.17): both forms, hand-built."""
    from moegps.models.adapters import cache_argument

    class Before(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return input_ids

    class After(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=None):
            return input_ids

    assert cache_argument(Before()) == "past_key_values"
    assert cache_argument(After()) == "cache"
