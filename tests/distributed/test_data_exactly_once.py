"""Exactly-once reading over 2 ranks x 2 real DataLoader worker processes.

Ranks are simulated by building the reader with rank=0/1, world_size=2 (shard assignment needs
no process group); the workers are real processes, so the split over workers is the real one.
"""

import collections

import pytest
from torch.utils.data import DataLoader

from omni_moe.data.loader import ResumableLoader
from omni_moe.data.reader import ShardDataset
from omni_moe.data.shards import build_shards
from omni_moe.data.testing import make_manifest

WORLD, WORKERS = 2, 2


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("once")
    manifest = make_manifest(root / "media", n_text=12, n_image=8, n_audio=6, n_video=6)  # 32 samples
    index = build_shards(manifest, root / "media", root / "shards", max_samples_per_shard=3, progress=False)
    assert len(index["shards"]) == 11  # 11 shards over 4 reader slots: deliberately uneven
    return root / "shards", index["num_samples"]


def rank_loader(shard_dir, rank, **kw):
    dataset = ShardDataset(shard_dir, rank=rank, world_size=WORLD, seed=5, shuffle_buffer=4)
    return ResumableLoader(dataset, batch_size=2, num_workers=WORKERS, **kw)


def test_every_sample_exactly_once_per_epoch_over_ranks_and_workers(shard_dir):
    path, total = shard_dir
    loaders = [rank_loader(path, rank) for rank in range(WORLD)]
    orders = []
    for _ in range(2):  # two epochs
        per_rank = [[s["id"] for batch in loader for s in batch] for loader in loaders]
        seen = collections.Counter(i for ids in per_rank for i in ids)
        assert len(seen) == total and set(seen.values()) == {1}, "a sample was skipped or duplicated"
        assert all(per_rank), "every rank gets data"
        orders.append(per_rank)
    assert orders[0] != orders[1], "the epoch changes the order"
    assert all(loader.epoch == 2 for loader in loaders)


def test_plain_dataloader_over_the_dataset_also_splits_exactly(shard_dir):
    path, total = shard_dir
    ids = []
    for rank in range(WORLD):
        dataset = ShardDataset(path, rank=rank, world_size=WORLD, seed=5)
        dataset.set_epoch(3)
        ids += [s["id"] for s in DataLoader(dataset, batch_size=None, num_workers=WORKERS)]
    assert len(ids) == total == len(set(ids))


def test_resume_mid_epoch_on_both_ranks_stays_exactly_once(shard_dir):
    path, total = shard_dir
    ids = []
    for rank, stop in ((0, 3), (1, 2)):
        first = rank_loader(path, rank)
        for n, batch in enumerate(first, start=1):
            ids += [s["id"] for s in batch]
            if n == stop:
                break
        resumed = rank_loader(path, rank)
        resumed.load_state_dict(first.state_dict())
        ids += [s["id"] for batch in resumed for s in batch]
    assert len(ids) == total == len(set(ids))


def test_fixed_epoch_length_keeps_ranks_in_step(shard_dir):
    path, _ = shard_dir
    counts = [len(list(rank_loader(path, rank, max_batches_per_epoch=4))) for rank in range(WORLD)]
    assert counts == [4, 4]


def test_too_few_shards_for_ranks_x_workers_is_a_clear_error(tmp_path):
    manifest = make_manifest(tmp_path / "media", n_text=3, n_image=0, n_audio=0, n_video=0)
    build_shards(manifest, tmp_path / "media", tmp_path / "shards", max_samples_per_shard=1, progress=False)
    with pytest.raises(ValueError, match=r"3 shard\(s\) cannot feed 2 rank\(s\) x 2 dataloader worker\(s\) = 4"):
        rank_loader(tmp_path / "shards", 0)  # raised when the loader is built, before any worker starts
