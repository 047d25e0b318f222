"""The checkpoint protocol on one process (and on two ranks as threads with a real barrier): commit, find, verify,
retention, crash leftovers, secrets, RNG round trip, and no unpickling anywhere on the load path."""

from __future__ import annotations

import logging
import os
import pickle
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_moe.training.checkpoint_files import load_tensors, safe_torch_load, save_tensors
from omni_moe.training.checkpoint_store import (
    COMMITTED,
    MANIFEST,
    CheckpointCommitError,
    CheckpointIntegrityError,
    CheckpointManager,
)
from omni_moe.training.rng import capture_rng_state, load_rng_state, restore_rng_state, save_rng_state
from omni_moe.training.secret_scrub import scrub_secrets
from omni_moe.training.training_state import TrainingState

CANARY = "hf_CANARYcanary0123456789abcdefXYZ"


def write_step(manager: CheckpointManager, step: int, metadata: dict | None = None) -> Path:
    """One checkpoint as the loop would write it: shared weights + training state (rank 0), per-rank RNG."""
    ckpt = manager.begin(step)
    if manager.rank == 0:
        save_tensors(ckpt.path / "model.safetensors", {"w": torch.full((4, 3), float(step)), "b": torch.arange(3.0)})
        TrainingState(step=step, samples_seen=8 * step).save(ckpt.path / "training_state.json")
    save_rng_state(ckpt.rank_dir / "rng.safetensors")
    return manager.commit(ckpt, metadata=metadata or {"lr": 1e-3})


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    index = len(data) // 2 if offset is None else offset
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


def test_commit_then_latest_valid_finds_it(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    assert manager.latest_valid() is None
    first = write_step(manager, 2)
    second = write_step(manager, 4, metadata={"lr": 5e-4, "stage": "pretrain"})
    assert first.name == "step-000002" and second.name == "step-000004"
    assert manager.latest_valid() == second
    manifest = manager.verify(second)
    assert sorted(manifest["files"]) == ["metadata.json", "model.safetensors", "rank-00000/rng.safetensors",
                                         "training_state.json"]
    assert CheckpointManager.read_metadata(second)["user"] == {"lr": 5e-4, "stage": "pretrain"}
    assert torch.equal(load_tensors(second / "model.safetensors")["w"], torch.full((4, 3), 4.0))
    assert TrainingState.load(second / "training_state.json").samples_seen == 32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging/temp leftovers after commit"


def test_keep_last_k_retention(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 6):
        write_step(manager, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000005"]
    assert manager.latest_valid().name == "step-000005"


def test_pruning_never_removes_the_newest_valid_checkpoint(tmp_path):
    """A resumed run re-saving an OLDER step (after newer ones turned out corrupt) keeps the newest good one."""
    manager = CheckpointManager(tmp_path, keep_last=1)
    write_step(manager, 6)
    manager.keep_last = None
    write_step(manager, 8)
    (tmp_path / "step-000008" / "model.safetensors").write_bytes(b"truncated")  # corrupt, size differs
    manager.keep_last = 1
    write_step(manager, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000006", "step-000008"]
    assert manager.latest_valid().name == "step-000006"


def test_folder_without_committed_marker_is_ignored(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=3)
    good = write_step(manager, 2)
    newest = write_step(manager, 4)
    (newest / COMMITTED).unlink()
    with caplog.at_level(logging.WARNING, logger="omni_moe.training.checkpoint_store"):
        assert manager.latest_valid() == good
    assert "step-000004" in caplog.text and COMMITTED in caplog.text
    assert [step for step, _ in manager.committed_steps()] == [2]


def test_flipped_byte_in_any_file_is_a_named_integrity_error_and_falls_back(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    good = write_step(manager, 2)
    newest = write_step(manager, 4)
    files = sorted(p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file())
    assert {MANIFEST, COMMITTED, "model.safetensors", "rank-00000/rng.safetensors"} <= set(files)
    for rel in files:
        original = (newest / rel).read_bytes()
        for offset in (0, len(original) // 2, len(original) - 1):
            flip_byte(newest / rel, offset)
            with pytest.raises(CheckpointIntegrityError) as excinfo:
                manager.verify(newest)
            assert excinfo.value.file in (rel, MANIFEST, COMMITTED) and excinfo.value.path == newest
            if rel not in (MANIFEST, COMMITTED):
                assert excinfo.value.file == rel and "checksum mismatch" in str(excinfo.value)
            assert manager.latest_valid() == good
            (newest / rel).write_bytes(original)
        manager.verify(newest)  # restored bytes verify again: the check is on content, not on mtime


def test_missing_or_truncated_file_is_caught_even_by_the_cheap_check(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    good = write_step(manager, 2)
    newest = write_step(manager, 4)
    weights = newest / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-10])
    with pytest.raises(CheckpointIntegrityError, match="model.safetensors: size mismatch"):
        manager.verify(newest, mode="sizes")
    weights.unlink()
    for mode in ("sizes", "full"):
        with pytest.raises(CheckpointIntegrityError) as excinfo:
            manager.verify(newest, mode=mode)
        assert excinfo.value.file == "model.safetensors" and excinfo.value.reason == "missing"
        assert manager.latest_valid(verify=mode) == good
    weights.write_bytes(original)
    flip_byte(weights)
    manager.verify(newest, mode="sizes")  # documented limit of the cheap mode: same size, different bytes
    assert manager.latest_valid(verify="full") == good


def test_stale_leftovers_of_a_crash_are_cleaned_by_the_next_begin(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    good = write_step(manager, 2)
    stale = [tmp_path / ".staging-step-000004", tmp_path / "step-000006", tmp_path / ".deleting-step-000001-ab"]
    for folder in stale:
        (folder / "rank-00000").mkdir(parents=True)
        (folder / "rank-00000" / "half.bin").write_bytes(b"x" * 10)
    assert manager.latest_valid() == good  # step-000006 has no COMMITTED
    ckpt = manager.begin(8)
    assert not any(folder.exists() for folder in stale)
    assert ckpt.path.is_dir() and good.is_dir()
    (ckpt.path / "weights.safetensors").write_bytes(b"")
    manager.commit(ckpt)
    assert manager.latest_valid().name == "step-000008"


def test_resaving_a_step_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    write_step(manager, 2)
    write_step(manager, 4)
    path = write_step(manager, 4, metadata={"attempt": 2})
    assert CheckpointManager.read_metadata(path)["user"] == {"attempt": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000004"]


def test_hf_token_canary_never_reaches_any_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv("WANDB_API_KEY", "wandb-" + CANARY[::-1])
    manager = CheckpointManager(tmp_path, keep_last=3)
    config = {
        "hub": {"token": "some-literal-token-not-from-env", "repo": "me/model"},
        "remote": f"https://user:{CANARY}@example.com/repo.git",
        "argv": ["--hub_token", CANARY, "--wandb", "wandb-" + CANARY[::-1]],
        "tokenizer": {"pad_token": "<|pad|>", "pad_token_id": 0, "max_tokens": 2048},
    }
    ckpt = manager.begin(3)
    TrainingState(step=3, data_state={"note": CANARY}, extra={"config": config}).save(ckpt.path / "state.json")
    save_tensors(ckpt.path / "model.safetensors", {"w": torch.ones(2)}, metadata={"origin": f"token={CANARY}"})
    path = manager.commit(ckpt, metadata={"config": config, CANARY: "as a key"})
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and (CANARY.encode() in p.read_bytes()
                                                                   or CANARY[::-1].encode() in p.read_bytes())]
    assert not leaked, f"canary secret written to {leaked}"
    user = CheckpointManager.read_metadata(path)["user"]
    assert user["config"]["remote"] == "https://user:<redacted:HF_TOKEN>@example.com/repo.git"
    assert user["config"]["hub"]["token"] == "<redacted>"
    assert user["config"]["argv"][3] == "<redacted:WANDB_API_KEY>"
    assert user["config"]["tokenizer"] == config["tokenizer"], "innocent *_token keys must survive scrubbing"
    assert "<redacted:HF_TOKEN>" in user


def test_scrub_secrets_ignores_short_and_non_secret_env_values():
    env = {"HF_TOKEN": CANARY, "MY_KEY": "1", "TOKENIZERS_PARALLELISM": "falsefalse", "HOME": "/home/someone"}
    scrubbed = scrub_secrets({"a": ["x1", "falsefalse", "/home/someone", (CANARY,)]}, environ=env)
    assert scrubbed == {"a": ["x1", "falsefalse", "/home/someone", ("<redacted:HF_TOKEN>",)]}


def test_rng_round_trip_python_numpy_torch(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state: must round-trip too

    def draw():
        return ([random.random() for _ in range(5)] + [random.gauss(0, 1)], np.random.rand(5).tolist()
                + [float(np.random.randn())], torch.rand(5), torch.randn(3))

    state = capture_rng_state()
    save_rng_state(tmp_path / "rng.safetensors")
    expected = draw()
    restore_rng_state(state)
    again = draw()
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2]) and torch.equal(again[3], expected[3])
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # scramble, then load from disk
    load_rng_state(tmp_path / "rng.safetensors")
    from_disk = draw()
    assert from_disk[:2] == expected[:2] and torch.equal(from_disk[2], expected[2])
    assert from_disk[0] != draw()[0]  # the draws really move the generators


class _PlantMarkerOnUnpickle:
    """A pickle payload: unpickling it calls Path.touch(marker) -- what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note about the raw pickle's protocol
def test_pickle_posing_as_a_checkpoint_file_is_never_unpickled(tmp_path):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps({"w": _PlantMarkerOnUnpickle(marker)})
    manager = CheckpointManager(tmp_path / "ckpts", keep_last=3)
    ckpt = manager.begin(1)
    for name in ("model.safetensors", "optimizer.pt", "rank-00000/rng.safetensors"):
        (ckpt.path / name).parent.mkdir(exist_ok=True)
        (ckpt.path / name).write_bytes(payload)
    torch.save({"w": _PlantMarkerOnUnpickle(marker)}, ckpt.path / "zip_format.pt")
    path = manager.commit(ckpt)
    assert manager.latest_valid() == path  # verification only hashes bytes
    with pytest.raises(ValueError, match="model.safetensors"):
        load_tensors(path / "model.safetensors")
    with pytest.raises(ValueError, match="rng.safetensors"):
        load_rng_state(path / "rank-00000" / "rng.safetensors")
    for name in ("optimizer.pt", "zip_format.pt"):
        with pytest.raises(ValueError, match=name):
            safe_torch_load(path / name)
    assert not marker.exists(), "a pickle in a checkpoint was executed"
    pickle.loads(payload)  # control: the payload really does plant the marker when unpickled
    assert marker.exists()


def test_tensors_round_trip_with_shared_storage_and_views(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"base": base, "tied": base, "row": base[1], "col": base[:, 2], "t": base.t(), "i": torch.tensor([7])}
    loaded = load_tensors(save_tensors(tmp_path / "t.safetensors", tensors))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    assert tensors["base"].data_ptr() == base.data_ptr(), "inputs are not modified"


def test_training_state_json_round_trip_and_errors():
    scheduler_state = {"base_lrs": [1e-3], "last_epoch": 7, "_step_count": 8, "lr_lambdas": [None]}
    state = TrainingState(step=7, epoch=1, samples_seen=56, tokens_seen=9000, stage="sft", nonfinite_skips=1,
                          data_state={"shard": 3, "offset": 17, "mix": [0.5, 0.5]}, scheduler_state=scheduler_state)
    assert TrainingState.from_json(state.to_json()) == state
    with pytest.raises(TypeError, match=r"data_state\.order.*key 1"):
        TrainingState(data_state={"order": {1: "x"}}).to_json()
    with pytest.raises(TypeError, match=r"extra\.t is a Tensor"):
        TrainingState(extra={"t": torch.ones(1)}).to_json()
    with pytest.raises(ValueError, match="unknown fields.*'bogus'"):
        TrainingState.from_json('{"step": 1, "bogus": 2}')


def _two_ranks(tmp_path: Path, fail_rank: int | None = None) -> list:
    """Both ranks of a 2-rank job as threads sharing a real barrier; returns each rank's result or exception."""
    barrier = threading.Barrier(2, timeout=20)
    results: list = [None, None]

    def rank_main(rank: int) -> None:
        manager = CheckpointManager(tmp_path, keep_last=2, rank=rank, world_size=2, barrier=barrier.wait)
        try:
            ckpt = manager.begin(5)
            save_tensors(ckpt.rank_dir / "experts.safetensors", {"e": torch.full((2,), float(rank))})
            if rank == 0:
                save_tensors(ckpt.path / "dense.safetensors", {"d": torch.ones(3)})
            if rank == fail_rank:
                # a dangling link: this rank cannot read back (hash) one of its files
                os.symlink(ckpt.path / "nowhere", ckpt.rank_dir / "dangling.safetensors")
            results[rank] = manager.commit(ckpt, metadata={"rank_count": 2})
        except Exception as err:  # noqa: BLE001 - the test inspects it
            results[rank] = err

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a rank hung in the commit protocol"
    return results


def test_two_ranks_commit_together(tmp_path):
    results = _two_ranks(tmp_path)
    assert results[0] == results[1] == tmp_path / "step-000005"
    manifest = CheckpointManager(tmp_path).verify(results[0])
    assert {"rank-00000/experts.safetensors", "rank-00001/experts.safetensors", "dense.safetensors"} <= set(
        manifest["files"])
    assert manifest["world_size"] == 2


def test_a_rank_failing_to_hash_aborts_the_commit_on_every_rank_without_hanging(tmp_path):
    results = _two_ranks(tmp_path, fail_rank=1)
    assert all(isinstance(result, CheckpointCommitError) for result in results), results
    assert "rank 1" in str(results[0]) and "dangling.safetensors" in str(results[1])
    assert CheckpointManager(tmp_path).latest_valid() is None
