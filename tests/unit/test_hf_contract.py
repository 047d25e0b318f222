"""transformers' generic model tests (`ModelTesterMixin` of the installed version's sdist) on our model.

    .venv/bin/python -m pytest -q tests/unit/test_hf_contract.py

Two tiny configs: text only, and with vision and audio towers (every sample carries one image and one audio clip, so
upstream's batch slicing keeps media and placeholders together). The upstream file is fetched by
`bash launch/install.sh test` (tests/hf_upstream.py); without it this module fails at import, naming that command.
"""

from __future__ import annotations

import unittest

import torch

from modeling.media import audio_token_count, image_token_count
from modeling.modeling_omni import OmniMoeForCausalLM
from tests.hf_upstream import upstream_module
from tests.tiny import AUDIO_ID, IMAGE_ID, tiny_config

common = upstream_module("test_modeling_common")
GenerationTesterMixin = common.GenerationTesterMixin  # our stand-in: the sdist lacks the generation tests


class OmniModelTester:
    """Builds the config and inputs upstream's mixin asks for (`prepare_config_and_inputs_for_common`)."""

    def __init__(self, parent, media: bool, batch_size: int = 2, seq_length: int = 7):
        self.parent = parent
        self.media = media
        self.batch_size = batch_size
        self.is_training = True
        config = self.get_config()
        # media samples: 3 text tokens, the image's and the audio clip's placeholders, then text again
        self.seq_length = seq_length + (sum(config_media_tokens(config).values()) if media else 0)
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.num_hidden_layers = config.num_hidden_layers
        self.num_attention_heads = config.num_attention_heads

    def get_config(self):
        return tiny_config(media=self.media, pad_token_id=0, eos_token_id=1, bos_token_id=2)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        # text ids avoid the special ids (0 pad, 1 eos) and the placeholder ids at the top of the vocabulary
        input_ids = torch.randint(3, config.vocab_size - 3, (self.batch_size, self.seq_length))
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :2] = 0  # one left-padded row, as batched generation makes
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.media:
            media = config_media_tokens(config)
            n_image, n_audio = media["image"], media["audio"]
            input_ids[:, 3 : 3 + n_image] = IMAGE_ID
            input_ids[:, 3 + n_image : 3 + n_image + n_audio] = AUDIO_ID
            size = config.vision_config.image_size
            audio = config.audio_config
            inputs.update(
                pixel_values=torch.randn(self.batch_size, 3, size, size),
                audio_features=torch.randn(self.batch_size, audio.num_mel_bins, 2 * audio.max_source_positions),
                audio_chunk_counts=torch.ones(self.batch_size, dtype=torch.long),
                audio_token_counts=torch.full((self.batch_size,), n_audio, dtype=torch.long),
            )
        return config, inputs


def config_media_tokens(config) -> dict[str, int]:
    """Placeholder tokens for one image and for a 0.5 s audio clip (one Whisper chunk)."""
    return {"image": image_token_count(config), "audio": audio_token_count(config, 8000)}


class OmniTextContractTest(common.ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (OmniMoeForCausalLM,)
    media = False

    def setUp(self):
        self.model_tester = OmniModelTester(self, media=self.media)


class OmniMediaContractTest(OmniTextContractTest):
    media = True
