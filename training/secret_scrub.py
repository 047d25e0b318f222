"""Keeping credentials out of what a run writes: `scrub_secrets` redacts them in any JSON-like value.

Every JSON file, safetensors header, recipe copy and model card a run writes goes through it
(training/checkpoint_files.py, training/training_state.py, omni/train.py, omni/model_card.py), so a token in the
environment or in a config never reaches the disk.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

REDACTED = "<redacted>"
_SECRET_ENV_NAME_RE = re.compile(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)", re.IGNORECASE)
# Keys whose string value is a secret whatever its value. Narrow on purpose: configs are full of innocent "*_token"
# keys (pad_token, eos_token) that must survive.
_SECRET_KEYS = {"token", "hf_token", "hub_token", "access_token", "auth_token", "use_auth_token", "api_key",
                "apikey", "secret", "secret_key", "client_secret", "private_key", "password", "passwd"}
_SECRET_KEY_SUFFIXES = ("_api_key", "_secret", "_secret_key", "_password", "_access_token", "_auth_token",
                        "_hub_token", "_hf_token")
MIN_SECRET_CHARS = 8  # shorter env values ("1", "true") would redact innocent text everywhere


def secret_env_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """{name: value} of environment variables whose names look like credentials (HF_TOKEN, *_KEY, *_SECRET...)."""
    environ = os.environ if environ is None else environ
    return {
        name: value for name, value in environ.items()
        if _SECRET_ENV_NAME_RE.search(name) and len(value) >= MIN_SECRET_CHARS
    }


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return lowered in _SECRET_KEYS or lowered.endswith(_SECRET_KEY_SUFFIXES)


def scrub_secrets(obj: Any, extra_secrets: tuple[str, ...] = (), environ: Mapping[str, str] | None = None) -> Any:
    """A copy of `obj` (dicts, lists, tuples, strings, scalars) safe to write to disk or logs.

    - every occurrence of the value of a credential-like environment variable (and of each `extra_secrets` value)
      inside any string, key or value, becomes `<redacted:NAME>`;
    - the string value of a credential-like key (`token`, `api_key`, `*_secret`, ...) becomes `<redacted>`."""
    replacements = sorted(secret_env_values(environ).items(), key=lambda kv: -len(kv[1]))
    replacements += [("secret", s) for s in extra_secrets if s and len(s) >= MIN_SECRET_CHARS]

    def scrub_text(text: str) -> str:
        for name, value in replacements:
            if value in text:
                text = text.replace(value, f"<redacted:{name}>")
        return text

    def walk(value: Any, key: Any = None) -> Any:
        if isinstance(value, str):
            return REDACTED if isinstance(key, str) and _is_secret_key(key) else scrub_text(value)
        if isinstance(value, Mapping):
            return {(scrub_text(k) if isinstance(k, str) else k): walk(v, k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [walk(v) for v in value]
            return items if isinstance(value, list) else tuple(items)
        return value

    return walk(obj)


__all__ = ["MIN_SECRET_CHARS", "REDACTED", "scrub_secrets", "secret_env_values"]
