"""Split builders against the published lists in ../shared/data."""

from __future__ import annotations

import numpy as np
import pytest

from cimlic.data.labels import LabelSet, read_classes, read_id_list, read_label_list
from cimlic.data.splits import (
    FEWSHOT_NOVEL,
    SplitError,
    build_fewshot_episode,
    build_longtail,
    pareto_targets,
    partial_labels,
    resolve_classes,
    split_base_novel,
    visit_order,
)

VOC_TARGETS = [800, 529, 359, 248, 175, 125, 91, 67, 50, 38, 29, 23, 18, 14, 11, 9, 7, 6, 5, 4]


@pytest.fixture(scope="module")
def voc(shared_data):
    classes = read_classes(shared_data / "voc_lt" / "classes.txt")
    return classes, shared_data / "voc_lt"


def test_pareto_targets_voc():
    assert pareto_targets(20, 800) == VOC_TARGETS


def test_pareto_targets_match_scipy_pareto():
    stats = pytest.importorskip("scipy.stats")
    b, n_max = 6, 1200
    x = np.linspace(stats.pareto.ppf(0, b), stats.pareto.ppf(0.99, b), 80)
    expected = [int(stats.pareto.pdf(v, b) * (n_max - 1) / b + 1) for v in x]
    assert pareto_targets(80, n_max) == expected


def test_visit_order_hand_computed():
    # 3 classes; images: {0,1}, {0}, {2}, {1,2}. counts 2,2,2; co(0,1)=1, co(1,2)=1.
    # P(j|i) rows: i=0 -> [1, .5, 0]; i=1 -> [.5, 1, .5]; i=2 -> [0, .5, 1]; column sums 1.5, 2, 1.5.
    t = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 1]])
    order = visit_order(t)
    assert order[0] == 1 and sorted(order[1:]) == [0, 2]


def test_voc_lt_regenerated_exactly(voc):
    """METHODS §1.2: the builder regenerates the published VOC-LT list, same ids in the same order."""
    classes, root = voc
    pool = read_label_list(root / "voc2012_trainval_pool.txt", classes)
    assert len(pool) == 11540
    rows = build_longtail(pool, n_max=800, seed=0)
    official = read_id_list(root / "official_train_ids.txt")
    assert [pool.ids[r] for r in rows] == official
    # and the labels of the regenerated subset are those of the published train list
    train = read_label_list(root / "train.txt", classes)
    assert sorted(train.ids) == sorted(official)  # same images; the LMPT list is in another order
    np.testing.assert_array_equal(pool.subset(rows).targets, train.targets)


def test_voc_lt_statistics(voc):
    classes, root = voc
    train = read_label_list(root / "train.txt", classes)
    test = read_label_list(root / "test.txt", classes)
    counts = train.class_counts()
    assert (len(train), len(test)) == (1142, 4952)
    assert counts.max() == 775 and classes[counts.argmax()] == "person"
    assert counts.min() == 4 and classes[counts.argmin()] == "cow"
    groups = train.groups()
    assert [(groups == g).sum() for g in ("head", "medium", "tail")] == [6, 6, 8]


def test_coco_lt_statistics(shared_data):
    classes = read_classes(shared_data / "coco_lt" / "classes.txt")
    train = read_label_list(shared_data / "coco_lt" / "train.txt", classes)
    test = read_label_list(shared_data / "coco_lt" / "test.txt", classes)
    counts = train.class_counts()
    assert (len(classes), len(train), len(test)) == (80, 1909, 5000)
    assert counts.max() == 1128 and classes[counts.argmax()] == "person" and counts.min() == 6
    assert ((test.targets == 1).sum(axis=1) == 0).sum() == 48
    groups = train.groups()
    assert [(groups == g).sum() for g in ("head", "medium", "tail")] == [22, 33, 25]
    official = [f"{int(i):012d}" for i in read_id_list(shared_data / "coco_lt" / "official_train_ids.txt")]
    assert sorted(train.ids) == sorted(official)  # same images; the LMPT list is in another order


def test_longtail_errors():
    classes = ["a", "b"]
    with pytest.raises(SplitError, match="no image"):
        build_longtail(LabelSet([], np.zeros((0, 2)), classes, source="pool.txt"), n_max=10)
    with pytest.raises(SplitError, match=r"class\(es\) \['b'\]"):
        build_longtail(LabelSet(["x"], [[1, 0]], classes, source="pool.txt"), n_max=10)
    pool = LabelSet([str(i) for i in range(6)], [[1, 0]] * 3 + [[0, 1]] * 3, classes, source="pool.txt")
    with pytest.raises(SplitError, match="pool.txt.*needs .* only 3 left"):
        build_longtail(pool, n_max=50)
    rows = build_longtail(pool, n_max=50, clamp=True)
    assert sorted(rows)[:3] == [0, 1, 2] and len(rows) == 4  # targets [50, 1]: all 3 of a (clamped), 1 of b


def test_longtail_seed_changes_selection(voc):
    classes, root = voc
    pool = read_label_list(root / "voc2012_trainval_pool.txt", classes)
    assert set(build_longtail(pool, 800, seed=1)) != set(build_longtail(pool, 800, seed=0))


def test_fewshot_base_novel_split_is_identity_on_published_lists(shared_data):
    """Applied to the published VOC2007 test lists, the base/novel rule keeps them exactly (METHODS §1.3)."""
    root = shared_data / "voc_fewshot"
    classes = read_classes(root / "classes.txt")
    novel = resolve_classes(FEWSHOT_NOVEL["voc"], classes)
    for split, sizes in (("train", (3575, 895)), ("test", (3562, 926))):
        base = read_label_list(root / f"{split}_base.txt", classes)
        nov = read_label_list(root / f"{split}_novel.txt", classes)
        assert (len(base), len(nov)) == sizes
        both = LabelSet(base.ids + nov.ids, np.concatenate([base.targets, nov.targets]), classes)
        b_rows, n_rows = split_base_novel(both, novel)
        assert [both.ids[r] for r in b_rows] == base.ids
        assert [both.ids[r] for r in n_rows] == nov.ids


def test_fewshot_split_on_voc2007_test(shared_data):
    """On VOC2007 test labels (difficult counted positive) the builder's base-only set is a subset of the
    published one: those lists count difficult objects as negative, so they keep 133 more base images."""
    classes = read_classes(shared_data / "voc_lt" / "classes.txt")
    test = read_label_list(shared_data / "voc_lt" / "test.txt", classes)
    base, nov = split_base_novel(test, resolve_classes(FEWSHOT_NOVEL["voc"], classes))
    published = read_id_list(shared_data / "voc_fewshot" / "test_base.txt")
    assert {test.ids[r] for r in base} <= set(published)
    assert len(base) == 3429 and len(nov) == 876


@pytest.mark.parametrize("shots", [1, 5])
def test_fewshot_episode_exactly_k(shared_data, shots):
    root = shared_data / "voc_fewshot"
    classes = read_classes(root / "classes.txt")
    novel = resolve_classes(FEWSHOT_NOVEL["voc"], classes)
    pool = read_label_list(root / "train_novel.txt", classes)
    episodes = [build_fewshot_episode(pool, novel, shots, seed=s) for s in range(10)]
    for rows in episodes:
        counts = (pool.targets[rows][:, novel] == 1).sum(axis=0)
        assert (counts == shots).all(), counts  # exactly K per novel class, like the published episodes
        assert len(set(rows)) == len(rows)
    assert len({tuple(sorted(r)) for r in episodes}) == 10  # seeds give different episodes
    assert build_fewshot_episode(pool, novel, shots, seed=3) == episodes[3]  # and are reproducible
    # the published support sets have the same property
    for e in range(1, 11):
        given = read_label_list(root / f"train_novel_{shots}shot_{e}.txt", classes)
        assert ((given.targets[:, novel] == 1).sum(axis=0) == shots).all()


def test_fewshot_errors():
    classes = ["a", "b", "c"]
    with pytest.raises(SplitError, match=r"unknown class name\(s\) \['zebra'\]"):
        resolve_classes(["a", "zebra"], classes)
    pool = LabelSet(["x", "y"], [[0, 1, 0], [0, 1, 1]], classes, source="novel.txt")
    with pytest.raises(SplitError, match="novel.txt: fewer than 2 images of novel class"):
        build_fewshot_episode(pool, [1, 2], shots=2, seed=0)


def test_partial_labels():
    rng = np.random.default_rng(1)
    targets = (rng.random((400, 20)) < 0.2).astype(np.int8)
    for known in (0.1, 0.5, 0.9):
        masked = partial_labels(targets, known, seed=0)
        kept = masked != -1
        assert abs(kept.mean() - known) < 0.02
        np.testing.assert_array_equal(masked[kept], targets[kept])  # known entries unchanged
    np.testing.assert_array_equal(partial_labels(targets, 0.3, 5), partial_labels(targets, 0.3, 5))
    assert not np.array_equal(partial_labels(targets, 0.3, 5), partial_labels(targets, 0.3, 6))
    assert (partial_labels(targets, 1.0, 0) == targets).all()
    with pytest.raises(SplitError, match="known proportion"):
        partial_labels(targets, 0.0, 0)
