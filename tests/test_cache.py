"""The on-disk feature cache: hits, content keys, identical features, corrupt entries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cimlic.cache import CachedFeatureDataset, compute_features, load_or_compute, weights_digest
from cimlic.data.dataset import MultiLabelDataset, default_transform
from cimlic.data.labels import LabelSet


class Tower(nn.Module):
    """A frozen toy image tower with a global and a local output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        local = self.conv(x).flatten(2).transpose(1, 2)  # (B, T, 8)
        return {"global": local.mean(1), "local": local}


@pytest.fixture()
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    labels = LabelSet([str(i) for i in range(10)], rng.integers(0, 2, (10, 3)), ["a", "b", "c"])
    return MultiLabelDataset(labels, tmp_path, "{id}.png", default_transform(16))


def test_cache_hit_and_identical_features(dataset, tmp_path):
    tower = Tower().requires_grad_(False)
    cache = tmp_path / "cache"
    first = load_or_compute(tower, tower, dataset, cache, batch_size=4)
    calls = tower.calls
    second = load_or_compute(tower, tower, dataset, cache, batch_size=4)
    assert tower.calls == calls  # read back, not recomputed
    direct = compute_features(tower, dataset, batch_size=3)
    for name in ("global", "local"):
        assert torch.equal(first[name], second[name]) and torch.equal(first[name], direct[name])
    assert first["local"].shape == (10, 16, 8)
    ds = CachedFeatureDataset(first, dataset.targets)
    item = ds[3]
    assert torch.equal(item["feat_global"], direct["global"][3]) and item["index"] == 3
    assert torch.equal(item["target"], dataset.targets[3])
    assert len(list(cache.glob("*.safetensors"))) == 1 and not list(cache.glob("*.tmp"))


def test_cache_key_follows_content(dataset, tmp_path):
    tower = Tower().requires_grad_(False)
    cache = tmp_path / "cache"
    load_or_compute(tower, tower, dataset, cache)
    digest = weights_digest(tower)
    with torch.no_grad():
        tower.conv.bias.add_(1.0)  # new weights: a new entry, not a stale hit
    assert weights_digest(tower) != digest
    changed = load_or_compute(tower, tower, dataset, cache)
    assert torch.allclose(changed["global"], compute_features(tower, dataset)["global"])
    dataset.transform = default_transform(20)  # a new transform: a new entry
    load_or_compute(tower, tower, dataset, cache)
    assert len(list(cache.glob("*.safetensors"))) == 3


def test_corrupt_entry_is_recomputed(dataset, tmp_path):
    tower = Tower().requires_grad_(False)
    cache = tmp_path / "cache"
    good = load_or_compute(tower, tower, dataset, cache)
    (entry,) = cache.glob("*.safetensors")
    entry.write_bytes(b"garbage")
    again = load_or_compute(tower, tower, dataset, cache)
    assert torch.equal(again["global"], good["global"])


def test_entry_without_required_features_is_recomputed(dataset, tmp_path):
    tower = Tower().requires_grad_(False)
    cache = tmp_path / "cache"
    load_or_compute(lambda x: {"global": tower(x)["global"]}, tower, dataset, cache)  # global only
    full = load_or_compute(tower, tower, dataset, cache, required=("global", "local"))
    assert set(full) == {"global", "local"}
    assert set(load_or_compute(tower, tower, dataset, cache)) == {"global", "local"}  # the richer entry is kept


def test_cached_dataset_row_mismatch():
    with pytest.raises(ValueError, match="has 3 rows for 2 images"):
        CachedFeatureDataset({"global": torch.zeros(3, 4)}, torch.zeros(2, 5))


def test_features_keep_the_towers_dtype(dataset, tmp_path):
    """A float16 tower's features are stored as float16 (half the bytes) and read back bit for bit."""
    from safetensors import safe_open

    tower = Tower().half().requires_grad_(False)

    def fn(x):
        return tower(x.half())

    feats = load_or_compute(fn, tower, dataset, tmp_path / "cache", batch_size=4)
    assert {v.dtype for v in feats.values()} == {torch.float16}
    (entry,) = (tmp_path / "cache").glob("*.safetensors")
    with safe_open(str(entry), "pt") as f:
        assert f.get_slice("local").get_dtype() == "F16"
    again = load_or_compute(fn, tower, dataset, tmp_path / "cache", batch_size=4)
    direct = compute_features(fn, dataset, batch_size=3)
    assert all(torch.equal(again[k], feats[k]) and torch.equal(direct[k], feats[k]) for k in feats)
    full = load_or_compute(Tower().requires_grad_(False), Tower(), dataset, tmp_path / "cache", batch_size=4)
    assert full["local"].dtype == torch.float32  # another tower (dtype is in its weights' digest): its own entry


def test_a_cache_hit_is_memory_mapped(tmp_path):
    """Reading a 30 MiB entry back and touching every row does not copy it into the process's own memory."""
    from cimlic.apps.bench import PeakMemory

    rng = np.random.default_rng(0)
    for i in range(100):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    labels = LabelSet([str(i) for i in range(100)], rng.integers(0, 2, (100, 2)), ["a", "b"])
    dataset = MultiLabelDataset(labels, tmp_path, "{id}.png", default_transform(8))
    key = nn.Linear(1, 1)

    def fn(x):
        return {"global": x.flatten(1).repeat(1, 410)}  # (B, 78720): 0.3 MiB per image

    first = load_or_compute(fn, key, dataset, tmp_path / "cache", batch_size=50)
    size = first["global"].numel() * 4 / 2**20
    del first
    with PeakMemory() as peak:
        feats = load_or_compute(fn, key, dataset, tmp_path / "cache", batch_size=50)
        total = sum(float(feats["global"][i].sum()) for i in range(len(dataset)))
    assert size > 25 and total != 0
    assert peak.anon < 0.25 * size, (peak.anon, size)
