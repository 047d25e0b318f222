"""Our chat/placeholder special tokens and the ChatML chat template.

`ensure_special_tokens` adds our tokens to an existing tokenizer (e.g. a Qwen2 one) before upcycling; a fresh
tokenizer for the tiny recipe is trained by `omni_moe.data.tokenizer.build_bpe_tokenizer`.
"""

from __future__ import annotations

from transformers import AddedToken

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<|image|>"
VIDEO_TOKEN = "<|video|>"
AUDIO_TOKEN = "<|audio|>"

# Order matters for omni_moe.data.tokenizer.build_bpe_tokenizer: the trainer gives special tokens the first ids (0..5).
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN)

# Placeholder token per media part type, as rendered by CHAT_TEMPLATE and expanded by the processor.
MEDIA_PLACEHOLDERS: dict[str, str] = {"image": IMAGE_TOKEN, "video": VIDEO_TOKEN, "audio": AUDIO_TOKEN}

# ChatML as Qwen2 uses it, without Qwen2's implicit default system prompt (a hidden system turn would make the
# processor's token layout depend on the template's defaults). Media parts render as ONE unexpanded placeholder;
# the processor expands it to the media's token count. Whitespace control (`-`) keeps the rendering byte-exact.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|video|>' -}}"
    "{%- elif part['type'] == 'audio' -%}{{- '<|audio|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def special_token(token: str) -> AddedToken:
    # No lstrip/rstrip/normalisation: the token must match exactly the characters the template writes.
    return AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def ensure_special_tokens(tokenizer) -> dict[str, int]:
    """Add whichever of SPECIAL_TOKENS `tokenizer` lacks (as special tokens) and return {token: id} for all of them.

    Sets the pad token to PAD_TOKEN when the tokenizer has none. If tokens were added, the model's embeddings must be
    resized to `len(tokenizer)` afterwards. Existing ids are never changed.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [special_token(t) for t in missing]}, replace_extra_special_tokens=False
        )
    # Tokens already in the vocab may be plain (non-special) added tokens; mark them special so they are
    # skipped by decode(skip_special_tokens=True) and split by split_special_tokens=True.
    already_special = set(tokenizer.all_special_tokens)
    not_special = [t for t in SPECIAL_TOKENS if t not in already_special and t not in missing]
    if not_special:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [special_token(t) for t in not_special]}, replace_extra_special_tokens=False
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    unknown = [t for t, i in ids.items() if i is None or (tokenizer.unk_token_id is not None and i == tokenizer.unk_token_id)]
    if unknown:
        raise RuntimeError(f"ensure_special_tokens: tokens {unknown} still map to no id in {type(tokenizer).__name__}")
    return ids


__all__ = [
    "SPECIAL_TOKENS",
    "MEDIA_PLACEHOLDERS",
    "CHAT_TEMPLATE",
    "PAD_TOKEN",
    "IM_START",
    "IM_END",
    "IMAGE_TOKEN",
    "VIDEO_TOKEN",
    "AUDIO_TOKEN",
    "special_token",
    "ensure_special_tokens",
]
