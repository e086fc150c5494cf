"""Losses (METHODS §3): torch/hand-computed references, limiting cases, partial labels, building, errors."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from cimlic.config import LossConfig
from cimlic.losses import (
    AsymmetricLoss,
    BCELoss,
    ClassBalancedLoss,
    ClassSpecificEmbeddingLoss,
    DBStarLoss,
    DistributionBalancedLoss,
    FocalLoss,
    GradBalanceLoss,
    LMPTLoss,
    build_loss,
    list_losses,
)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _random_problem(seed: int = 0, b: int = 6, c: int = 4, unknown: float = 0.3):
    """(logits (B, C), targets (B, C) in {1, 0, -1}) with every row holding at least one known positive."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g) * 2
    targets = (torch.rand(b, c, generator=g) < 0.4).float()
    targets[torch.rand(b, c, generator=g) < unknown] = -1
    targets[:, 0] = 1
    return logits, targets


# ----------------------------------------------------------------------------------------------- BCE
def test_bce_equals_torch_mean():
    logits, targets = _random_problem(unknown=0.0)
    expected = F.binary_cross_entropy_with_logits(logits, targets)
    assert BCELoss()(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_bce_partial_equals_bce_over_known_subset():
    logits, targets = _random_problem(unknown=0.4)
    known = targets >= 0
    assert (~known).any()
    expected = F.binary_cross_entropy_with_logits(logits[known], targets[known])
    assert BCELoss()(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_partial_off_treats_unknown_as_negative():
    logits, targets = _random_problem(unknown=0.4)
    expected = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0))
    assert BCELoss(partial=False)(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


# --------------------------------------------------------------------------------------------- focal
def test_focal_hand_computed():
    p1, p2 = sig(1.5), sig(-0.5)
    term_pos = -0.25 * (1 - p1) ** 2 * math.log(p1)  # alpha_t = alpha on the positive
    term_neg = -0.75 * p2**2 * math.log(1 - p2)  # p_t = 1 - p on the negative, alpha_t = 1 - alpha
    out = FocalLoss(gamma=2.0, alpha=0.25)(t([[1.5, -0.5]]), t([[1, 0]]))
    assert out.item() == pytest.approx((term_pos + term_neg) / 2, rel=1e-5)


def test_focal_gamma0_equals_bce():
    logits, targets = _random_problem()
    assert FocalLoss(gamma=0.0)(logits, targets).item() == pytest.approx(BCELoss()(logits, targets).item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------- ASL
def test_asl_hand_computed_sum_and_mean():
    m = 0.05
    p0, p1, p2 = sig(2.0), sig(0.3), sig(-4.0)
    term0 = -((1 - p0) ** 1) * math.log(p0)  # positive, gamma+ = 1
    pm1 = p1 - m
    term1 = -(pm1**4) * math.log(1 - pm1)  # negative, gamma- = 4, shifted probability
    assert p2 < m  # p_m = 0: the easy negative is discarded entirely
    logits, targets = t([[2.0, 0.3, -4.0]]), t([[1, 0, 0]])
    asl = AsymmetricLoss(gamma_neg=4.0, gamma_pos=1.0, margin=m)
    assert asl(logits, targets).item() == pytest.approx(term0 + term1, rel=1e-5)
    asl_mean = AsymmetricLoss(gamma_neg=4.0, gamma_pos=1.0, margin=m, reduction="mean")
    assert asl_mean(logits, targets).item() == pytest.approx((term0 + term1) / 3, rel=1e-5)


def test_asl_without_focusing_and_margin_equals_bce_sum():
    logits, targets = _random_problem(unknown=0.0)
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    out = AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, margin=0.0)(logits, targets)
    assert out.item() == pytest.approx(expected.item(), rel=1e-5)


def test_asl_partial_sum_over_known_entries():
    logits, targets = _random_problem(unknown=0.4)
    known = targets >= 0
    expected = F.binary_cross_entropy_with_logits(logits[known], targets[known], reduction="sum")
    out = AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, margin=0.0)(logits, targets)
    assert out.item() == pytest.approx(expected.item(), rel=1e-5)


def test_asl_detach_focusing_same_value_different_gradient():
    logits, targets = _random_problem(unknown=0.0)
    values, grads = [], []
    for detach in (False, True):
        z = logits.clone().requires_grad_()
        loss = AsymmetricLoss(gamma_pos=1.0, detach_focusing=detach)(z, targets)
        loss.backward()
        values.append(loss.item())
        grads.append(z.grad)
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    assert not torch.allclose(grads[0], grads[1], atol=1e-4)
    assert torch.is_grad_enabled()


# ------------------------------------------------------------------------------------------------ CB
@pytest.mark.parametrize("base", ["bce", "focal"])
def test_class_balanced_hand_computed(base):
    raw = [(1 - 0.9) / (1 - 0.9**1), (1 - 0.9) / (1 - 0.9**10)]  # counts 1 and 10
    w = [r * 2 / sum(raw) for r in raw]  # normalised to sum to C = 2
    q0 = sig(0.4)  # class 0 negative, logit 0.4
    q1 = sig(-1.2)  # class 1 positive, logit -1.2
    e0, e1 = -math.log(1 - q0), -math.log(q1)
    if base == "focal":
        e0, e1 = q0**2 * e0, (1 - q1) ** 2 * e1
    out = ClassBalancedLoss([1, 10], beta=0.9, base=base, gamma=2.0)(t([[0.4, -1.2]]), t([[0, 1]]))
    assert out.item() == pytest.approx((w[0] * e0 + w[1] * e1) / 2, rel=1e-5)


# ------------------------------------------------------------------------------------------------ DB
DB_LOGITS = [[0.5, -1.0], [1.2, 0.3]]
DB_TARGETS = [[1, 0], [1, 1]]


def _db_expected(
    convention: str = "paper", star: bool = False, pos_scale: float = 1.0, batch_focal: bool = False
) -> float:
    """DB on DB_LOGITS/DB_TARGETS with n = (2, 8), N = 10, defaults alpha .1 beta 10 mu .3 kappa .05 lam 5.

    ``pos_scale`` multiplies the positive logits; ``batch_focal`` is the released bug: one focal factor
    2 (1 - exp(-mean BCE))^2 from the unweighted BCE of the regularised logits, times the mean weighted BCE.
    """
    n, N, lam, kappa = [2.0, 8.0], 10.0, 5.0, 0.05
    scale = [pos_scale * n[0] / max(n), pos_scale * n[1] / max(n)] if star else [pos_scale, pos_scale]
    total, bce_total = 0.0, 0.0
    for z_row, y_row in zip(DB_LOGITS, DB_TARGETS, strict=True):
        denom = sum(1 / n[k] for k in range(2) if y_row[k] == 1)
        for c in range(2):
            r = (1 / n[c]) / denom
            w = 0.1 + sig(10 * (r - 0.3))
            b = -math.log(N / n[c] - 1)
            z = z_row[c] + (kappa * b if convention == "paper" else kappa * b / lam)
            if y_row[c] == 1:
                pt, bce = sig(scale[c] * z), math.log(1 + math.exp(-scale[c] * z))
                weight = w
            else:
                pt, bce = sig(-lam * z), math.log(1 + math.exp(lam * z))
                weight = w / lam
            bce_total += bce
            total += weight * bce * (1.0 if batch_focal else 2 * (1 - pt) ** 2)
    if batch_focal:
        return 2 * (1 - math.exp(-bce_total / 4)) ** 2 * total / 4
    return total / 4


@pytest.mark.parametrize("convention", ["paper", "released"])
def test_db_hand_computed(convention):
    db = DistributionBalancedLoss([2, 8], 10, bias_convention=convention)
    assert db(t(DB_LOGITS), t(DB_TARGETS)).item() == pytest.approx(_db_expected(convention), rel=1e-5)


def test_db_star_hand_computed():
    db = DBStarLoss([2, 8], 10)
    assert db(t(DB_LOGITS), t(DB_TARGETS)).item() == pytest.approx(_db_expected(star=True), rel=1e-5)
    assert _db_expected(star=True) != pytest.approx(_db_expected(), rel=1e-3)


@pytest.mark.parametrize("star", [False, True])
def test_db_pos_scale_hand_computed(star):
    """HP-DVAL's released DB: a constant scale 10 on the positive logits, on top of DB's (or DB*'s) weights."""
    cls = DBStarLoss if star else DistributionBalancedLoss
    db = cls([2, 8], 10, bias_convention="released", pos_scale=10.0)
    expected = _db_expected("released", star=star, pos_scale=10.0)
    assert db(t(DB_LOGITS), t(DB_TARGETS)).item() == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(_db_expected("released", star=star), rel=1e-2)


def test_db_batch_focal_factor_hand_computed(caplog):
    """The released DB copies' bug, on request: one focal factor per batch (and a warning saying so)."""
    with caplog.at_level("WARNING", logger="cimlic.losses"):
        db = DistributionBalancedLoss([2, 8], 10, bias_convention="released", focal_reduction="batch")
    assert "bug" in caplog.text
    logits = t(DB_LOGITS).requires_grad_(True)
    value = db(logits, t(DB_TARGETS))
    assert value.item() == pytest.approx(_db_expected("released", batch_focal=True), rel=1e-5)
    assert value.item() != pytest.approx(_db_expected("released"), rel=1e-2)
    value.backward()  # the factor stays in the graph, as released (p_t from a clone of the logits)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="focal_reduction"):
        DistributionBalancedLoss([2, 8], 10, focal_reduction="class")
    with pytest.raises(ValueError, match="pos_scale"):
        DistributionBalancedLoss([2, 8], 10, pos_scale=0.0)


def test_db_batch_focal_partial_ignores_unknown_entries():
    logits, targets = _random_problem()
    db = DistributionBalancedLoss([30, 10, 5, 2], 40, focal_reduction="batch")
    changed = logits.clone()
    changed[targets == -1] += 5.0  # unknown entries move; the loss must not
    assert db(changed, targets).item() == pytest.approx(db(logits, targets).item(), rel=1e-6)


def test_db_all_switches_off_equals_bce():
    logits, targets = _random_problem()
    db = DistributionBalancedLoss([30, 10, 5, 2], 40, reweight=False, neg_tolerant=False, focal=False)
    assert db(logits, targets).item() == pytest.approx(BCELoss()(logits, targets).item(), rel=1e-6)


def test_db_conventions_differ_exactly_by_bias_scaling():
    logits, targets = _random_problem()
    counts, n = [30, 10, 5, 2], 40
    released = DistributionBalancedLoss(counts, n, kappa=0.05, lam=5.0, bias_convention="released")(logits, targets)
    paper_scaled = DistributionBalancedLoss(counts, n, kappa=0.05 / 5.0, lam=5.0)(logits, targets)
    paper = DistributionBalancedLoss(counts, n, kappa=0.05, lam=5.0)(logits, targets)
    assert released.item() == pytest.approx(paper_scaled.item(), rel=1e-6)
    assert released.item() != pytest.approx(paper.item(), rel=1e-4)


def test_db_shift_only_in_training_mode():
    logits, targets = _random_problem()
    db = DistributionBalancedLoss([30, 10, 5, 2], 40, kappa=0.05)
    no_shift = DistributionBalancedLoss([30, 10, 5, 2], 40, kappa=0.0)
    train_value = db(logits, targets)
    eval_value = db.eval()(logits, targets)
    assert eval_value.item() == pytest.approx(no_shift(logits, targets).item(), rel=1e-6)
    assert train_value.item() != pytest.approx(eval_value.item(), rel=1e-4)


def test_db_star_equal_counts_equals_db():
    logits, targets = _random_problem()
    for convention in ("paper", "released"):
        star = DBStarLoss([7, 7, 7, 7], 20, bias_convention=convention)(logits, targets)
        plain = DistributionBalancedLoss([7, 7, 7, 7], 20, bias_convention=convention)(logits, targets)
        assert star.item() == pytest.approx(plain.item(), rel=1e-6)


def test_db_extreme_counts_are_finite(caplog):
    with caplog.at_level(logging.WARNING, logger="cimlic.losses"):
        db = DistributionBalancedLoss([10, 5, 0], 10, kappa=1.0)  # n_c = N, N/2 and 0
    assert "clamped to 1" in caplog.text
    shift = db.logit_shift.tolist()
    assert shift[0] == pytest.approx(math.log(2 * 10), rel=1e-6)  # N - n_c clamped at 1/2
    assert shift[1] == pytest.approx(0.0, abs=1e-7)
    assert shift[2] == pytest.approx(-math.log(10 / 1 - 1), rel=1e-6)
    logits, targets = _random_problem(c=3)
    assert torch.isfinite(db(logits, targets))


def test_db_image_without_known_positive_takes_weight_limit():
    db = DistributionBalancedLoss([5, 20], 30, alpha=0.1)
    y = t([[0, 0], [1, 0]])
    w = db.rebalance_weight(y, torch.ones_like(y))
    assert w[0].tolist() == pytest.approx([1.1, 1.1])  # r -> infinity: alpha + 1
    assert torch.isfinite(db(t([[0.3, -0.2], [1.0, 2.0]]), t([[0, -1], [1, 0]])))


# ------------------------------------------------------------------------------------- grad balance
def test_grad_balance_hand_computed_two_steps():
    f1 = sig(12 * (1.0 - 0.8))  # empty sums: g = 1
    pw1, nw1 = 1 + 4 * (1 - f1), f1
    e_pos, e_neg = math.log(1 + math.exp(-0.7)), math.log(1 + math.exp(-0.2))  # BCE of z=0.7 (y=1), z=-0.2 (y=0)
    loss = GradBalanceLoss(2)
    logits, targets = t([[0.7, -0.2]]), t([[1, 0]])
    assert loss(logits, targets).item() == pytest.approx((pw1 * e_pos + nw1 * e_neg) / 2, rel=1e-5)
    # sums after one step: |dL/dz| of the weighted BCE elements
    assert loss.pos_grad.tolist() == pytest.approx([pw1 * (1 - sig(0.7)), 0.0], rel=1e-5)
    assert loss.neg_grad.tolist() == pytest.approx([0.0, nw1 * sig(-0.2)], rel=1e-5)
    # step 2: class 0 has seen no negative gradient (g = 1), class 1 no positive one (g = 0)
    nw2 = sig(12 * (0.0 - 0.8))
    assert loss(logits, targets).item() == pytest.approx((pw1 * e_pos + nw2 * e_neg) / 2, rel=1e-5)


def test_grad_balance_increments_match_autograd_focal():
    logits, targets = _random_problem(unknown=0.3)
    loss = GradBalanceLoss(4, base="focal", focal_gamma=2.0)
    pos_w, neg_w = loss.class_weights()
    loss(logits, targets)
    # reference: autograd of the weighted focal sum over known entries
    z = logits.clone().requires_grad_()
    p = torch.sigmoid(z)
    y, known = (targets == 1).float(), (targets >= 0).float()
    pt = y * p + (1 - y) * (1 - p)
    weight = y * pos_w + (1 - y) * neg_w
    (weight * known * -((1 - pt) ** 2) * torch.log(pt)).sum().backward()
    g = z.grad.abs()
    assert loss.pos_grad.tolist() == pytest.approx((g * y).sum(0).tolist(), rel=1e-4, abs=1e-7)
    assert loss.neg_grad.tolist() == pytest.approx((g * (1 - y) * known).sum(0).tolist(), rel=1e-4, abs=1e-7)


def test_grad_balance_moves_rare_classes_toward_balance():
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = (torch.rand(512, 3) < torch.tensor([0.5, 0.05, 0.02])).float()  # class 0 balanced, 1 and 2 rare
    model = torch.nn.Linear(8, 3)
    loss = GradBalanceLoss(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ratios = []
    for _ in range(60):
        idx = torch.randint(0, 512, (64,))
        value = loss(model(x[idx]), y[idx])
        opt.zero_grad()
        value.backward()
        opt.step()
        ratios.append(loss.pos_grad / loss.neg_grad)
    pos_w, neg_w = loss.class_weights()
    assert (pos_w[1:] > 2.0).all() and (pos_w[1:] > pos_w[0]).all()  # rare positives up-weighted
    assert (neg_w[1:] < 0.5).all() and (neg_w[1:] < neg_w[0]).all()  # their negatives down-weighted
    assert (ratios[-1][1:] > 5 * ratios[0][1:]).all()  # the gradient ratio G+/G- rises toward balance
    assert pos_w[0] < 1.5 and neg_w[0] > 0.8  # the balanced class stays near weight 1


def test_grad_balance_eval_mode_does_not_update():
    logits, targets = _random_problem()
    loss = GradBalanceLoss(4).eval()
    loss(logits, targets)
    assert loss.pos_grad.abs().sum() == 0 and loss.neg_grad.abs().sum() == 0


def test_grad_balance_all_reduces_increments(monkeypatch):
    logits, targets = _random_problem()
    single = GradBalanceLoss(4)
    single(logits, targets)
    calls = []

    def fake_all_reduce(tensor, *args, **kwargs):  # two identical ranks: the sum doubles
        calls.append(tuple(tensor.shape))
        tensor.mul_(2)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    multi = GradBalanceLoss(4)
    multi(logits, targets)
    assert calls == [(2, 4)]
    assert torch.allclose(multi.pos_grad, 2 * single.pos_grad)
    assert torch.allclose(multi.neg_grad, 2 * single.neg_grad)


# ---------------------------------------------------------------------------------------- CSE / LMPT
def test_cse_hand_computed():
    n = [1.0, 16.0, 81.0]
    omega = [k**-2 for k in n]
    omega = [o / sum(omega) for o in omega]
    margin = [0.2 / k**0.25 for k in n]
    d0 = 1 - 1 / math.sqrt(2)  # e = (1, 0) vs t0 = (1, 1): positive pays d
    d1 = 1 - 0.0  # vs t1 = (0, 1): negative, relu(0.1 - 1) = 0
    d2 = 1 - 1 / math.sqrt(1 + 0.1**2)  # vs t2 = (1, 0.1): negative inside its margin
    terms = [d0, max(margin[1] - d1, 0.0), max(margin[2] - d2, 0.0)]
    assert terms[2] > 0
    expected = sum(o * term for o, term in zip(omega, terms, strict=True))
    cse = ClassSpecificEmbeddingLoss(n, gamma=2.0, margin_scale=0.2)
    emb, prompts = t([[1, 0]]), t([[1, 1], [0, 1], [1, 0.1]])
    out = cse(torch.zeros(1, 3), t([[1, 0, 0]]), caption_emb=emb, prompt_emb=prompts)
    assert out.item() == pytest.approx(expected, rel=1e-5)
    # all negative: only class 2 lies inside its margin (d0 = 0.29 > m0 = 0.2)
    out = cse(torch.zeros(1, 3), t([[0, 0, 0]]), caption_emb=emb, prompt_emb=prompts)
    assert out.item() == pytest.approx(omega[2] * (margin[2] - d2), rel=1e-5)


def test_lmpt_combines_db_and_cse_and_needs_embeddings():
    logits, targets = _random_problem()
    emb, prompts = torch.randn(6, 5), torch.randn(4, 5)
    counts, n = [30, 10, 5, 2], 40
    loss = build_loss(LossConfig(name="lmpt"), counts, n)
    db = DistributionBalancedLoss(counts, n)(logits, targets)
    cse = ClassSpecificEmbeddingLoss(counts)(logits, targets, caption_emb=emb, prompt_emb=prompts)
    out = loss(logits, targets, caption_emb=emb, prompt_emb=prompts)
    assert out.item() == pytest.approx(0.5 * db.item() + 0.5 * cse.item(), rel=1e-6)
    assert set(loss.last_parts) == {"db", "cse"}
    with pytest.raises(ValueError, match="caption_emb"):
        loss(logits, targets)
    assert isinstance(loss, LMPTLoss)


# -------------------------------------------------------------------------------------- every loss
@pytest.mark.parametrize("name", list_losses())
def test_every_loss_builds_and_ignores_unknown_entries(name):
    counts, n = torch.tensor([60, 20, 5, 1]), 80
    loss = build_loss(LossConfig(name=name), counts, n)
    logits, targets = _random_problem(seed=1)
    unknown = targets < 0
    assert unknown.any()
    extra = {"caption_emb": torch.randn(6, 8), "prompt_emb": torch.randn(4, 8)} if name == "lmpt" else {}
    reference = copy.deepcopy(loss)  # grad_balance updates its buffers on each training call
    z = logits.clone().requires_grad_()
    out = loss(z, targets, **extra)
    assert out.dim() == 0 and torch.isfinite(out)
    out.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert (z.grad[unknown] == 0).all()
    changed = logits.clone()
    changed[unknown] = torch.randn(int(unknown.sum())) * 50
    assert reference(changed, targets, **extra).item() == pytest.approx(out.item(), rel=1e-6)


def test_list_losses_names():
    assert list_losses() == ["bce", "focal", "asl", "cb", "db", "db_star", "grad_balance", "lmpt"]


def test_unknown_loss_name_lists_valid_choices():
    with pytest.raises(ValueError, match=r"unknown loss 'nope'.*'bce'.*'lmpt'"):
        build_loss(LossConfig(name="nope"), [1, 2], 3)


def test_statistics_required_and_options_checked():
    with pytest.raises(ValueError, match="class_counts"):
        build_loss(LossConfig(name="cb"))
    with pytest.raises(ValueError, match="num_images"):
        build_loss(LossConfig(name="db"), [3, 4])
    with pytest.raises(ValueError, match="reduction"):
        AsymmetricLoss(reduction="none")
    assert isinstance(build_loss(LossConfig(name="bce")), BCELoss)
