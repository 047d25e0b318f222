"""generate() under transformers' generation contract: dict outputs with hidden states, scores and attentions for
greedy, sampling, beam search and assisted decoding; generation from `inputs_embeds`.

    .venv/bin/python -m pytest -q tests/unit/test_hf_contract_generate.py

transformers' own `GenerationTesterMixin` (tests/generation/test_utils.py) is not in its source distribution
(tests/hf_upstream.py), so these cover the paths its tests exercise that our model once failed.
"""

from __future__ import annotations

import pytest
import torch

from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
from tests.hf_upstream import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.tiny import tiny_config

NEW = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = tiny_config(media=False, image_token_id=None, video_token_id=None, audio_token_id=None)
    return OmniMoeForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompt():
    torch.manual_seed(1)
    ids = torch.randint(3, 90, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    return ids, mask


@pytest.mark.parametrize("mode", [
    dict(do_sample=False),
    dict(do_sample=True, top_k=5),
    dict(do_sample=False, num_beams=2),
    dict(do_sample=False, prompt_lookup_num_tokens=2),  # assisted decoding (candidates from the prompt)
])
def test_dict_outputs_carry_hidden_states_scores_and_attentions(model, prompt, mode):
    ids, mask = prompt
    model.set_attn_implementation("eager")  # attention maps come from the eager kernel, as in transformers
    try:
        batch = 1 if "prompt_lookup_num_tokens" in mode else 2  # assisted decoding takes one row
        out = model.generate(
            input_ids=ids[:batch], attention_mask=mask[:batch], max_new_tokens=NEW, min_new_tokens=NEW,
            return_dict_in_generate=True, output_hidden_states=True, output_scores=True, output_attentions=True,
            pad_token_id=0, **mode,
        )
    finally:
        model.set_attn_implementation("sdpa")
    rows = batch * mode.get("num_beams", 1)
    assert out.sequences.shape[1] == ids.shape[1] + NEW
    assert len(out.scores) == NEW and out.scores[0].shape == (rows, model.config.vocab_size)
    layers = model.config.num_hidden_layers
    prefill = out.hidden_states[0]
    assert len(prefill) == layers + 1 and prefill[0].shape[-1] == model.config.hidden_size
    assert len(out.attentions[0]) == layers
    assert out.attentions[0][0].shape[1] == model.config.num_attention_heads


def test_generate_from_inputs_embeds_continues_like_the_ids(model, prompt):
    ids, mask = prompt
    embeds = model.get_input_embeddings()(ids)
    from_ids = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])


def test_return_dict_false_gives_a_tuple(model, prompt):
    ids, mask = prompt
    with torch.no_grad():
        as_tuple = model(ids, attention_mask=mask, return_dict=False, use_cache=False)
        as_dict = model(ids, attention_mask=mask, use_cache=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.logits)
