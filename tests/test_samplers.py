"""Samplers (METHODS §4): balance on the real VOC-LT labels, determinism, DDP sharding, building, errors."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cimlic.config import SamplerConfig
from cimlic.data.labels import read_classes, read_label_list
from cimlic.data.samplers import ClassAwareSampler, GroupSampler, build_sampler, list_samplers, quantile_groups


@pytest.fixture(scope="module")
def voc_lt(shared_data):
    """(targets (1142, 20) int8, group of each class) of the VOC-LT training set."""
    labels = read_label_list(shared_data / "voc_lt" / "train.txt", read_classes(shared_data / "voc_lt" / "classes.txt"))
    assert labels.targets.shape == (1142, 20)
    return labels.targets, labels.groups()


def _cooccurrence(targets: np.ndarray) -> np.ndarray:
    """(C, C) F[k, c] = fraction of the images containing class k that also contain class c."""
    pos = targets == 1
    return np.stack([pos[pos[:, k]].mean(axis=0) for k in range(pos.shape[1])])


def _contains(targets: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(C,) number of drawn images that contain each class."""
    return (targets[indices] == 1).sum(axis=0)


def _small_targets() -> np.ndarray:
    """6 images, 4 classes; class 2 has only unknown (-1) entries, so no positive image."""
    return np.array(
        [[1, 0, -1, 0], [1, 1, 0, 0], [1, 0, -1, 0], [0, 1, 0, 1], [1, 0, 0, 0], [1, 0, 0, 0]], dtype=np.int8
    )


# ------------------------------------------------------------------------------------ balance on VOC-LT
def test_class_aware_balances_voc_lt(voc_lt):
    targets, _ = voc_lt
    counts = (targets == 1).sum(axis=0)
    assert counts.max() == 775 and counts.min() == 4  # uniform sampling: class frequency ratio 775/4 = 193.75
    uniform = _contains(targets, np.random.default_rng(0).integers(0, len(targets), 3875))
    assert uniform.max() / max(uniform.min(), 1) > 100

    sampler = ClassAwareSampler(targets, per_class=3, seed=0)
    indices, drawn = sampler.draw()
    assert (targets[indices, drawn] == 1).all()  # every image contains the class it was drawn for
    seen = _contains(targets, indices)
    # Each class is visited ceil(3875 / 3) // 20 = 64 or 65 times, 3 images a visit: >= 192 draws contain it.
    assert seen.min() >= 3 * (math.ceil(len(indices) / 3) // 20) == 192
    # What is left of the imbalance is co-occurrence: a draw for class k contains class c with frequency
    # F[k, c], so E[seen_c / n] = mean_k F[k, c]; 'person' is in 77% of the draws, the rarest class in 5%,
    # an expected max/min of 15.25 on these labels (measured 15.2-15.5 over seeds 0-4).
    expected = _cooccurrence(targets).mean(axis=0)
    assert np.allclose(seen / len(indices), expected, rtol=0.1)
    assert expected.max() / expected.min() == pytest.approx(15.25, abs=0.01)
    assert seen.max() / seen.min() < 17


def test_group_sampler_balances_voc_lt(voc_lt):
    targets, groups = voc_lt
    sampler = GroupSampler(targets, num_samples=20_000, seed=0)
    assert sampler.group_names == ["head", "medium", "tail"]
    indices, drawn = sampler.draw()
    assert (targets[indices, drawn] == 1).all()
    # Each group is drawn with probability 1/3: the tail share of 20,000 draws has sd 0.0033 (0.02 = 6 sd).
    tail = np.flatnonzero(groups == "tail")
    assert len(tail) == 8
    assert np.isin(drawn, tail).mean() == pytest.approx(1 / 3, abs=0.02)
    # Expected containment frequency: sum_k P(draw k) F[k, c], with P(draw k) = 1/3 / |group of k|.
    p_class = np.array([1 / 3 / (groups == g).sum() for g in groups])
    expected = p_class @ _cooccurrence(targets)
    seen = _contains(targets, indices)
    assert np.allclose(seen / len(indices), expected, rtol=0.15)  # min expected count ~800: 15% is > 4 sd
    assert expected.max() / expected.min() < 18  # 17.87 on these labels, against 193.75 for uniform sampling
    assert seen.max() / seen.min() < 22
    assert sampler.group_classes[2].tolist() == tail.tolist()


def test_group_sampler_quantile_groups(voc_lt):
    targets, _ = voc_lt
    counts = (targets == 1).sum(axis=0)
    sampler = GroupSampler(targets, num_groups=4, num_samples=8000, seed=3)
    assert [len(g) for g in sampler.group_classes] == [5, 5, 5, 5]
    assert set(sampler.group_classes[0].tolist()) == set(np.argsort(-counts)[:5].tolist())  # the 5 largest
    _, drawn = sampler.draw()
    shares = [np.isin(drawn, g).mean() for g in sampler.group_classes]
    assert np.allclose(shares, 0.25, atol=0.025)  # sd 0.0048 at 8,000 draws


def test_quantile_groups_ranks_counts():
    assert quantile_groups([5, 100, 1, 50, 7, 7], 3).tolist() == [2, 0, 2, 0, 1, 1]
    assert quantile_groups([3, 2], 3).tolist() == [0, 1]  # more groups than classes: the last one is empty
    with pytest.raises(ValueError, match="num_groups"):
        quantile_groups([1, 2], 0)


def test_custom_groups_and_unknown_entries(caplog):
    targets = _small_targets()
    with caplog.at_level(logging.WARNING, logger="cimlic.data.samplers"):
        sampler = GroupSampler(targets, groups=["a", "b", "b", "c"], num_samples=600, seed=1)
    assert "[2]" in caplog.text  # class 2 (only -1 entries) is reported and skipped
    assert sampler.group_names == ["a", "b", "c"]
    indices, drawn = sampler.draw()
    assert 2 not in drawn and (targets[indices, drawn] == 1).all()
    with pytest.raises(ValueError, match="one label per class"):
        GroupSampler(targets, groups=["a", "b"])


def test_class_aware_skips_classes_without_positives(caplog):
    targets = _small_targets()
    with caplog.at_level(logging.WARNING, logger="cimlic.data.samplers"):
        sampler = ClassAwareSampler(targets, per_class=2, num_samples=300, seed=0)
    assert "without any positive" in caplog.text
    indices, drawn = sampler.draw()
    assert 2 not in drawn and (targets[indices, drawn] == 1).all()
    assert np.bincount(drawn, minlength=4).tolist() == [100, 100, 0, 100]
    # Class 3 has one image, class 1 two: its cyclic list is exhausted and reshuffled, each image equally used.
    assert np.bincount(indices[drawn == 1], minlength=6).tolist() == [0, 50, 0, 50, 0, 0]


# ---------------------------------------------------------------------------------- length, determinism
def test_default_lengths(voc_lt):
    targets, _ = voc_lt
    assert len(ClassAwareSampler(targets)) == 775 * 20 // 4 == 3875
    assert len(ClassAwareSampler(targets, num_samples=100)) == 100
    assert len(GroupSampler(targets)) == 1142
    assert len(GroupSampler(targets, num_samples=0)) == 1142  # 0 = default, as in SamplerConfig
    assert len(ClassAwareSampler(_small_targets())) == 5 * 4 // 4


@pytest.mark.parametrize("cls", [ClassAwareSampler, GroupSampler])
def test_deterministic_in_seed_and_epoch(voc_lt, cls):
    targets, _ = voc_lt
    first = list(cls(targets, seed=7))
    np.random.seed(123), torch.manual_seed(123)  # the global RNGs play no part
    again = cls(targets, seed=7)
    assert list(again) == first and list(again) == first  # iterating twice in an epoch repeats it
    again.set_epoch(1)
    epoch1 = list(again)
    assert epoch1 != first
    other = cls(targets, seed=7)
    other.set_epoch(1)
    assert list(other) == epoch1
    assert list(cls(targets, seed=8)) != first


# -------------------------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("cls", [ClassAwareSampler, GroupSampler])
def test_ddp_shards_cover_the_global_sequence(voc_lt, cls):
    targets, _ = voc_lt
    ranks = [cls(targets, num_samples=1001, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    shards = [list(r) for r in ranks]
    assert len(ranks[0]) == len(ranks[1]) == len(shards[0]) == len(shards[1]) == 501  # 1001 padded to 1002
    global_seq, _ = ranks[0].draw()
    assert global_seq.tolist() == ranks[1].draw()[0].tolist()  # every rank generates the same sequence
    merged = np.empty(1002, dtype=np.int64)
    merged[0::2], merged[1::2] = shards  # disjoint positions that together cover it
    assert merged.tolist() == global_seq.tolist()
    single = cls(targets, num_samples=1001, seed=5, rank=0, world_size=1)
    single.set_epoch(2)
    assert list(single) == global_seq[:1001].tolist()  # padding appends draws, it changes none


def test_world_defaults_and_invalid_rank(voc_lt):
    targets, _ = voc_lt
    sampler = GroupSampler(targets)
    assert (sampler.rank, sampler.world_size) == (0, 1)  # no process group initialised
    with pytest.raises(ValueError, match="rank"):
        ClassAwareSampler(targets, rank=2, world_size=2)


def test_dataloader_uses_the_sampler():
    targets = _small_targets()
    sampler = ClassAwareSampler(targets, per_class=1, num_samples=12, seed=0)
    loader = DataLoader(TensorDataset(torch.arange(6)), batch_size=4, sampler=sampler)
    got = torch.cat([b[0] for b in loader]).tolist()
    assert got == list(sampler)


# ----------------------------------------------------------------------------------- building, errors
@pytest.mark.parametrize("name", list_samplers())
def test_build_sampler(voc_lt, name):
    targets, _ = voc_lt
    sampler = build_sampler(SamplerConfig(name=name, num_samples=64), targets, seed=0, rank=1, world_size=2)
    if name == "random":
        assert sampler is None
        return
    assert len(sampler) == 32 and sampler.seed == 0 and sampler.rank == 1
    assert all(0 <= i < len(targets) for i in sampler)


def test_build_sampler_reads_its_config(voc_lt):
    targets, _ = voc_lt
    assert list_samplers() == ["random", "class_aware", "group"]
    ca = build_sampler(SamplerConfig(name="class_aware", per_class=2), targets, seed=4)
    assert ca.per_class == 2 and len(ca) == 3875
    group = build_sampler(SamplerConfig(name="group", num_groups=2), targets, seed=4, head=300, tail=5)
    assert len(group.group_classes) == 2
    group = build_sampler(SamplerConfig(name="group"), targets, seed=4, head=300, tail=5)
    assert [len(g) for g in group.group_classes] == [2, 17, 1]  # thresholds passed through: 775, 479 | ... | 4


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError, match="class_aware.*group"):
        build_sampler(SamplerConfig(name="balanced"), _small_targets(), seed=0)


@pytest.mark.parametrize("cls", [ClassAwareSampler, GroupSampler])
@pytest.mark.parametrize(
    ("targets", "match"),
    [
        (np.zeros((0, 4), dtype=np.int8), "empty"),
        (np.zeros((3, 0), dtype=np.int8), "empty"),
        (np.array([[0, -1], [-1, 0]]), "no positive"),
        (np.array([1, 0, 1]), "2-D"),
    ],
)
def test_bad_targets_raise(cls, targets, match):
    with pytest.raises(ValueError, match=match):
        cls(targets)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="per_class"):
        ClassAwareSampler(_small_targets(), per_class=0)
    with pytest.raises(ValueError, match="num_samples"):
        GroupSampler(_small_targets(), num_samples=-1)
    with pytest.raises(ValueError, match="num_groups"):
        GroupSampler(_small_targets(), num_groups=-2)
