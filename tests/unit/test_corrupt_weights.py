"""A weights file that does not decode is an error naming the file and the reason, on every read of a checkpoint or
a model folder (the checkpoint manifest's checksums, training/checkpoint_store.py, cannot catch it when the manifest was
re-sealed to match)."""

import json

import pytest

from omni.cli import main
from omni.loading import load_model_and_processor
from tests.tiny import save_tiny_omni_folder, tiny_config
from omni_moe.training.checkpoint_store import CheckpointManager
from omni_moe.training.engine_checkpoint import DENSE_FILE, LAYOUT_FILE, MODEL_CONFIG_FILE
from omni_moe.training.weights_files import CorruptFileError

NOT_SAFETENSORS = b"\xff" * 64  # an 8-byte header length far beyond the file: "header too large"


@pytest.fixture
def sealed_corrupt_checkpoint(tmp_path):
    """A committed checkpoint (manifest and COMMITTED written over the bad bytes) whose dense file is not
    safetensors."""
    from omni_moe.training.engine_checkpoint import LAYOUT_FORMAT, LAYOUT_FORMAT_VERSION

    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=None)
    staged = manager.begin(1)
    (staged.path / DENSE_FILE).write_bytes(NOT_SAFETENSORS)
    (staged.path / MODEL_CONFIG_FILE).write_text(tiny_config(media=False).to_json_string(use_diff=False))
    (staged.path / LAYOUT_FILE).write_text(json.dumps({
        "format": LAYOUT_FORMAT, "format_version": LAYOUT_FORMAT_VERSION, "step": 1, "ep_size": 1,
        "dense_file": DENSE_FILE, "expert_files": {}, "ep_bound_keys": [], "model_config_file": MODEL_CONFIG_FILE,
        "lora_config_dir": None}))
    return manager.commit(staged)


def test_checkpoint_with_a_corrupt_dense_file_names_it(sealed_corrupt_checkpoint, tmp_path, capsys):
    with pytest.raises(CorruptFileError, match=rf"{DENSE_FILE}: not a readable safetensors file \(.*header"):
        load_model_and_processor(sealed_corrupt_checkpoint)
    for command in (["export", str(sealed_corrupt_checkpoint), str(tmp_path / "out")],
                    ["chat", str(sealed_corrupt_checkpoint), "-p", "hi"]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert f"{sealed_corrupt_checkpoint / DENSE_FILE}: not a readable safetensors file" in err, err
        assert "Traceback" not in err


def test_model_folder_with_a_corrupt_shard_names_it(tmp_path, capsys):
    folder = save_tiny_omni_folder(tmp_path / "model")
    (folder / "model.safetensors").write_bytes(NOT_SAFETENSORS)
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model_and_processor(folder)
    assert main(["chat", str(folder), "-p", "hi"]) == 1
    assert f"{folder / 'model.safetensors'}: not a readable safetensors file" in capsys.readouterr().err
