"""Train a byte-level BPE tokenizer (the `tokenizers` library) with our chat/placeholder special tokens.

Used by tests and by stage 0 of the tiny recipe, where no pretrained tokenizer can be downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from omni_moe.modeling.tokenizer_utils import (
    AUDIO_TOKEN,
    CHAT_TEMPLATE,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    VIDEO_TOKEN,
    special_token,
)


def build_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, out_dir: str | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` with our special tokens, pad/eos and the chat template.

    Byte-level: every string (any Unicode) is encodable and decodes back exactly. Deterministic for the same texts.
    `vocab_size` includes the 256 byte symbols and the special tokens, so it must exceed 256 + len(SPECIAL_TOKENS).
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= minimum:
        raise ValueError(f"build_bpe_tokenizer: vocab_size {vocab_size} must be > {minimum} (256 bytes + specials)")
    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError("build_bpe_tokenizer: no training texts given")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[special_token(t) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        # A chat model stops at the end of its turn (as Qwen2-Instruct does).
        eos_token=IM_END,
        extra_special_tokens=[IM_START, IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer
