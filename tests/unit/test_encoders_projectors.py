"""Encoders, projectors and the media tower (modeling/encoders.py, projectors.py, media.py).

Tiny CLIP / SigLIP / Whisper models are built from configs and saved to tmp dirs; nothing is downloaded.
"""


import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperModel,
)

from omni_moe.modeling.configuration_omni import OmniMoeConfig
from omni_moe.modeling.encoders import AudioEncoder, VisionEncoder
from omni_moe.modeling.media import (
    OmniMediaTower,
    audio_chunk_count,
    audio_seconds_per_token,
    audio_token_count,
    image_token_count,
    image_token_grid,
    video_token_count,
    video_token_grid,
)
from omni_moe.modeling.projectors import MLPProjector, QFormerConnector, pool_grid, pool_sequence

torch.manual_seed(0)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=40, patch_size=8)
N_MELS, SOURCE_POSITIONS = 16, 50  # 100 mel frames = 1 s chunks at hop 160
WHISPER = dict(
    d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=N_MELS, max_source_positions=SOURCE_POSITIONS,
    max_target_positions=16, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
)


def clip_vision_config():
    return CLIPVisionConfig(**VISION)


def siglip_vision_config():
    return SiglipVisionConfig(**VISION)


def omni_config(vision="clip", projector="mlp", pooling=1, **overrides):
    vision_config = {"clip": clip_vision_config, "siglip": siglip_vision_config}[vision]().to_dict()
    fields = dict(
        vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vision_config=vision_config, audio_config=WhisperConfig(**WHISPER).to_dict(),
        image_projector=projector, audio_projector=projector, image_pooling=pooling, video_temporal_pooling=pooling,
        audio_pooling=pooling, qformer_num_queries=3, qformer_num_layers=1, qformer_num_heads=4,
    )
    fields.update(overrides)
    return OmniMoeConfig(**fields)


def hf_features(model, pixels, layer):
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]


# ---------------------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny HF checkpoints of every kind VisionEncoder/AudioEncoder.from_pretrained accepts."""
    root = tmp_path_factory.mktemp("encoders")
    models = {
        "clip_vision": CLIPVisionModel(clip_vision_config()),
        "clip_full": CLIPModel(
            CLIPConfig(
                text_config=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                           vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2).to_dict(),
                vision_config=clip_vision_config().to_dict(),
            )
        ),
        "siglip_vision": SiglipVisionModel(siglip_vision_config()),
        "whisper": WhisperModel(WhisperConfig(**WHISPER)),
        "whisper_gen": WhisperForConditionalGeneration(WhisperConfig(**WHISPER)),
    }
    paths = {}
    for name, model in models.items():
        model.eval().save_pretrained(root / name)
        paths[name] = root / name
    return models, paths


@pytest.mark.parametrize("name, layer", [("clip_vision", -2), ("clip_vision", -1), ("clip_full", -2), ("siglip_vision", -2)])
def test_vision_encoder_loads_and_matches_hf_hidden_state(saved, name, layer):
    models, paths = saved
    reference = models[name].vision_model if name == "clip_full" else models[name]
    encoder = VisionEncoder.from_pretrained(paths[name], feature_layer=layer).eval()
    pixels = torch.randn(2, 3, 40, 40)
    expected = hf_features(reference, pixels, layer)
    if name.startswith("clip"):
        expected = expected[:, 1:]  # CLS dropped
    with torch.no_grad():
        out = encoder(pixels)
    assert encoder.grid_size == (5, 5) and encoder.num_patches == 25 and encoder.output_dim == 32
    assert out.shape == (2, 25, 32)
    torch.testing.assert_close(out, expected)


def test_clip_cls_kept_when_asked(saved):
    models, paths = saved
    encoder = VisionEncoder.from_pretrained(paths["clip_vision"], drop_cls=False).eval()
    pixels = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        out = encoder(pixels)
    assert encoder.num_tokens == 26 and out.shape == (1, 26, 32)
    torch.testing.assert_close(out, hf_features(models["clip_vision"], pixels, -2))


@pytest.mark.parametrize("name", ["whisper", "whisper_gen"])
def test_audio_encoder_loads_whisper_encoder_weights(saved, name):
    models, paths = saved
    encoder = AudioEncoder.from_pretrained(paths[name]).eval()
    features = torch.randn(3, N_MELS, 100)
    with torch.no_grad():
        expected = models[name].get_encoder()(features).last_hidden_state
        out = encoder(features)
    assert encoder.frames_per_chunk == 100 and encoder.output_dim == 32
    assert out.shape == (3, SOURCE_POSITIONS, 32)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="100"):
        encoder(torch.randn(1, N_MELS, 60))


def test_from_pretrained_dtype(saved):
    _, paths = saved
    encoder = VisionEncoder.from_pretrained(paths["siglip_vision"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in encoder.parameters())
    assert encoder(torch.randn(1, 3, 40, 40)).dtype == torch.bfloat16  # fp32 pixels are cast to the tower's dtype


def test_bad_paths_raise_errors_naming_the_path(saved, tmp_path):
    _, paths = saved
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VisionEncoder.from_pretrained(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json.*empty"):
        AudioEncoder.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="whisper.*not a CLIP/SigLIP"):
        VisionEncoder.from_pretrained(paths["whisper"])
    with pytest.raises(ValueError, match="siglip_vision_model.*not Whisper"):
        AudioEncoder.from_pretrained(paths["siglip_vision"])
    # right config, but the weights file lacks part of the tower: an error, not silently random weights
    broken = tmp_path / "broken"
    CLIPVisionModel(clip_vision_config()).save_pretrained(broken)
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.2." not in k}, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="broken.*lacks"):
        VisionEncoder.from_pretrained(broken)


# ---------------------------------------------------------------------------------------------- pooling / projectors
def test_pool_grid_and_sequence_average_covered_cells():
    x = torch.arange(9, dtype=torch.float32).reshape(1, 9, 1)  # 3x3 grid, values 0..8 row-major
    pooled = pool_grid(x, (3, 3), 2)
    assert pooled.flatten().tolist() == [(0 + 1 + 3 + 4) / 4, (2 + 5) / 2, (6 + 7) / 2, 8.0]
    assert torch.equal(pool_grid(x, (3, 3), 1), x)
    seq = torch.arange(5, dtype=torch.float32).reshape(1, 5, 1)
    assert pool_sequence(seq, 2).flatten().tolist() == [0.5, 2.5, 4.0]
    with pytest.raises(ValueError, match="grid 2x2"):
        pool_grid(x, (2, 2), 2)


def test_mlp_projector_shapes_and_activation():
    projector = MLPProjector(32, 48, hidden_act="gelu")
    assert projector(torch.randn(2, 5, 32)).shape == (2, 5, 48)
    assert projector.linear_1.weight.shape == (48, 32) and projector.linear_2.weight.shape == (48, 48)


def test_qformer_key_mask_ignores_masked_states():
    qformer = QFormerConnector(in_dim=16, out_dim=32, num_queries=4, num_layers=2, num_heads=4).eval()
    states = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    changed = states.clone()
    changed[0, 6:] = torch.randn(4, 16) * 100  # garbage where masked
    with torch.no_grad():
        out = qformer(states, mask)
        out_changed = qformer(changed, mask)
        out_unmasked = qformer(changed)
    assert out.shape == (2, 4, 32)
    torch.testing.assert_close(out_changed, out)
    assert not torch.allclose(out_unmasked[0], out[0], atol=1e-3), "without the mask the garbage must matter"
    with torch.no_grad():
        nothing = qformer(states, torch.zeros(2, 10, dtype=torch.bool))
    assert torch.isfinite(nothing).all()


# ---------------------------------------------------------------------------------------------- tower vs counts
TOWER_CASES = [("clip", "mlp", 1), ("clip", "mlp", 2), ("siglip", "mlp", 2), ("siglip", "qformer", 1), ("clip", "qformer", 2)]
AUDIO_SAMPLES = [100, 1000, 16000, 16161, 40000]  # < 1 hop, short, exactly 1 chunk, just over 1 chunk, 3 chunks


@pytest.mark.parametrize("vision, projector, pooling", TOWER_CASES)
def test_token_counts_agree_with_tower_outputs(vision, projector, pooling):
    torch.manual_seed(1)
    config = omni_config(vision, projector, pooling)
    tower = OmniMediaTower(config).eval()
    expected_grid = (1, 3) if projector == "qformer" else ((5, 5) if pooling == 1 else (3, 3))
    assert image_token_grid(config) == expected_grid
    with torch.no_grad():
        images = tower.embed_images(torch.randn(2, 3, 40, 40))
        assert images.shape == (2, image_token_count(config), 48)
        for frames in (1, 2, 3, 4):
            t, h, w = video_token_grid(config, frames)
            assert t == -(-frames // pooling) and (h, w) == expected_grid
            videos = tower.embed_videos(torch.randn(2, frames, 3, 40, 40))
            assert videos.shape == (2, video_token_count(config, frames), 48)
        chunks = [audio_chunk_count(config, n) for n in AUDIO_SAMPLES]
        tokens = [audio_token_count(config, n) for n in AUDIO_SAMPLES]
        assert chunks == [1, 1, 1, 2, 3]
        audio = tower.embed_audios(torch.randn(sum(chunks), N_MELS, 100), torch.tensor(chunks), torch.tensor(tokens))
    assert audio.shape == (sum(tokens), 48)
    if projector == "mlp":
        # 20 ms per encoder frame: 1000 samples = 6 mel frames = 3 encoder frames
        assert tokens == [-(-f // pooling) for f in (1, 3, 50, 51, 125)]
        assert audio_seconds_per_token(config) == pytest.approx(0.02 * pooling)
    else:
        assert tokens == [3 * c for c in chunks]
        assert audio_seconds_per_token(config) == pytest.approx(1.0 / 3)


def test_mel_frame_arithmetic_matches_whisper_feature_extractor():
    extractor = WhisperFeatureExtractor(feature_size=N_MELS, sampling_rate=16000, hop_length=160, chunk_length=1)
    config = omni_config()
    for n in (1000, 4321, 15999):
        mel = extractor(np.zeros(n, np.float32), sampling_rate=16000, padding="longest", return_tensors="np")["input_features"]
        assert mel.shape[-1] == n // 160
        assert audio_token_count(config, n) == -(-mel.shape[-1] // 2)


def test_video_tokens_are_frame_major_and_temporally_averaged():
    config = omni_config("clip", "mlp", 2)
    tower = OmniMediaTower(config).eval()
    a, b, c = torch.randn(3, 1, 3, 40, 40)
    with torch.no_grad():
        image_a, image_b, image_c = (tower.embed_images(x) for x in (a, b, c))
        video = tower.embed_videos(torch.cat([a, a, b, b, c])[None])  # groups: (a, a), (b, b), (c)
    per_frame = image_token_count(config)
    assert video.shape[1] == 3 * per_frame
    torch.testing.assert_close(video[0, :per_frame], image_a[0])
    torch.testing.assert_close(video[0, per_frame : 2 * per_frame], image_b[0])
    torch.testing.assert_close(video[0, 2 * per_frame :], image_c[0])


@pytest.mark.parametrize("projector", ["mlp", "qformer"])
def test_audio_clips_are_independent_and_in_order(projector):
    config = omni_config("clip", projector, 2)
    tower = OmniMediaTower(config).eval()
    lengths = [25000, 3000]  # 2 chunks, 1 chunk
    chunks = [audio_chunk_count(config, n) for n in lengths]
    tokens = [audio_token_count(config, n) for n in lengths]
    features = torch.randn(sum(chunks), N_MELS, 100)
    with torch.no_grad():
        both = tower.embed_audios(features, torch.tensor(chunks), torch.tensor(tokens))
        first = tower.embed_audios(features[:2], torch.tensor([2]), torch.tensor(tokens[:1]))
        second = tower.embed_audios(features[2:], torch.tensor([1]), torch.tensor(tokens[1:]))
    torch.testing.assert_close(both, torch.cat([first, second]))
    with pytest.raises(ValueError, match="clip 0 asks for"):
        tower.embed_audios(features[:2], torch.tensor([2]), torch.tensor([10_000]))
    with pytest.raises(ValueError, match="must sum"):
        tower.embed_audios(features, torch.tensor([1, 1]), torch.tensor(tokens))


def test_qformer_audio_mask_covers_only_real_frames():
    mask = OmniMediaTower._qformer_frame_mask([2, 1], [150, 10], SOURCE_POSITIONS)
    assert mask.shape == (3, SOURCE_POSITIONS)
    assert mask.sum(dim=1).tolist() == [50, 25, 5]  # ceil(150/2) = 75 frames over two chunks; ceil(10/2) = 5


@pytest.mark.parametrize("projector", ["mlp", "qformer"])
def test_gradients_reach_projectors(projector):
    config = omni_config("siglip", projector, 2)
    tower = OmniMediaTower(config)
    tower.vision_encoder.requires_grad_(False)  # frozen encoders, as the trainer sets them by default
    tower.audio_encoder.requires_grad_(False)
    loss = tower.embed_images(torch.randn(1, 3, 40, 40)).square().mean()
    loss = loss + tower.embed_videos(torch.randn(1, 2, 3, 40, 40)).square().mean()
    n = audio_token_count(config, 20000)
    loss = loss + tower.embed_audios(torch.randn(2, N_MELS, 100), [2], [n], audio_frame_counts=[125]).square().mean()
    loss.backward()
    for name, module in (("image", tower.image_projector), ("audio", tower.audio_projector)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), f"{name} projector has parameters without gradient"
        assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in tower.vision_encoder.parameters())


def test_tower_configuration_errors():
    with pytest.raises(ValueError, match="vision_drop_cls"):
        OmniMediaTower(omni_config("clip", vision_drop_cls=False))
    siglip_keeps_nothing = OmniMediaTower(omni_config("siglip", vision_drop_cls=False, audio_config=None))
    assert siglip_keeps_nothing.audio_encoder is None and siglip_keeps_nothing.audio_projector is None
    with pytest.raises(ValueError, match="no audio encoder"):
        siglip_keeps_nothing.embed_audios(torch.randn(1, N_MELS, 100), [1], [1])
    with pytest.raises(ValueError, match="no audio_config"):
        audio_token_count(omni_config(audio_config=None), 16000)
    with pytest.raises(ValueError, match="at least one frame"):
        video_token_count(omni_config(), 0)
