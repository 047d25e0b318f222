"""generate() on processed multimodal prompts: 3D positions continue correctly and the KV cache changes nothing."""

import pytest
import torch

from omni_moe.data.tokenizer import build_bpe_tokenizer
from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
from omni_moe.modeling.processing_omni import OmniMoeProcessor
from omni.demo import SENTENCES, demo_batch, tiny_omni_config


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tokenizer = build_bpe_tokenizer(SENTENCES, vocab_size=320)
    config = tiny_omni_config(tokenizer)
    model = OmniMoeForCausalLM(config).eval()
    # a non-trivial model: untrained logits are near-uniform and make greedy decoding fragile to compare
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, OmniMoeProcessor.from_config(config, tokenizer)


@pytest.mark.parametrize("which", [1, 2, 3])  # image, video, audio prompts
def test_generate_with_cache_equals_full_recompute(setup, which):
    model, processor = setup
    conversations, images, videos, audios = demo_batch(0)
    media = {1: dict(images=images), 2: dict(videos=videos), 3: dict(audios=audios)}[which]
    prompt = processor([conversations[which][:1]], add_generation_prompt=True, return_labels=False, **media)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=processor.tokenizer.pad_token_id)
    cached = model.generate(**prompt, **kw)
    full = model.generate(**prompt, use_cache=False, **kw)
    assert torch.equal(cached, full)
    # the first generated token equals the argmax of one plain forward on the prompt
    with torch.no_grad():
        logits = model(**prompt).logits
    assert cached[0, prompt["input_ids"].shape[1]] == logits[0, -1].argmax()
    # and positions continue from the prompt's max position + 1 (not from its length)
    assert int(prompt["rope_deltas"][0]) != 0 or which == 3


def test_batched_left_padded_generation_matches_single(setup):
    model, processor = setup
    conversations, images, videos, audios = demo_batch(0)
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=processor.tokenizer.pad_token_id)
    convs = [conversations[0][:1], conversations[1][:1]]
    batch = processor(convs, images=images, add_generation_prompt=True, return_labels=False, padding_side="left")
    together = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
    for i, (conv, imgs) in enumerate([(convs[0], None), (convs[1], images)]):
        single = processor([conv], images=imgs, add_generation_prompt=True, return_labels=False)
        alone = model.generate(**single, **kw)[:, single["input_ids"].shape[1]:]
        assert torch.equal(alone[0], together[i]), i
