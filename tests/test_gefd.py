"""GE/FD (Chen et al., IEEE TMM 2025; METHODS §3, §4, §5.6, [our design]): gradient balancing on a skewed problem,
its running sums under 2-process DDP and with partial labels, the diversity module, the three ablation switches, and
one tiny CPRFL run through main() with all three parts on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, TensorDataset

from cimlic import checkpoint as ckpt
from cimlic.apps.cli import main
from cimlic.config import load_config
from cimlic.data.samplers import GroupSampler, build_sampler
from cimlic.losses import BCELoss, FocalLoss, GradBalanceLoss, build_loss
from cimlic.models import build_model
from cimlic.models.diversity import DiversityModule
from runs import sklearn_map

CLASSES = ["dog", "cat", "traffic light", "potted_plant"]
TINY = ["model.clip_arch=cimlic-tiny-vit", "model.random_init=true", "model.cprfl.ffn=64"]
DIVERSITY_KEYS = {"norm.weight", "norm.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                  "attn.out_proj.bias"}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------- balancing on a skewed problem
FREQS = (0.5, 0.3, 0.03, 0.01)  # classes 0, 1 frequent; 2, 3 rare (about 62 and 21 positives of 2048)


def _skewed_problem(seed: int = 0, n: int = 2048, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, d), y (n, C)): linearly learnable labels (a noisy teacher) with positive rates ``FREQS``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    score = x @ torch.randn(d, len(FREQS), generator=g) + 0.5 * torch.randn(n, len(FREQS), generator=g)
    thresholds = torch.stack([score[:, c].quantile(1 - f) for c, f in enumerate(FREQS)])
    return x, (score > thresholds).float()


def _train_linear(loss_fn, x, y, steps: int = 300, lr: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SGD on a linear classifier (same init and batches for every loss).

    Returns (G+ (C,), G- (C,), recall (C,) at p > 0.5 on all images), where G± are accumulated |∂(sum of the
    element losses)/∂z| over positives / negatives, measured by autograd the same way for every loss.
    """
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.zeros(y.shape[1]), torch.zeros(y.shape[1])
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        z = model(x[idx])
        z.retain_grad()
        value = loss_fn(z, y[idx])
        opt.zero_grad()
        value.backward()
        opt.step()
        elem_grad = z.grad.abs() * z.numel()  # the losses are means over the B·C (all known) entries
        pos += (elem_grad * y[idx]).sum(0)
        neg += (elem_grad * (1 - y[idx])).sum(0)
    with torch.no_grad():
        recall = ((model(x) > 0) & (y > 0)).sum(0) / y.sum(0)
    return pos, neg, recall


@pytest.mark.parametrize("base", ["bce", "focal"])
def test_balancing_moves_rare_classes_toward_balance(base):
    """Rare classes: negatives down-, positives up-weighted; their G+/G- rises far above the plain loss's toward the
    frequent classes' (fails if the reweighting is off or inverted); recall on the rare classes follows."""
    x, y = _skewed_problem()
    assert y.sum(0).tolist() == [1024, 615, 62, 21]
    plain = BCELoss() if base == "bce" else FocalLoss(gamma=2.0)
    balanced = GradBalanceLoss(4, base=base)
    p_pos, p_neg, p_recall = _train_linear(plain, x, y)
    b_pos, b_neg, b_recall = _train_linear(balanced, x, y)
    # the buffers hold exactly what autograd measures on the weighted loss
    torch.testing.assert_close(balanced.pos_grad, b_pos, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(balanced.neg_grad, b_neg, rtol=1e-4, atol=1e-6)
    plain_ratio, ratio = p_pos / p_neg, b_pos / b_neg
    # plain loss (measured 0.21 / 0.09 BCE, 0.27 / 0.13 focal): rare positives are swamped by their negatives
    assert (plain_ratio[2:] < 0.35).all() and (plain_ratio[0] > 0.9)
    # balanced (measured 0.58 / 0.51): more than twice the plain ratio; the gap to class 0 shrinks by over 30 %
    assert (ratio[2:] > 2 * plain_ratio[2:]).all()
    assert ((ratio[0] - ratio[2:]).abs() < 0.7 * (plain_ratio[0] - plain_ratio[2:]).abs()).all()
    pos_w, neg_w = balanced.class_weights()
    g = balanced.pos_grad / balanced.neg_grad
    torch.testing.assert_close(neg_w, torch.sigmoid(12 * (g - 0.8)))  # f(g_c), the documented mapping
    torch.testing.assert_close(pos_w, 1 + 4 * (1 - neg_w))
    assert (neg_w[2:] < 0.1).all() and (neg_w[2:] < neg_w[0]).all() and neg_w[0] > 0.9  # rare negatives muted
    assert (pos_w[2:] > 4.5).all() and (pos_w[2:] > pos_w[1]).all() and pos_w[0] < 1.5  # rare positives boosted
    # the behaviour that matters: the plain loss barely ever fires on the rare classes, the balanced one does
    assert (p_recall[2:] < 0.1).all() and (b_recall[2:] > 0.9).all()


def test_eval_mode_freezes_the_sums_but_uses_them():
    """After training: an eval-mode call leaves G± untouched and weights its elements with the current f(g_c);
    back in training mode the sums move again."""
    x, y = _skewed_problem()
    loss = GradBalanceLoss(4)
    _train_linear(loss, x, y, steps=50)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    assert set(before) == {"pos_grad", "neg_grad"} and (before["neg_grad"] > 0).all()
    z = torch.randn(32, 4, generator=torch.Generator().manual_seed(3)) * 2
    pos_w, neg_w = loss.class_weights()
    expected = torch.where(y[:32] > 0, pos_w, neg_w) * F.binary_cross_entropy_with_logits(z, y[:32], reduction="none")
    loss.eval()
    for _ in range(3):
        assert loss(z, y[:32]).item() == pytest.approx(expected.mean().item(), rel=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in loss.state_dict().items())
    loss.train()(z, y[:32])
    assert (loss.pos_grad > before["pos_grad"]).any() and (loss.neg_grad > before["neg_grad"]).all()


# ------------------------------------------------------------------------------------------------- DDP
DDP_STEPS, DDP_ROWS = 3, 8


def _ddp_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (8, 5), targets (8, 5) in {1, 0, -1}) of one step: the same on every process."""
    g = torch.Generator().manual_seed(100 + step)
    logits = torch.randn(DDP_ROWS, 5, generator=g) * 2
    targets = (torch.rand(DDP_ROWS, 5, generator=g) < 0.3).float()
    targets[torch.rand(DDP_ROWS, 5, generator=g) < 0.2] = -1
    return logits, targets


def _ddp_steps(rows: slice) -> dict[str, torch.Tensor]:
    """Three training calls of a bce- and a focal-based loss on ``rows`` of each step's batch: final sums, and the
    gradient of each call w.r.t. its logits times its number of known entries (the per-element gradient)."""
    out = {}
    for base in ("bce", "focal"):
        loss = GradBalanceLoss(5, base=base)
        grads = []
        for step in range(DDP_STEPS):
            logits, targets = _ddp_batch(step)
            z = logits[rows].clone().requires_grad_()
            loss(z, targets[rows]).backward()
            grads.append(z.grad * (targets[rows] >= 0).sum())
        out |= {f"{base}_pos": loss.pos_grad, f"{base}_neg": loss.neg_grad, f"{base}_grad": torch.cat(grads)}
    return out


def _ddp_worker(rank: int, port: int, root: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = DDP_ROWS // 2
        torch.save(_ddp_steps(slice(half * rank, half * rank + half)), Path(root) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sums_are_all_reduced(tmp_path):
    """2 gloo ranks x 4 rows == 1 process x 8 rows: the same G± on both ranks (within 1e-6) after 3 steps, hence the
    same weights: each rank's per-element gradient equals the single process's on its rows."""
    import socket

    import torch.multiprocessing as mp

    single = _ddp_steps(slice(None))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    half = DDP_ROWS // 2
    for base in ("bce", "focal"):
        assert (single[f"{base}_pos"] > 0).all() and (single[f"{base}_neg"] > 0).all()
        for key in (f"{base}_pos", f"{base}_neg"):
            torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=1e-6)
            torch.testing.assert_close(ranks[0][key], single[key], rtol=0, atol=1e-6)
        # a rank that saw only its half would differ from the global sums by far more than 1e-6
        alone = GradBalanceLoss(5, base=base)
        for step in range(DDP_STEPS):
            alone(*(t[:half] for t in _ddp_batch(step)))
        assert (alone.neg_grad - single[f"{base}_neg"]).abs().max() > 0.1
        for step in range(DDP_STEPS):
            rows = slice(step * DDP_ROWS, step * DDP_ROWS + DDP_ROWS)
            merged = torch.cat([ranks[r][f"{base}_grad"][step * half : (step + 1) * half] for r in range(2)])
            torch.testing.assert_close(merged, single[f"{base}_grad"][rows], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- partial labels
def test_unknown_entries_contribute_nothing_to_the_sums():
    """Five steps with -1 entries == per-class runs on the known entries only (each class's G± and weights depend on
    its own column alone); the logits at unknown entries do not matter; partial=False counts them as negatives."""
    C, steps = 4, 5
    batches = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        logits = torch.randn(10, C, generator=g) * 2
        targets = (torch.rand(10, C, generator=g) < 0.4).float()
        targets[torch.rand(10, C, generator=g) < 0.35] = -1
        batches.append((logits, targets))
    assert sum(int((t == -1).sum()) for _, t in batches) > 40
    for base in ("bce", "focal"):
        full = GradBalanceLoss(C, base=base)
        noisy = GradBalanceLoss(C, base=base)  # the same, with wild logits at the unknown entries
        per_class = [GradBalanceLoss(1, base=base) for _ in range(C)]
        for logits, targets in batches:
            unknown = targets < 0
            value = full(logits, targets)
            noisy(logits.masked_fill(unknown, 40.0), targets)
            total, known = 0.0, 0
            for c, ref in enumerate(per_class):
                rows = targets[:, c] >= 0  # the unknown entries removed by hand
                if rows.any():
                    total += ref(logits[rows, c : c + 1], targets[rows, c : c + 1]).item() * int(rows.sum())
                    known += int(rows.sum())
            assert value.item() == pytest.approx(total / known, rel=1e-5)
        ref_pos = torch.cat([r.pos_grad for r in per_class])
        ref_neg = torch.cat([r.neg_grad for r in per_class])
        torch.testing.assert_close(full.pos_grad, ref_pos, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(full.neg_grad, ref_neg, rtol=1e-6, atol=1e-7)
        assert torch.equal(noisy.pos_grad, full.pos_grad) and torch.equal(noisy.neg_grad, full.neg_grad)
        # partial=False: -1 means negative, i.e. the same as writing 0 there, and the negative sums grow
        assumed = GradBalanceLoss(C, base=base, partial=False)
        zeros = GradBalanceLoss(C, base=base)
        for logits, targets in batches:
            assumed(logits, targets)
            zeros(logits, targets.clamp(min=0))
        torch.testing.assert_close(assumed.neg_grad, zeros.neg_grad)
        assert (assumed.neg_grad > full.neg_grad).all()


# ------------------------------------------------------------------------------------ diversity module
def test_diversity_module_by_hand():
    """x' = x + MHA(LN(x)) across the C category tokens (eval); permutation-equivariant over categories, each output
    mixes in the other categories; dropout = 1 in training leaves only the residual."""
    torch.manual_seed(0)
    B, C, D, H = 2, 5, 8, 2
    module = DiversityModule(D, heads=H, dropout=0.0).eval()
    x = torch.randn(B, C, D)
    torch.testing.assert_close(module(x), x, rtol=0, atol=0)  # zero out-projection: the identity at init
    with torch.no_grad():
        torch.nn.init.normal_(module.attn.out_proj.weight, std=0.3)
        torch.nn.init.normal_(module.attn.out_proj.bias, std=0.1)
        got = module(x)
        h = F.layer_norm(x, (D,), module.norm.weight, module.norm.bias)
        q, k, v = (h @ w.T + b for w, b in zip(module.attn.in_proj_weight.chunk(3), module.attn.in_proj_bias.chunk(3),
                                                 strict=True))  # fmt: skip
        split = [t.view(B, C, H, D // H).transpose(1, 2) for t in (q, k, v)]  # (B, H, C, D/H)
        attn = torch.softmax(split[0] @ split[1].transpose(-1, -2) / math.sqrt(D // H), dim=-1) @ split[2]
        expected = x + attn.transpose(1, 2).reshape(B, C, D) @ module.attn.out_proj.weight.T + module.attn.out_proj.bias
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        perm = torch.tensor([3, 0, 4, 1, 2])
        torch.testing.assert_close(module(x[:, perm]), got[:, perm], rtol=1e-5, atol=1e-6)
        moved = x.clone()
        moved[:, 4] = torch.randn(B, D)  # only category 4 changes (not by a constant shift: LN would remove it) ...
        assert (module(moved)[:, 0] - got[:, 0]).abs().max() > 1e-3  # ... and category 0's feature moves
    dropped = DiversityModule(D, heads=H, dropout=1.0).train()
    dropped.load_state_dict(module.state_dict())
    torch.testing.assert_close(dropped(x), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="must divide"):
        DiversityModule(10, heads=4)


def _model(name: str, diversity: bool):
    torch.manual_seed(0)  # the same random CLIP and head in every build
    cfg = load_config(overrides=[f"model.name={name}", *TINY, f"model.diversity.enabled={str(diversity).lower()}"])
    return build_model(cfg.model, CLASSES)


def _inputs(model, name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if name == "cprfl":
        size = model.input_spec()[0]
        return {"image": torch.randn(6, 3, size, size, generator=g)}
    x = torch.randn(6, 3, model.clip.image_size, model.clip.image_size, generator=g)
    return {f"feat_{k}": v for k, v in model.image_features(x).items()}


@pytest.mark.parametrize("name", ["cprfl", "trmml"])
def test_diversity_switch_changes_parameters_and_trained_module_changes_logits(name):
    """model.diversity.enabled: exactly the DiversityModule's 4d²+6d parameters appear (d = the category-token width);
    training only that module moves the logits away from the switched-off model's and lowers the loss."""
    off, on = _model(name, False), _model(name, True)
    assert isinstance(on.diversity, DiversityModule) and isinstance(off.diversity, torch.nn.Identity)
    off_params, on_params = dict(off.named_parameters()), dict(on.named_parameters())
    assert set(on_params) - set(off_params) == {f"diversity.{k}" for k in DIVERSITY_KEYS}
    assert set(off_params) <= set(on_params) and not any(k.startswith("diversity.") for k in off.state_dict())
    d = on.diversity.norm.normalized_shape[0]
    assert d == (128 if name == "cprfl" else on.clip.embed_dim)  # CPRFL: refined tokens P'; TRM-ML: regions r
    added = sum(p.numel() for k, p in on_params.items() if k.startswith("diversity."))
    assert added == 4 * d * d + 6 * d
    batch = _inputs(on, name)
    target = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 1, 0]])
    on.eval(), off.eval()  # no dropout: the comparison is deterministic
    with torch.no_grad():
        reference = off(batch)["logits"]
        torch.testing.assert_close(on(batch)["logits"], reference, rtol=1e-5, atol=1e-5)  # identity at init
    on.requires_grad_(False)
    on.diversity.requires_grad_(True)
    opt = torch.optim.Adam(on.diversity.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        value = F.binary_cross_entropy_with_logits(on(batch)["logits"], target)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    with torch.no_grad():
        trained = on(batch)["logits"]
    assert (trained - reference).abs().max() > 1e-2 and losses[-1] < 0.9 * losses[0]
    assert on.diversity.attn.out_proj.weight.abs().sum() > 0  # no longer the identity


# ---------------------------------------------------------------------------------- the other switches
def _long_tailed_targets() -> np.ndarray:
    """(688, 9): one positive per image, counts 300 200 | 80 50 30 | 12 8 5 3 (head >= 100 > medium >= 20 > tail);
    some other entries unknown (-1), which never make an image a member of a class."""
    counts = [300, 200, 80, 50, 30, 12, 8, 5, 3]
    rng = np.random.default_rng(0)
    targets = np.zeros((sum(counts), len(counts)), dtype=np.int8)
    targets[rng.random(targets.shape) < 0.1] = -1
    targets[np.arange(len(targets)), np.repeat(np.arange(len(counts)), counts)] = 1
    return targets[rng.permutation(len(targets))]


def _drawn_class_counts(sampler, targets: np.ndarray, epochs: int) -> np.ndarray:
    """(C,) positives among the images a training DataLoader (as the Trainer builds it) yields over ``epochs``."""
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.arange(len(targets))), batch_size=16, sampler=sampler,
                        shuffle=sampler is None, generator=g)  # fmt: skip
    drawn = []
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        drawn += [b[0] for b in loader]
    return (targets[torch.cat(drawn).numpy()] == 1).sum(axis=0)


def test_sampler_switch_balances_the_draws():
    """sampler.name=group: each head/medium/tail group gets 1/3 of the draws, shared equally by its classes (1/6, 1/9,
    1/12; 20 epochs of 688); sampler.name=random: every image once per epoch, class frequencies as in the data."""
    targets = _long_tailed_targets()
    counts = (targets == 1).sum(axis=0)
    group = build_sampler(load_config(overrides=["sampler.name=group"]).sampler, targets, seed=0, head=100, tail=20)
    assert isinstance(group, GroupSampler) and len(group) == 688  # default length N
    assert group.group_names == ["head", "medium", "tail"]
    assert [c.tolist() for c in group.group_classes] == [[0, 1], [2, 3, 4], [5, 6, 7, 8]]
    random = build_sampler(load_config(overrides=["sampler.name=random"]).sampler, targets, seed=0)
    assert random is None  # the DataLoader shuffles
    uniform = _drawn_class_counts(random, targets, epochs=20)
    assert uniform.tolist() == (20 * counts).tolist() and uniform.max() / uniform.min() == 100
    balanced = _drawn_class_counts(group, targets, epochs=20)
    draws = 20 * 688
    assert balanced.sum() == draws
    expected = np.array([1 / 6] * 2 + [1 / 9] * 3 + [1 / 12] * 4)
    # relative sd of a share p over n draws: sqrt((1 - p) / (n p)) <= 0.028 here, so 15 % is > 5 sd; a uniform choice
    # of class (1/9 each) or of image (the data's frequencies) is off by 33 % or more somewhere
    np.testing.assert_allclose(balanced / draws, expected, rtol=0.15)
    assert balanced.max() / balanced.min() < 2.5
    assert balanced[5:].sum() / draws == pytest.approx(1 / 3, abs=0.02) and counts[5:].sum() / counts.sum() < 0.05


def test_loss_switch_builds_the_configured_balancing():
    """loss.name=grad_balance with loss.grad_balance.* overrides: a GradBalanceLoss whose first value is the hand
    computation with those settings (g = 1 before any gradient); loss.name=bce: plain BCE, a different value."""
    counts = torch.tensor([50, 20, 5])
    sets = ["loss.name=grad_balance", "loss.grad_balance.base=focal", "loss.grad_balance.gamma=6",
            "loss.grad_balance.mu=0.5", "loss.grad_balance.alpha=2", "loss.grad_balance.focal_gamma=1"]  # fmt: skip
    balanced = build_loss(load_config(overrides=sets).loss, counts, 60)
    plain = build_loss(load_config(overrides=["loss.name=bce"]).loss, counts, 60)
    assert isinstance(balanced, GradBalanceLoss) and isinstance(plain, BCELoss)
    assert balanced.pos_grad.shape == (3,) and balanced.neg_grad.shape == (3,)
    z, y = torch.tensor([[1.5, -0.5, 0.2]]), torch.tensor([[1.0, 0.0, -1.0]])  # the -1 entry is ignored
    f = sig(6 * (1.0 - 0.5))
    p0, p1 = sig(1.5), sig(0.5)  # p_t of the positive (z = 1.5) and of the negative (z = -0.5)
    expected = ((1 + 2 * (1 - f)) * -(1 - p0) * math.log(p0) + f * -(1 - p1) * math.log(p1)) / 2  # focal, gamma 1
    assert balanced(z, y).item() == pytest.approx(expected, rel=1e-5)
    bce = (math.log(1 + math.exp(-1.5)) + math.log(1 + math.exp(-0.5))) / 2
    assert plain(z, y).item() == pytest.approx(bce, rel=1e-6) and abs(expected - bce) > 0.05


# ---------------------------------------------------------------------------------------------- end to end
def test_cprfl_with_all_three_parts_through_cli(tmp_path, monkeypatch, glyph_data):
    """model.name=cprfl + sampler group + loss grad_balance + diversity through main(): the Trainer draws with a
    GroupSampler, eval.json has a finite mAP, the best checkpoint holds the (trained) diversity module and state.pt
    the loss's G± sums."""
    import cimlic.engine

    built = []

    def spy(*args, **kwargs):
        built.append(build_sampler(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(cimlic.engine, "build_sampler", spy)
    cfg = {
        "name": "tiny_gefd",
        "data": {**glyph_data, "head_threshold": 5, "tail_threshold": 2},
        "model": {"name": "cprfl", "clip_arch": "cimlic-tiny-rn", "random_init": True,
                  "cprfl": {"freeze_backbone": True, "dim": 64, "ffn": 64}, "diversity": {"enabled": True}},
        "train": {"epochs": 2, "batch_size": 8, "num_workers": 0, "lr": 1e-3, "cache_dir": str(tmp_path / "cache")},
        "loss": {"name": "grad_balance"},
        "sampler": {"name": "group"},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(run)]) == 0
    assert len(built) == 1 and isinstance(built[0], GroupSampler)
    sampler, counts = built[0], built[0].counts  # counts: training positives per class (the validation part carved off)
    assert len(sampler) == len(sampler.targets) == counts.max()  # one draw per training image; a class is everywhere
    # the data.head_threshold / tail_threshold of the run (5, 2) made the groups, not the defaults (100, 20)
    assert sampler.group_names == ["head", "medium", "tail"]
    expected = [np.flatnonzero(counts >= 5), np.flatnonzero((counts >= 2) & (counts < 5)),
                np.flatnonzero((counts >= 1) & (counts < 2))]  # fmt: skip
    assert [g.tolist() for g in sampler.group_classes] == [e.tolist() for e in expected]
    result = json.loads((run / "eval.json").read_text())
    assert result["map"] == pytest.approx(sklearn_map(run), abs=1e-6) and result["num_images"] == 24
    saved = ckpt.read_checkpoint(run / "best")[0]
    diversity = {k.removeprefix("diversity."): v for k, v in saved.items() if k.startswith("diversity.")}
    assert set(diversity) == DIVERSITY_KEYS
    assert diversity["attn.in_proj_weight"].shape == (3 * 64, 64) and diversity["norm.weight"].shape == (64,)
    assert diversity["attn.out_proj.weight"].abs().sum() > 0  # trained away from its zero initialisation
    state = torch.load(run / "state.pt", map_location="cpu", weights_only=True)
    sums = state["loss"]
    assert set(sums) == {"pos_grad", "neg_grad"}
    assert sums["pos_grad"].shape == sums["neg_grad"].shape == (8,)  # the 8 classes of the generated world
    assert torch.isfinite(sums["pos_grad"]).all() and torch.isfinite(sums["neg_grad"]).all()
    # a sum is positive exactly where the training images hold such entries (one class is in every image: G- = 0)
    has_neg = (sampler.targets == 0).any(axis=0)
    assert not has_neg.all() and (counts > 0).all()
    assert ((sums["pos_grad"] > 0).numpy() == (counts > 0)).all() and ((sums["neg_grad"] > 0).numpy() == has_neg).all()
    assert state["epoch"] == 2 and state["step"] == 2 * math.ceil(len(sampler) / 8)  # batch 8, last batch kept
