"""The moegps MoE block swapped into a tiny random Mixtral generates what plain transformers generates."""

import torch

from moegps.executor.generate import MoEGPSBlock, moe_blocks, swap_moe_blocks, tiny_mixtral_config


def test_swapped_model_generates_the_same_tokens(rng):
    from transformers import MixtralForCausalLM

    torch.manual_seed(int(rng.integers(1 << 30)))
    model = MixtralForCausalLM(tiny_mixtral_config()).eval()
    ids = torch.as_tensor(rng.integers(3, 256, (2, 7)))
    with torch.no_grad():
        plain_logits = model(ids).logits
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                               pad_token_id=0)
        assert swap_moe_blocks(model) == 2
        assert not moe_blocks(model) and sum(isinstance(m, MoEGPSBlock) for m in model.modules()) == 2
        ours_logits = model(ids).logits
        ours = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=0)
    assert (ours_logits - plain_logits).abs().max() < 1e-4 * plain_logits.abs().max()
    assert torch.equal(ours, plain)
    # the static-cache decode loop of the benchmark (eager here; CUDA graphs on a GPU) decodes the same
    from moegps.executor.generate import same_tokens, static_decode

    tokens, _ = static_decode(model, ids, 8)
    assert same_tokens(tokens, plain[:, ids.shape[1]:], model.generation_config.eos_token_id)
    assert not same_tokens(tokens + 1, plain[:, ids.shape[1]:], 2)
    with torch.no_grad():  # EOS banned on both sides: the whole sequences agree
        plain_min = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                                   do_sample=False, pad_token_id=0)
    tokens, _ = static_decode(model, ids, 8, suppress=[model.generation_config.eos_token_id])
    assert torch.equal(tokens, plain_min[:, ids.shape[1]:])
