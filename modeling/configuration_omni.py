"""Configuration of the omnimodal sparse-MoE causal LM (`model_type = "omni_moe"`).

One `PretrainedConfig` holds the Qwen2-style LLM settings, the modality-aware MoE
settings, the encoder sub-configs (vision: CLIP or SigLIP; audio: Whisper), the
projector settings, the Omni 3D-RoPE sections and the special token ids.

Router columns (global expert ids) are laid out in a fixed order:

    [intra(modality 0) | intra(modality 1) | ... | inter pool | null experts]

Routed experts with weights are the first `num_routed_experts` columns (intra + inter);
null experts are the last `num_null_experts` columns and own no weights.
"""

from __future__ import annotations

from typing import Any

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

DEFAULT_MODALITIES = ("text", "image", "video", "audio")
VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")
AUDIO_MODEL_TYPES = ("whisper",)
PROJECTOR_TYPES = ("mlp", "qformer")


def _as_sub_config(value: Any, allowed: tuple[str, ...], name: str) -> PretrainedConfig | None:
    """Turn a dict (as read from config.json) or a config object into a config object."""
    if value is None:
        return None
    if isinstance(value, dict):
        model_type = value.get("model_type")
        if model_type not in allowed:
            raise ValueError(f"{name}.model_type must be one of {allowed}, got {model_type!r}")
        fields = {k: v for k, v in value.items() if k != "model_type"}
        value = CONFIG_MAPPING[model_type](**fields)
    if not isinstance(value, PretrainedConfig):
        raise TypeError(f"{name} must be a dict or a PretrainedConfig, got {type(value).__name__}")
    if value.model_type not in allowed:
        raise ValueError(f"{name}.model_type must be one of {allowed}, got {value.model_type!r}")
    return value


class OmniMoeConfig(PretrainedConfig):
    r"""Configuration of `OmniMoeForCausalLM`.

    LLM (Qwen2 architecture): `vocab_size`, `hidden_size`, `intermediate_size` (dense FFN),
    `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`, `head_dim`,
    `rope_theta`, `rms_norm_eps`, `attention_bias` (Qwen2: bias on q/k/v; Llama: none),
    `tie_word_embeddings`.

    MoE: `moe_layers` ("all", "every_other", "none" or a list of layer indices);
    `num_intra_experts` (int for every modality, or {modality: int}); `num_inter_experts`
    (shared by all modalities); `num_shared_experts` (always-on SwiGLU experts of
    `shared_expert_intermediate_size` each, gated by one sigmoid; as in DeepSeek-MoE, n of them
    run as one MLP n times as wide, which is exactly their sum); `num_null_experts` (router
    columns without weights); `num_experts_per_tok` (top-k) and optional `moe_top_p`
    (dynamic top-p: the fewest experts whose probability mass reaches p, at most top-k);
    `moe_intermediate_size`; `router_aux_loss_coef` (Switch load balancing within each
    modality's pool); `router_balance` ("modality": balance over all of a modality's allowed
    experts, intra + inter as one pool; "pool": within its intra pool and within the inter pool
    separately, leaving the intra/inter split to the task loss); `router_per_modality` (one router
    per modality instead of one shared by all); `router_modality_bias` (a learned logit offset per
    modality and router column, zero at init); `router_z_loss_coef`;
    `aux_free_bias` / `aux_free_bias_rate` (DeepSeek-V3 style selection bias, updated by the
    training loop after every step); `use_inter_pool` (False restricts each modality to its
    intra pool + null experts).

    Encoders: `vision_config` (CLIP/SigLIP vision config or dict), `vision_feature_layer`,
    `vision_drop_cls`; `audio_config` (Whisper config or dict; only its encoder is used).
    `None` means the model has no encoder for that modality.

    Projectors: `image_projector` / `audio_projector` ("mlp" or "qformer"), video shares the
    image projector; `image_pooling` (k: k x k average pooling of the patch grid),
    `video_temporal_pooling` (frames averaged together), `audio_pooling` (encoder frames
    averaged together), `qformer_num_queries`, `qformer_num_layers`, `qformer_num_heads`.

    Omni 3D RoPE: `mrope_section` (rotary frequency pairs given to the time, height and width
    components; sums to head_dim // 2), `mrope_interleaved` (True: pairs dealt t, h, w, t, ... so every axis gets
    fast and slow frequencies; False: contiguous sections, Qwen2-VL's layout; see rope.py),
    `rope_positions_per_second` (time ids per second of video/audio, so audio and video from the same second share
    time ids).
    """

    model_type = "omni_moe"
    keys_to_ignore_at_inference = ["past_key_values"]
    # the encoders' configs, declared so transformers applies per-model settings (attn_implementation, dtype) to the
    # encoder towers too
    sub_configs = {"vision_config": AutoConfig, "audio_config": AutoConfig}

    def __init__(
        self,
        # --- LLM ---
        vocab_size: int = 151936,
        hidden_size: int = 896,
        intermediate_size: int = 4864,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 14,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1000000.0,
        attention_bias: bool = True,
        attention_dropout: float = 0.0,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        # --- modalities ---
        modalities: list[str] | tuple[str, ...] = DEFAULT_MODALITIES,
        # --- MoE ---
        moe_layers: str | list[int] = "all",
        num_intra_experts: int | dict[str, int] = 2,
        num_inter_experts: int = 2,
        num_shared_experts: int = 1,
        shared_expert_intermediate_size: int | None = None,
        num_null_experts: int = 0,
        num_experts_per_tok: int = 2,
        moe_top_p: float | None = None,
        moe_intermediate_size: int | None = None,
        norm_topk_prob: bool = True,
        router_aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.001,
        router_balance: str = "modality",
        router_per_modality: bool = False,
        router_modality_bias: bool = False,
        aux_free_bias: bool = False,
        aux_free_bias_rate: float = 1e-3,
        use_inter_pool: bool = True,
        # --- encoders ---
        vision_config: PretrainedConfig | dict | None = None,
        vision_feature_layer: int = -2,
        vision_drop_cls: bool = True,
        audio_config: PretrainedConfig | dict | None = None,
        # --- projectors ---
        image_projector: str = "mlp",
        audio_projector: str = "mlp",
        projector_hidden_act: str = "gelu",
        image_pooling: int = 1,
        video_temporal_pooling: int = 1,
        audio_pooling: int = 1,
        qformer_num_queries: int = 32,
        qformer_num_layers: int = 2,
        qformer_num_heads: int = 4,
        # --- Omni 3D RoPE ---
        mrope_section: list[int] | None = None,
        mrope_interleaved: bool = True,
        rope_positions_per_second: float = 25.0,
        # --- special tokens ---
        image_token_id: int | None = None,
        video_token_id: int | None = None,
        audio_token_id: int | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.use_cache = use_cache

        self.modalities = list(modalities)
        self.moe_layers = moe_layers if isinstance(moe_layers, str) else [int(i) for i in moe_layers]
        if isinstance(num_intra_experts, dict):
            self.num_intra_experts = {str(k): int(v) for k, v in num_intra_experts.items()}
        else:
            self.num_intra_experts = int(num_intra_experts)
        self.num_inter_experts = num_inter_experts
        self.num_shared_experts = num_shared_experts
        self.moe_intermediate_size = moe_intermediate_size if moe_intermediate_size is not None else intermediate_size
        self.shared_expert_intermediate_size = (
            shared_expert_intermediate_size if shared_expert_intermediate_size is not None else self.moe_intermediate_size
        )
        self.num_null_experts = num_null_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_top_p = moe_top_p
        self.norm_topk_prob = norm_topk_prob
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.router_balance = router_balance
        self.router_per_modality = bool(router_per_modality)
        self.router_modality_bias = bool(router_modality_bias)
        self.aux_free_bias = aux_free_bias
        self.aux_free_bias_rate = aux_free_bias_rate
        self.use_inter_pool = use_inter_pool

        self.vision_config = _as_sub_config(vision_config, VISION_MODEL_TYPES, "vision_config")
        self.vision_feature_layer = vision_feature_layer
        self.vision_drop_cls = vision_drop_cls
        self.audio_config = _as_sub_config(audio_config, AUDIO_MODEL_TYPES, "audio_config")

        self.image_projector = image_projector
        self.audio_projector = audio_projector
        self.projector_hidden_act = projector_hidden_act
        self.image_pooling = image_pooling
        self.video_temporal_pooling = video_temporal_pooling
        self.audio_pooling = audio_pooling
        self.qformer_num_queries = qformer_num_queries
        self.qformer_num_layers = qformer_num_layers
        self.qformer_num_heads = qformer_num_heads

        if mrope_section is None:
            mrope_section = default_mrope_section(self.head_dim)
        self.mrope_section = [int(s) for s in mrope_section]
        self.mrope_interleaved = bool(mrope_interleaved)
        self.rope_positions_per_second = rope_positions_per_second

        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.audio_token_id = audio_token_id

        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_omni()

    # ------------------------------------------------------------------ derived layout
    def intra_experts_of(self, modality: str) -> int:
        if isinstance(self.num_intra_experts, dict):
            return int(self.num_intra_experts.get(modality, 0))
        return int(self.num_intra_experts)

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def num_routed_experts(self) -> int:
        """Experts that own weights: every intra pool plus the inter pool."""
        return sum(self.intra_experts_of(m) for m in self.modalities) + self.num_inter_experts

    @property
    def num_router_columns(self) -> int:
        return self.num_routed_experts + self.num_null_experts

    @property
    def shared_mlp_intermediate_size(self) -> int:
        """Width of the one always-on MLP that holds all shared experts: num_shared_experts x
        shared_expert_intermediate_size (0 without shared experts). Its output is the sum of the n experts' outputs,
        expert i owning intermediate rows [i * size, (i + 1) * size)."""
        return self.num_shared_experts * self.shared_expert_intermediate_size

    def modality_id(self, modality: str) -> int:
        try:
            return self.modalities.index(modality)
        except ValueError:
            raise ValueError(f"unknown modality {modality!r}; this model has {self.modalities}") from None

    def expert_pools(self) -> dict[str, range]:
        """Global expert-id ranges: one entry per modality's intra pool, plus "inter" and "null"."""
        pools: dict[str, range] = {}
        start = 0
        for m in self.modalities:
            n = self.intra_experts_of(m)
            pools[m] = range(start, start + n)
            start += n
        pools["inter"] = range(start, start + self.num_inter_experts)
        start += self.num_inter_experts
        pools["null"] = range(start, start + self.num_null_experts)
        return pools

    def allowed_experts(self) -> list[list[bool]]:
        """`allowed[modality][column]`: the modality's intra pool, the inter pool (if used), null experts."""
        pools = self.expert_pools()
        rows = []
        for m in self.modalities:
            allowed = set(pools[m]) | set(pools["null"])
            if self.use_inter_pool:
                allowed |= set(pools["inter"])
            rows.append([c in allowed for c in range(self.num_router_columns)])
        return rows

    def is_moe_layer(self, layer_idx: int) -> bool:
        if self.moe_layers == "all":
            return True
        if self.moe_layers == "none":
            return False
        if self.moe_layers == "every_other":
            return layer_idx % 2 == 1
        return layer_idx in self.moe_layers

    # ------------------------------------------------------------------ validation
    def validate_omni(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"OmniMoeConfig: {msg}")

        if self.hidden_size <= 0 or self.num_hidden_layers <= 0:
            fail("hidden_size and num_hidden_layers must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            fail(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            fail(f"head_dim ({self.head_dim}) must be even for RoPE")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            fail(f"mrope_section {self.mrope_section} must have 3 entries summing to head_dim // 2 = {self.head_dim // 2}")
        if len(set(self.modalities)) != len(self.modalities) or not self.modalities:
            fail(f"modalities must be a non-empty list of distinct names, got {self.modalities}")
        if self.modalities[0] != "text":
            fail(f"modality 0 must be 'text' (padding and plain tokens use id 0), got {self.modalities}")
        if isinstance(self.num_intra_experts, dict):
            unknown = set(self.num_intra_experts) - set(self.modalities)
            if unknown:
                fail(f"num_intra_experts names unknown modalities {sorted(unknown)}; known: {self.modalities}")
        if isinstance(self.moe_layers, str) and self.moe_layers not in ("all", "every_other", "none"):
            fail(f"moe_layers must be 'all', 'every_other', 'none' or a list of layer indices, got {self.moe_layers!r}")
        if isinstance(self.moe_layers, list):
            bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
            if bad:
                fail(f"moe_layers {bad} outside [0, {self.num_hidden_layers})")
        for name in ("num_inter_experts", "num_null_experts", "num_shared_experts"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0")
        if self.num_experts_per_tok < 1:
            fail("num_experts_per_tok must be >= 1")
        if self.router_balance not in ("modality", "pool"):
            fail(f"router_balance must be 'modality' or 'pool', got {self.router_balance!r}")
        if self.moe_top_p is not None and not 0.0 < self.moe_top_p <= 1.0:
            fail(f"moe_top_p must be in (0, 1], got {self.moe_top_p}")
        has_moe = any(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        if has_moe:
            allowed = self.allowed_experts()
            for m, row in zip(self.modalities, allowed):
                n_allowed = sum(row)
                if n_allowed < self.num_experts_per_tok:
                    fail(
                        f"top_k ({self.num_experts_per_tok}) is larger than modality {m!r}'s allowed pool "
                        f"({n_allowed} = {self.intra_experts_of(m)} intra + "
                        f"{self.num_inter_experts if self.use_inter_pool else 0} inter + {self.num_null_experts} null)"
                    )
                if not any(row[: self.num_routed_experts]):
                    fail(f"modality {m!r} can reach no expert with weights (only null experts)")
        for name in ("image_projector", "audio_projector"):
            if getattr(self, name) not in PROJECTOR_TYPES:
                fail(f"{name} must be one of {PROJECTOR_TYPES}, got {getattr(self, name)!r}")
        for name in ("image_pooling", "video_temporal_pooling", "audio_pooling"):
            if int(getattr(self, name)) < 1:
                fail(f"{name} must be >= 1")
        self._validate_token_ids(fail)

    def _validate_token_ids(self, fail) -> None:
        """Every special id needs an embedding row. The case this catches: a pretrained LLM's tokenizer with our
        media placeholders appended past its embedding matrix (Qwen2.5's is padded and has room; Llama 3's is not)
        -- caught here, when the config is made, before any weights are built or read."""
        eos = self.eos_token_id if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]
        named = [(n, getattr(self, n)) for n in ("image_token_id", "video_token_id", "audio_token_id",
                                                 "pad_token_id", "bos_token_id")]
        named += [("eos_token_id", i) for i in eos]
        outside = [f"{name}={i}" for name, i in named if i is not None and not 0 <= int(i) < self.vocab_size]
        if outside:
            fail(f"{', '.join(outside)} outside the vocabulary (vocab_size {self.vocab_size}): every token id needs "
                 "an embedding row; resize the LLM's embeddings first (transformers' resize_token_embeddings, then "
                 "save_pretrained) or use a tokenizer that fits")


def default_mrope_section(head_dim: int) -> list[int]:
    """Split head_dim // 2 rotary pairs over (time, height, width) like Qwen2-VL (16/24/24 of 64)."""
    half = head_dim // 2
    t = max(1, round(half * 0.25)) if half >= 3 else half
    rest = half - t
    h = rest // 2
    w = rest - h
    return [t, h, w]


__all__ = ["OmniMoeConfig", "default_mrope_section", "DEFAULT_MODALITIES"]
