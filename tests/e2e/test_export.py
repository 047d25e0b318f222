"""`omni export` end to end: a real EP=2 + LoRA training checkpoint -> a HF folder that a
fresh Python process, with this project NOT importable and HF_HUB_OFFLINE=1, loads through transformers' Auto
classes (`trust_remote_code=True`) and that reproduces the checkpoint's logits on a text+image+video+audio batch.

The checkpoint comes from `omni train` itself: one `mixed_lora` stage (LoRA on attention, routed and shared experts,
plus routers and projectors) for 3 steps on 2 processes with expert parallelism 2, on a tiny synthetic dataset.
The fresh process: `python -I -S` (no PYTHON* variables, no user site, no .pth processing -- so the editable
install of this project never hooks in), the venv's site-packages appended by hand, cwd outside the repository,
a private HF_HOME; it checks that `import omni_moe` / `import omni` fail before loading anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from tests.launching import launcher_env, run_in_session

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGE = "mixed_lora"
STEPS = 3
SHARD = "150KB"  # the tiny model is ~1.8 MB: forces several shards and the index
TIMEOUT_S = 240

# This test's own recipe (the shipped ones change with the product): a tiny omni MoE with CLIP + Whisper encoders,
# 10 routed experts (5 per EP rank), one mixed_lora stage; the paths are set by the `run` fixture.
RECIPE = {
    "run": {"output_dir": "out", "seed": 0, "nproc_per_node": 2},
    "model": {"tokenizer": {"bpe_from": "synth/train.jsonl", "vocab_size": 384}, "config": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_intra_experts": 2, "num_inter_experts": 2, "num_shared_experts": 1,
        "num_null_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        "audio_config": {"model_type": "whisper", "num_mel_bins": 80, "d_model": 32, "encoder_layers": 2,
                         "encoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_layers": 1,
                         "decoder_attention_heads": 4, "decoder_ffn_dim": 64, "max_source_positions": 50,
                         "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0, "decoder_start_token_id": 0}}},
    "data": {"sources": {"synth": "synth/shards"}, "batching": {"strategy": "mixed", "batch_size": 4},
             "samples_per_epoch": 8, "max_length": 256, "num_workers": 0, "seed": 0},
    "parallel": {"ep_size": 2, "zero_stage": 1, "precision": "fp32"},
    "train": {"save_every": 2, "keep_last": 2, "log_every": 1, "tensorboard": False},
    "stages": [{"name": STAGE, "preset": {"name": "mixed_lora", "r": 4, "alpha": 8}, "steps": STEPS,
                "data": [{"source": "synth", "weight": 1.0}], "optimizer": {"lr": 1.0e-2, "warmup_steps": 1}}],
}

# The fresh process. argv: site-packages, merged folder, adapter folder, media folder, output folder.
FRESH_PROCESS = r"""
import importlib.util, json, sys
from pathlib import Path
sys.path.append(sys.argv[1])
probe = {name: importlib.util.find_spec(name) is not None for name in ("omni_moe", "omni", "modeling", "training")}
import numpy as np, torch
from PIL import Image
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoProcessor

merged_dir, adapter_dir, media, out = (Path(p) for p in sys.argv[2:6])
processor = AutoProcessor.from_pretrained(str(merged_dir), trust_remote_code=True)
conversations = json.loads((media / "conversations.json").read_text())
image = Image.open(media / "image.png").convert("RGB")
video = [Image.open(p).convert("RGB") for p in sorted(media.glob("frame_*.png"))]
audio = np.load(media / "audio.npy")
batch = processor(conversations, images=[image], videos=[video], audios=[audio])

def logits(model):
    with torch.no_grad():
        return model.eval()(**batch).logits.contiguous()

merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), trust_remote_code=True, dtype=torch.float32)
base = AutoModelForCausalLM.from_pretrained(str(adapter_dir), trust_remote_code=True, dtype=torch.float32)
tensors = {"merged": logits(merged), "base": logits(base)}
tensors["adapter"] = logits(PeftModel.from_pretrained(base, str(adapter_dir / "adapter")))
tensors.update({f"batch.{k}": v.contiguous() for k, v in batch.items() if isinstance(v, torch.Tensor)})
save_file(tensors, str(out / "fresh.safetensors"))
(out / "fresh.json").write_text(json.dumps({
    "importable": probe, "model_module": type(merged).__module__, "processor_module": type(processor).__module__,
    "sys_path": sys.path}))
"""


def _env(**extra: str) -> dict[str, str]:
    return launcher_env(**extra)


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_in_session(command, timeout_s=TIMEOUT_S, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """OUTPUT of `omni train`: one mixed_lora stage, EP=2 on 2 processes, checkpoints at steps 2 and 3."""
    from omni_moe.data.quality import DropPolicy
    from omni_moe.data.shards import build_shards
    from omni_moe.data.synth import generate

    root = tmp_path_factory.mktemp("export_run")
    manifest = generate(root / "synth", seed=0, splits={"train": 22})["train"]
    build_shards(manifest, root / "synth", root / "synth" / "shards", max_samples_per_shard=11,
                 policy=DropPolicy(strict=True), progress=False)
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    _run([sys.executable, "-m", "omni.cli", "train", "recipe.yaml"], cwd=root, env=_env())
    return root / "out"


@pytest.fixture(scope="module")
def checkpoint(run) -> Path:
    return run / STAGE / "checkpoints" / f"step-{STEPS:06d}"


@pytest.fixture(scope="module")
def exports(run, checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The merged export through the CLI (a subprocess, from the stage folder: its latest checkpoint) and the
    adapter export through the API (from the checkpoint folder)."""
    from omni.export import export_model

    root = tmp_path_factory.mktemp("exports")
    _run([sys.executable, "-m", "omni.cli", "export", str(run / STAGE), str(root / "merged"), "--merge-lora",
          "--max-shard-size", SHARD], cwd=root, env=_env())
    result = export_model(checkpoint, root / "adapter", max_shard_size=SHARD)
    assert result.adapter and result.step == STEPS
    return {"merged": root / "merged", "adapter": root / "adapter"}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """One conversation per modality: text only, an image, a video, an audio clip (the synthetic set's renderers)."""
    from omni_moe.data.synth import plan_sample, render_image, render_video, synth_digit_audio

    folder = tmp_path_factory.mktemp("media")
    tasks = ["text_copy", "image_colour", "video_direction", "audio_transcribe"]
    plans = {t: plan_sample(1, "test", i, [t], 32) for i, t in enumerate(tasks)}
    render_image(plans["image_colour"].render, 32).save(folder / "image.png")
    for i, frame in enumerate(render_video(plans["video_direction"].render, 32)):
        frame.save(folder / f"frame_{i:02d}.png")
    audio = synth_digit_audio(plans["audio_transcribe"].render).astype(np.float32) / 32768.0
    np.save(folder / "audio.npy", audio)
    media_part = {"text_copy": None, "image_colour": "image", "video_direction": "video", "audio_transcribe": "audio"}
    conversations = [[{"role": "user", "content": ([{"type": media_part[t]}] if media_part[t] else [])
                       + [{"type": "text", "text": plans[t].question}]},
                      {"role": "assistant", "content": plans[t].answer}] for t in tasks]
    (folder / "conversations.json").write_text(json.dumps(conversations))
    return folder


@pytest.fixture(scope="module")
def fresh(exports, media, tmp_path_factory) -> dict:
    """Run FRESH_PROCESS in isolation; returns its tensors and report."""
    where = tmp_path_factory.mktemp("fresh")
    site_packages = sysconfig.get_paths()["purelib"]
    assert not Path(site_packages).resolve().is_relative_to(REPO_ROOT / "omni")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(where), "HF_HOME": str(where / "hf_home"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    _run([sys.executable, "-I", "-S", "-c", FRESH_PROCESS, site_packages, str(exports["merged"]),
          str(exports["adapter"]), str(media), str(where)], cwd=where, env=env)
    return {"tensors": load_file(str(where / "fresh.safetensors")),
            "report": json.loads((where / "fresh.json").read_text())}


def _checkpoint_logits(checkpoint: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from omni.loading import load_model_and_processor

    model, _ = load_model_and_processor(checkpoint)
    with torch.no_grad():
        return model(**batch).logits


def _batch(fresh: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("batch."): v for k, v in fresh["tensors"].items() if k.startswith("batch.")}


def test_fresh_isolated_process_reproduces_the_checkpoint_logits(fresh, checkpoint, media):
    """The key test: the exported folder, loaded by AutoModelForCausalLM/AutoProcessor in a process that cannot
    import this project, gives the training checkpoint's logits (<= 1e-5, fp32) on a text+image+video+audio batch;
    and AutoProcessor builds the same batch our processor builds for the checkpoint."""
    from PIL import Image

    from omni.loading import checkpoint_processor, read_checkpoint_spec

    report = fresh["report"]
    assert report["importable"] == {"omni_moe": False, "omni": False, "modeling": False, "training": False}, report
    assert not any(str(REPO_ROOT) == p or p in ("", ".") for p in report["sys_path"]), report["sys_path"]
    assert report["model_module"].startswith("transformers_modules."), report  # the folder's own code ran
    assert report["processor_module"].startswith("transformers_modules."), report
    batch = _batch(fresh)
    assert {"pixel_values", "pixel_values_videos", "audio_features"} <= set(batch), sorted(batch)
    modalities = set(batch["modality_ids"].unique().tolist())
    assert modalities == {0, 1, 2, 3}, modalities  # text, image, video and audio tokens in the one batch

    processor = checkpoint_processor(read_checkpoint_spec(checkpoint))
    ours = processor(json.loads((media / "conversations.json").read_text()),
                     images=[Image.open(media / "image.png").convert("RGB")],
                     videos=[[Image.open(p).convert("RGB") for p in sorted(media.glob("frame_*.png"))]],
                     audios=[np.load(media / "audio.npy")])
    for key, value in batch.items():
        assert torch.equal(ours[key], value), key

    expected = _checkpoint_logits(checkpoint, batch)
    got = fresh["tensors"]["merged"]
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-5


def test_adapter_export_loads_with_peft_and_equals_the_merged_logits(fresh, checkpoint):
    """Without --merge-lora: base weights + adapter/ loaded with peft in the fresh process == merged logits; the base
    alone differs (the LoRA delta is real, so the comparison means something)."""
    tensors = fresh["tensors"]
    expected = _checkpoint_logits(checkpoint, _batch(fresh))
    assert (tensors["adapter"] - expected).abs().max().item() <= 1e-5
    assert (tensors["adapter"] - tensors["merged"]).abs().max().item() <= 1e-5
    assert (tensors["base"] - tensors["merged"]).abs().max().item() > 1e-4


def test_checkpoint_weights_equal_the_runs_own_gathered_export(run, checkpoint):
    """loading.py (experts read by global id from each EP rank's file, expert LoRA factors reassembled, LoRA
    merged) == the model `omni train` exported with its own code path (experts all-gathered over the EP group,
    PEFT merge), bit for bit; and the unmerged PeftModel carries the per-expert LoRA factors of all 10 experts."""
    from omni.loading import load_model_and_processor

    model, _ = load_model_and_processor(checkpoint)
    reference = load_file(str(run / STAGE / "model" / "model.safetensors"))
    state = model.state_dict()
    assert state.keys() == reference.keys()
    unequal = [k for k in state if not torch.equal(state[k], reference[k])]
    assert not unequal, unequal[:5]
    peft_model, _ = load_model_and_processor(checkpoint, merge_lora=False)
    factors = {k: v for k, v in peft_model.state_dict().items() if "experts.lora_A" in k}
    assert factors and all(v.shape[0] == 4 * 10 for v in factors.values()), {k: v.shape for k, v in factors.items()}


def test_shard_index_is_valid_with_several_shards(exports):
    for folder in exports.values():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1, shards
        assert sorted(p.name for p in folder.glob("model-*.safetensors")) == shards
        seen, total = {}, 0
        for shard in shards:
            with safe_open(str(folder / shard), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    seen[key] = shard
                    tensor = handle.get_tensor(key)
                    total += tensor.numel() * tensor.element_size()
        assert seen == index["weight_map"]
        assert index["metadata"]["total_size"] == total
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_omni.OmniMoeForCausalLM"
        for name in ("modeling_omni.py", "configuration_omni.py", "processing_omni.py", "moe.py",
                     "generation_config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
            assert (folder / name).is_file(), (folder, name)
    adapter = exports["adapter"] / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


def test_model_card_of_the_export(exports):
    from omni.model_card import parse_front_matter

    text = (exports["adapter"] / "README.md").read_text()
    matter = parse_front_matter(text)
    assert matter["library_name"] == "transformers" and matter["pipeline_tag"] == "any-to-any"
    assert {"license", "tags"} <= set(matter) and "lora" in matter["tags"]
    assert "| image | 2-3 | 8-9 | 10 |" in text  # expert layout: image pool -> global ids
    assert f"| {STAGE} | lora, routers, image_projector, audio_projector | {STEPS} | {STEPS} (done) | synth 100% |" in text
    assert "lora" not in parse_front_matter((exports["merged"] / "README.md").read_text())["tags"]


def test_stage_and_run_folders_resolve_to_the_latest_checkpoint(run, checkpoint):
    from omni.loading import resolve_checkpoint

    assert resolve_checkpoint(run) == checkpoint
    assert resolve_checkpoint(run / STAGE) == checkpoint
    assert resolve_checkpoint(run / STAGE / "checkpoints") == checkpoint
    with pytest.raises(ValueError, match="not an exported model folder"):
        resolve_checkpoint(run / "tokenizer")


def test_flipped_byte_in_an_expert_file_is_a_named_integrity_error(checkpoint, tmp_path):
    from omni.loading import load_model_and_processor
    from omni_moe.training.checkpoint_store import CheckpointIntegrityError

    copy = tmp_path / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    target = copy / "rank-00001" / "experts.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match="rank-00001/experts.safetensors"):
        load_model_and_processor(copy)


@pytest.mark.parametrize("ep_size", [1, 2, 5])
def test_expert_lora_factors_reassemble_by_global_id_at_any_ep_size(ep_size):
    """The LoRA factors PEFT puts inside fused experts are saved whole per EP rank; loading.py reassembles them for
    all experts. Oracle: PEFT's own per-expert delta (ParamWrapper.get_delta_weight) of the reassembled adapter
    equals, for every global id, the delta of the EP rank's adapter that held that expert."""
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import ParamWrapper
    from torch import nn

    from omni_moe.modeling.moe import GroupedExperts
    from omni.loading import _place_lora_factor
    from omni_moe.training.expert_parallel import global_expert_ids

    num_experts = 10
    config = LoraConfig(r=3, lora_alpha=6, target_parameters=["experts.gate_up_proj", "experts.down_proj"])

    class Holder(nn.Module):
        def __init__(self, count: int):
            super().__init__()
            self.experts = GroupedExperts(count, hidden_size=8, intermediate_size=6)

    def adapted(count: int, seed: int):
        torch.manual_seed(seed)
        model = get_peft_model(Holder(count), copy.deepcopy(config))
        for name, param in model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(param)
        return model

    def deltas(model) -> dict[str, torch.Tensor]:
        return {name: module.get_delta_weight("default").detach() for name, module in model.named_modules()
                if isinstance(module, ParamWrapper)}

    full = adapted(num_experts, seed=0)
    shards = [adapted(num_experts // ep_size, seed=1 + k) for k in range(ep_size)]
    state = full.state_dict()  # shares storage with the parameters: filling it fills the model
    lora_keys = [key for key in state if ".lora_A." in key or ".lora_B." in key]
    assert len(lora_keys) == 4
    with torch.no_grad():
        for key in lora_keys:
            for ep_rank, shard in enumerate(shards):
                _place_lora_factor(key, state[key], shard.state_dict()[key],
                                   global_expert_ids(num_experts, ep_rank, ep_size))
    reassembled = deltas(full)
    assert len(reassembled) == 2
    for ep_rank, shard in enumerate(shards):
        ids = global_expert_ids(num_experts, ep_rank, ep_size)
        for name, delta in deltas(shard).items():
            torch.testing.assert_close(reassembled[name][ids], delta)
