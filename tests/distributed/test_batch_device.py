"""Every batch reaches the engine on the engine's device, media in the compute dtype (training/loop.py to_device).

A real single-rank bf16 stage (DeepSpeed, the loop recipe's model, a real shard loader) with a stage-kind forward
that checks each micro-batch before calling the model: on this CPU machine the device check is the engine's own
device (cpu), the dtype check is the one an unmoved batch fails (the collator makes fp32 pixels and audio features).
The meta device stands in for an accelerator in the unit check of `to_device` itself: a tensor left behind would
stay on cpu.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.launching import small_synth_shards

TARGET = "tests.distributed.test_batch_device"


def test_to_device_moves_every_tensor_and_casts_only_floating_ones():
    from omni_moe.training.loop import to_device

    inputs = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
              "position_ids": torch.zeros(3, 2, 5, dtype=torch.long), "modality_ids": torch.zeros(2, 5, dtype=torch.long),
              "labels": torch.full((2, 5), -100), "pixel_values": torch.rand(1, 3, 8, 8),
              "pixel_values_videos": torch.rand(1, 2, 3, 8, 8), "audio_features": torch.rand(1, 8, 30),
              "audio_chunk_counts": torch.ones(1, dtype=torch.long), "rope_deltas": torch.zeros(2, 1, dtype=torch.long)}
    moved = to_device(inputs, torch.device("meta"), torch.bfloat16)
    assert set(moved) == set(inputs)
    for name, tensor in moved.items():
        assert tensor.device.type == "meta", name
        expected = torch.bfloat16 if inputs[name].is_floating_point() else inputs[name].dtype
        assert tensor.dtype == expected and tensor.shape == inputs[name].shape, name


def worker_check_every_batch(rank: int, world: int, args: dict) -> dict:
    from omni_moe.training.loop import model_loss
    from omni_moe.training.pipeline import build_stage, train_built_stage
    from omni_moe.training.recipe import load_recipe

    recipe = load_recipe("tests/distributed/loop_recipe.yaml", [
        f"run.output_dir={args['root']}/run", f"model.tokenizer.bpe_from={args['manifest']}",
        f"data.sources.synth={args['shards']}", "data.samples_per_epoch=16", "parallel.ep_size=1",
        "parallel.precision=bf16", "train.tensorboard=false",
        "stages=[{name: experts, preset: modality_experts, steps: 2, optimizer: {lr: 1.0e-2, warmup_steps: 0}}]"])
    seen: dict[str, str] = {}

    def checking_forward(engine, inputs):
        for name, tensor in inputs.items():
            assert tensor.device == torch.device(engine.device), f"{name} on {tensor.device}, engine {engine.device}"
            if tensor.is_floating_point():
                assert tensor.dtype == torch.bfloat16, f"{name} is {tensor.dtype} in a bf16 run"
            seen[name] = str(tensor.dtype)
        return model_loss(engine, inputs)

    built = build_stage(recipe, 0)
    built.kind = dataclasses.replace(built.kind, forward=checking_forward)
    result = train_built_stage(recipe, 0, built)
    return {"steps": result.state.step, "seen": seen}


@pytest.mark.timeout(300)
def test_a_bf16_stage_gets_every_batch_on_the_engine_device_with_bf16_media(spawn, tmp_path):
    data = small_synth_shards(tmp_path / "synth")
    (result,) = spawn(f"{TARGET}:worker_check_every_batch", 1, {"root": str(tmp_path), **data}, timeout_s=240,
                      init="deepspeed")
    assert result["steps"] == 2
    media = {k for k in result["seen"] if k in ("pixel_values", "pixel_values_videos", "audio_features")}
    assert media, f"no media tensor reached the forward: {result['seen']}"  # the dtype check ran on real media
    assert result["seen"]["input_ids"] == "torch.int64" and result["seen"]["position_ids"] == "torch.int64"
