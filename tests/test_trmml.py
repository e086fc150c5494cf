"""TRM-ML (METHODS §5.5) on a tiny random CLIP: regions, matching, contrastive loss, prototypes, pseudo-labels, runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from cimlic import checkpoint as ckpt
from cimlic.apps.cli import main
from cimlic.config import ModelConfig
from cimlic.models import build_model
from cimlic.models.diversity import DiversityConfig, DiversityModule
from cimlic.models.trmml import TRMMLConfig, multimodal_contrastive_loss, region_supcon, region_text_nce
from runs import sklearn_map

CLASSES = ["dog", "cat", "traffic light", "potted_plant"]
C = len(CLASSES)


STATE_BUFFERS = ("visual_proto", "proto_seen", "pos_threshold", "neg_threshold", "threshold_ready")


def _build(diversity: bool = False, arch: str = "cimlic-tiny-vit", **trmml):
    torch.manual_seed(0)
    cfg = ModelConfig(name="trmml", clip_arch=arch, random_init=True, trmml=TRMMLConfig(**trmml),
                      diversity=DiversityConfig(enabled=diversity))  # fmt: skip
    return build_model(cfg, CLASSES)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


_FEATS: dict[tuple, dict[str, torch.Tensor]] = {}


def _feats(model, n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Cached dense CLIP features of n random images (every ``_build`` of one arch has the same CLIP weights)."""
    key = (model.clip.arch, n, seed)
    if key not in _FEATS:
        size = model.clip.image_size
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
        _FEATS[key] = {f"feat_{k}": v for k, v in model.image_features(x).items()}
    return dict(_FEATS[key])


def _targets(n: int, seed: int, known: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """(observed (n, C) in {1, 0, -1}, true (n, C) in {1, 0}); every class has a known positive in row 0..C-1."""
    g = torch.Generator().manual_seed(seed)
    true = (torch.rand(n, C, generator=g) < 0.5).float()
    true[torch.arange(C), torch.arange(C)] = 1.0
    hidden = torch.rand(n, C, generator=g) > known
    hidden[torch.arange(C), torch.arange(C)] = False
    return true.masked_fill(hidden, -1.0), true


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b, dim=0).item()


# --------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("dim", [0, 32])
def test_shapes_and_gradients(dim):
    model = _build(dim=dim).train()
    torch.testing.assert_close(model.mlp[-1].weight, torch.zeros_like(model.mlp[-1].weight))  # starts as pooling
    with torch.no_grad():  # as after some training, so every parameter of the MLP is on the gradient's path
        model.mlp[-1].weight.normal_(std=0.02)
    feats = _feats(model)
    target, _ = _targets(6, seed=1)
    out = model({**feats, "target": target})
    embed = model.clip.embed_dim
    assert out["logits"].shape == (6, C) and out["targets"].shape == (6, C)
    assert model.regions(feats["feat_local"]).shape == (6, C, embed)
    assert model.queries.shape == (C, dim or embed)
    if dim == 0:  # the queries start at the class text features
        torch.testing.assert_close(model.queries.detach(), model.text_features())
    (out["logits"].square().sum() + out["aux_losses"]["contrastive"]).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"queries", "attn.in_proj_weight", "attn.out_proj.weight", "mlp.0.weight", "mlp.3.weight"} <= trainable
    assert ({"token_proj.weight", "out_proj.weight"} <= trainable) == (dim != 0)
    assert not any(n.startswith("clip.") for n in trainable)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in model.clip.parameters())
    assert not model.eval()({**feats, "target": target}).keys() - {"logits"}  # evaluation: logits only


@pytest.mark.parametrize("scale", [0.0, 5.0])
def test_logits_are_scaled_cosines_of_regions(scale):
    model = _build(logit_scale=scale).eval()
    feats = _feats(model, n=3)
    with torch.no_grad():
        regions = model.regions(feats["feat_local"])  # (B, C, E)
        logits = model(feats)["logits"]
    s = scale or model.clip.logit_scale
    for b in range(3):
        for c in range(C):
            assert logits[b, c].item() == pytest.approx(s * _cos(regions[b, c], model.text_features()[c]), abs=1e-5)


@pytest.mark.parametrize("arch", ["cimlic-tiny-vit", "cimlic-tiny-rn"])
def test_cached_features_equal_images(arch):
    model = _build(arch=arch).eval()
    size = model.clip.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        direct = model({"image": x})["logits"]
        cached = model({f"feat_{k}": v for k, v in model.image_features(x).items()})["logits"]
    torch.testing.assert_close(cached, direct, rtol=0, atol=1e-6)


def test_diversity_on_off():
    off, on = _build(), _build(diversity=True)
    assert isinstance(on.diversity, DiversityModule) and isinstance(off.diversity, torch.nn.Identity)
    feats = _feats(off, n=2)
    with torch.no_grad():  # the diversity module starts as the identity: same logits at initialisation
        torch.testing.assert_close(on.eval()(feats)["logits"], off.eval()(feats)["logits"])
        torch.nn.init.normal_(on.diversity.attn.out_proj.weight, std=0.1)
        assert not torch.allclose(on(feats)["logits"], off(feats)["logits"])
    on.train()(feats)["logits"].sum().backward()
    assert on.diversity.attn.out_proj.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ contrastive
def test_contrastive_loss_by_hand():
    s = 1 / math.sqrt(2)
    regions = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[s, s], [0.0, 2.0]], [[0.0, -1.0], [1.0, 0.0]]])  # (3, 2, 2)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.0, 1.0]])  # known positives: (0,0) (0,1) (1,0) (2,1)
    temp = 0.5
    anchors = [((0, 0), [1.0, 0.0]), ((0, 1), [0.0, 1.0]), ((1, 0), [s, s]), ((2, 1), [1.0, 0.0])]  # unit vectors

    def dot(u, v):
        return sum(a * b for a, b in zip(u, v, strict=True))

    nce = 0.0
    for (_, c), r in anchors:
        e = [math.exp(dot(r, t) / temp) for t in text.tolist()]
        nce -= math.log(e[c] / sum(e))
    nce /= len(anchors)
    sup, n_valid = 0.0, 0
    for a, ((i, c), r) in enumerate(anchors):
        others = [(b, x) for b, x in enumerate(anchors) if b != a]
        denom = sum(math.exp(dot(r, x[1]) / temp) for _, x in others)
        pos = [x for _, x in others if x[0][1] == c and x[0][0] != i]
        if pos:
            sup -= sum(math.log(math.exp(dot(r, x[1]) / temp) / denom) for x in pos) / len(pos)
            n_valid += 1
    sup /= n_valid
    assert region_text_nce(regions, text, targets, temp).item() == pytest.approx(nce, rel=1e-5)
    assert region_supcon(regions, targets, temp).item() == pytest.approx(sup, rel=1e-5)
    assert multimodal_contrastive_loss(regions, text, targets, temp).item() == pytest.approx(nce + sup, rel=1e-5)
    none = torch.zeros(3, 2)  # no known positive: zero, with a graph
    assert multimodal_contrastive_loss(regions.requires_grad_(), text, none).item() == 0.0


def test_contrastive_aux_loss_in_forward():
    model = _build(dropout=0.0, contrastive_weight=0.5, contrastive_temp=0.2).train()
    feats = _feats(model)
    target, _ = _targets(6, seed=2)
    out = model({**feats, "target": target})
    with torch.no_grad():
        regions = model.regions(feats["feat_local"])
        expected = 0.5 * multimodal_contrastive_loss(regions, model.text_features(), target, 0.2)
    torch.testing.assert_close(out["aux_losses"]["contrastive"].detach(), expected)
    assert "aux_losses" not in _build(contrastive_weight=0.0).train()({**feats, "target": target})


# --------------------------------------------------------------------------- prototypes, pseudo-labels
def test_prototype_ema_by_hand():
    model = _build(dropout=0.0, proto_momentum=0.7).train()
    batches = [_feats(model, n=4, seed=s) for s in (0, 1)]
    targets = [torch.tensor([[1.0, 0, -1, 0], [1, 1, 0, -1], [0, -1, 0, 0], [-1, 1, 0, 0]]),
               torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0], [1, -1, 1, 0], [0, 0, 0, 0]])]  # fmt: skip
    expected, seen = torch.zeros(C, model.clip.embed_dim), torch.zeros(C, dtype=torch.bool)
    for feats, target in zip(batches, targets, strict=True):
        with torch.no_grad():
            r = F.normalize(model.regions(feats["feat_local"]), dim=-1)  # (B, C, E)
        for c in range(C):
            rows = target[:, c] == 1
            if rows.any():
                mean = r[rows, c].mean(0)
                expected[c] = 0.7 * expected[c] + 0.3 * mean if seen[c] else mean
                seen[c] = True
        model({**feats, "target": target})
    torch.testing.assert_close(model.visual_proto, expected)
    assert model.proto_seen.tolist() == [True, True, True, False]  # class 3: no known positive yet


def test_similarity_formula():
    model = _build()
    model.visual_proto.normal_()
    regions = torch.randn(2, C, model.clip.embed_dim)
    q = model.similarity(regions)
    for c in range(C):
        by_hand = 0.5 * (_cos(regions[1, c], model.visual_proto[c]) + _cos(regions[1, c], model.text_features()[c]))
        assert q[1, c].item() == pytest.approx(by_hand, abs=1e-6)


def test_thresholds_are_quantiles_of_known_positive_scores():
    model = _build(dropout=0.0, pos_quantile=0.8, neg_quantile=0.25).train()
    model.set_epoch(0)
    collected: dict[int, list[float]] = {c: [] for c in range(C)}
    for seed in range(3):
        feats, (target, _) = _feats(model, n=8, seed=seed), _targets(8, seed=seed)
        target[:, 3] = -1.0  # class 3 never has a known positive: no thresholds
        seen = model.proto_seen.clone()
        with torch.no_grad():
            q = model.similarity(model.regions(feats["feat_local"]))  # prototypes before the batch's update
        for b, c in (target == 1).nonzero().tolist():
            if seen[c]:
                collected[c].append(q[b, c].item())
        model({**feats, "target": target})
    model.epoch_stats()
    for c in range(3):
        values = torch.tensor(collected[c])
        assert len(values) > 3 and model.threshold_ready[c]
        assert model.pos_threshold[c].item() == pytest.approx(torch.quantile(values, 0.8).item(), abs=1e-6)
        assert model.neg_threshold[c].item() == pytest.approx(torch.quantile(values, 0.25).item(), abs=1e-6)
    assert not model.threshold_ready[3] and model.pos_threshold[3] == 0


def _run_epoch(model, epoch: int, batches: int = 3, seed: int = 0):
    """One epoch of forwards; returns [(input targets, out targets, true targets)] and the epoch's stats."""
    model.set_epoch(epoch)
    seen = []
    for k in range(batches):
        feats, (target, true) = _feats(model, n=8, seed=seed + k), _targets(8, seed=seed + k)
        out = model({**feats, "target": target, "true_target": true})
        seen.append((target, out["targets"], true))
    return seen, model.epoch_stats()


def test_pseudo_labels_keep_known_labels_and_wait_for_warmup():
    model = _build(warmup_epochs=2, pos_quantile=0.5, neg_quantile=0.5).train()  # 0.5/0.5: every unknown is labelled
    for epoch in range(3):
        seen, stats = _run_epoch(model, epoch, seed=10 * epoch)
        for target, pseudo, _ in seen:
            known = target != -1
            assert torch.equal(pseudo[known], target[known])  # known labels are never changed
            if epoch < 2:
                assert torch.equal(pseudo, target) and stats["pseudo_pos"] == stats["pseudo_neg"] == 0
            else:
                assert set(pseudo[~known].tolist()) <= {0.0, 1.0}  # every unknown entry got a label
        assert stats["pseudo_classes"] == C  # thresholds from epoch 0 on (the first batch only seeds prototypes)
    assert stats["pseudo_pos"] + stats["pseudo_neg"] == sum(int((t == -1).sum()) for t, _, _ in seen)
    off = _build(pseudo_labels=False, warmup_epochs=0).train()
    for epoch in range(2):
        assert all(torch.equal(p, t) for t, p, _ in _run_epoch(off, epoch)[0])


def test_epoch_stats_count_against_true_labels():
    model = _build(warmup_epochs=1).train()  # the default quantiles: 0.9 / 0.1
    _run_epoch(model, 0)
    seen, stats = _run_epoch(model, 1, batches=4, seed=5)
    new_pos = sum(int(((t == -1) & (p == 1)).sum()) for t, p, _ in seen)
    new_neg = sum(int(((t == -1) & (p == 0)).sum()) for t, p, _ in seen)
    pos_right = sum(int(((t == -1) & (p == 1) & (y == 1)).sum()) for t, p, y in seen)
    neg_right = sum(int(((t == -1) & (p == 0) & (y == 0)).sum()) for t, p, y in seen)
    assert new_pos + new_neg > 0
    assert stats["pseudo_pos"] == new_pos and stats["pseudo_neg"] == new_neg
    assert stats["pseudo_pos_right"] == pos_right and stats["pseudo_neg_right"] == neg_right
    if new_pos:
        assert stats["pseudo_pos_acc"] == pytest.approx(pos_right / new_pos)
    if new_neg:
        assert stats["pseudo_neg_acc"] == pytest.approx(neg_right / new_neg)
    assert model.epoch_stats()["pseudo_pos"] == 0  # counters were reset
    model({**_feats(model), "target": _targets(6, 0)[0]})  # no true_target: no *_right entries
    assert "pseudo_pos_right" not in model.epoch_stats()


def test_state_dict_round_trip_resumes_identically():
    model = _build(dropout=0.0, warmup_epochs=1).train()
    _run_epoch(model, 0)
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("clip.")}
    assert set(STATE_BUFFERS) <= set(state)  # prototypes and thresholds travel with checkpoints
    assert model.threshold_ready.all() and model.proto_seen.all()
    fresh = _build(dropout=0.0, warmup_epochs=1).train()
    fresh.load_state_dict(state, strict=False)
    for name in STATE_BUFFERS:
        assert torch.equal(getattr(fresh, name), getattr(model, name)), name
    a, _ = _run_epoch(model, 1, seed=7)
    b, _ = _run_epoch(fresh, 1, seed=7)
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert torch.equal(model.pos_threshold, fresh.pos_threshold) and torch.equal(model.visual_proto, fresh.visual_proto)


def test_config_errors():
    with pytest.raises(ValueError, match="neg_quantile <= pos_quantile"):
        _build(pos_quantile=0.2, neg_quantile=0.5)
    with pytest.raises(ValueError, match="proto_momentum"):
        _build(proto_momentum=1.0)
    with pytest.raises(ValueError, match="heads"):
        _build(dim=30, heads=4)


# ------------------------------------------------------------------------------------------- DDP
def _two_epochs(model, rows: slice) -> tuple[dict, list[torch.Tensor]]:
    """Epoch 0 (warm-up) and epoch 1 over three batches of 8 (this rank's ``rows`` of each); stats, targets."""
    outs = []
    for epoch in range(2):
        model.set_epoch(epoch)
        for seed in range(3):
            feats, (target, true) = _feats(model, n=8, seed=seed), _targets(8, seed=seed)
            batch = {**feats, "target": target, "true_target": true}
            outs.append(model({k: v[rows] for k, v in batch.items()})["targets"])
        stats = model.epoch_stats()
    return stats, outs


def _ddp_worker(rank: int, port: int, root: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _build(dropout=0.0, pos_quantile=0.6, neg_quantile=0.4).train()
        stats, outs = _two_epochs(model, slice(4 * rank, 4 * rank + 4))
        torch.save({"stats": stats, "targets": outs, **model.state_dict()}, Path(root) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process(tmp_path):
    """2 gloo ranks x 4 rows == 1 process x 8 rows: the same pseudo-labels, counts, prototypes and thresholds."""
    import socket

    import torch.multiprocessing as mp

    model = _build(dropout=0.0, pos_quantile=0.6, neg_quantile=0.4).train()
    stats, outs = _two_epochs(model, slice(None))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert stats["pseudo_pos"] + stats["pseudo_neg"] > 0
    assert ranks[0]["stats"] == ranks[1]["stats"] == stats
    for i, ref in enumerate(outs):
        assert torch.equal(torch.cat([ranks[0]["targets"][i], ranks[1]["targets"][i]]), ref)
    for name in STATE_BUFFERS:
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every rank keeps identical state
        torch.testing.assert_close(ranks[0][name], getattr(model, name), atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from glyphs import build_world

    root = tmp_path_factory.mktemp("trmml_world")
    build_world(root, n_pool=160, n_test=40, n_max=40, seed=0)
    mask = root / "partial.txt"
    argv = ["split", "partial", "--labels", str(root / "train.txt"), "--classes", str(root / "classes.txt"),
            "--known", "0.5", "--seed", "0", "--out", str(mask)]  # fmt: skip
    assert main(argv) == 0
    return root


def _train(world: Path, tmp: Path, run: str, epochs: int, resume: bool = False, extra: tuple[str, ...] = ()) -> Path:
    cfg = {
        "name": "tiny_trmml",
        "data": {"classes": str(world / "classes.txt"), "train_labels": str(world / "train.txt"),
                 "test_labels": str(world / "test.txt"), "image_root": str(world / "images"),
                 "image_pattern": "{id}.png", "partial_mask": str(world / "partial.txt")},
        "model": {"name": "trmml", "clip_arch": "cimlic-tiny-vit", "random_init": True,
                  "trmml": {"warmup_epochs": 1, "pos_quantile": 0.7, "neg_quantile": 0.3}},
        "train": {"epochs": 2, "batch_size": 16, "num_workers": 0, "lr": 0.01, "schedule": "constant",
                  "cache_dir": str(tmp / "cache")},
        "loss": {"name": "asl", "partial": True},
    }  # fmt: skip
    (tmp / f"{run}.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["train", "--config", str(tmp / f"{run}.yaml"), "--run-dir", str(tmp / run)]
    argv += ["--set", f"train.epochs={epochs}"] + (["--resume"] if resume else [])
    for item in extra:
        argv += ["--set", item]
    assert main(argv) == 0
    return tmp / run


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_with_missing_labels_end_to_end_and_resume(world, tmp_path):
    run = _train(world, tmp_path, "full", epochs=2)
    assert json.loads((run / "eval.json").read_text())["map"] == pytest.approx(sklearn_map(run), abs=1e-6)
    stats = [r for r in _records(run) if r.get("split") == "train"]
    assert [r["epoch"] for r in stats] == [1, 2]
    assert stats[0]["pseudo_pos"] == stats[0]["pseudo_neg"] == 0  # warm-up epoch
    assert stats[1]["pseudo_pos"] + stats[1]["pseudo_neg"] > 0 and "pseudo_neg_right" in stats[1]
    assert any("loss_contrastive" in r for r in _records(run))
    # one epoch, then resumed to two: the same pseudo-labels, weights, prototypes and test result
    half = _train(world, tmp_path, "half", epochs=1)
    _train(world, tmp_path, "half", epochs=2, resume=True)
    assert [r for r in _records(half) if r.get("split") == "train"] == stats
    assert (half / "eval.json").read_text() == (run / "eval.json").read_text()
    a, b = (torch.load(r / "state.pt", weights_only=True)["model"] for r in (run, half))
    assert a.keys() == b.keys() and {"visual_proto", "pos_threshold", "threshold_ready"} <= a.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_regions_start_as_attention_pooling_of_clip_tokens():
    """At initialisation (dim = E) r_c is a convex mix of the local tokens, so it lies in CLIP's joint space."""
    model = _build().eval()
    local = _feats(model, n=2)["feat_local"]  # (2, N, E)
    with torch.no_grad():
        regions = model.regions(local)  # (2, C, E)
        q = model.q_norm(model.queries)  # (C, E)
        k = F.linear(model.kv_norm(local), *_qk(model, "k"))  # (2, N, E)
        qh = F.linear(q, *_qk(model, "q"))  # (C, E)
    heads, e = model.attn.num_heads, local.shape[-1]
    d = e // heads
    scores = torch.einsum("chd,bnhd->bhcn", qh.view(-1, heads, d), k.view(2, -1, heads, d)) / d**0.5
    weights = scores.softmax(dim=-1)  # (2, heads, C, N)
    expected = torch.einsum("bhcn,bnhd->bchd", weights, local.view(2, -1, heads, d)).reshape(2, -1, e)
    torch.testing.assert_close(regions, expected, rtol=1e-4, atol=1e-5)


def _qk(model, which: str):
    """(weight, bias) of the query or key projection of the cross-attention."""
    e = model.attn.embed_dim
    i = {"q": 0, "k": 1}[which]
    return model.attn.in_proj_weight[i * e : (i + 1) * e], model.attn.in_proj_bias[i * e : (i + 1) * e]


def test_missing_labels_with_all_three_gefd_parts(world, tmp_path, monkeypatch):
    """TRM-ML + group sampler + grad_balance (partial) + diversity: the run draws with a GroupSampler, the best
    checkpoint holds the diversity module, state.pt the loss's G± sums over known and pseudo labels, and the
    pseudo-label records are written."""
    import cimlic.engine
    from cimlic.data.samplers import GroupSampler, build_sampler

    built = []
    monkeypatch.setattr(
        cimlic.engine, "build_sampler", lambda *a, **k: built.append(build_sampler(*a, **k)) or built[-1]
    )
    extra = ("sampler.name=group", "loss.name=grad_balance", "model.diversity.enabled=true")
    run = _train(world, tmp_path, "gefd", epochs=2, extra=extra)
    assert len(built) == 1 and isinstance(built[0], GroupSampler)
    assert json.loads((run / "eval.json").read_text())["map"] == pytest.approx(sklearn_map(run), abs=1e-6)
    saved = ckpt.read_checkpoint(run / "best")[0]
    assert {k for k in saved if k.startswith("diversity.")} >= {
        "diversity.attn.in_proj_weight",
        "diversity.norm.weight",
    }
    sums = torch.load(run / "state.pt", map_location="cpu", weights_only=True)["loss"]
    assert set(sums) == {"pos_grad", "neg_grad"} and sums["pos_grad"].sum() > 0 and sums["neg_grad"].sum() > 0
    stats = [r for r in _records(run) if r.get("split") == "train"]
    assert [r["epoch"] for r in stats] == [1, 2] and stats[1]["pseudo_pos"] + stats[1]["pseudo_neg"] > 0
