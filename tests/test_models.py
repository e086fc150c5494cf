"""Prompt baselines on tiny random CLIPs: contract, cache equivalence, trainable set, gradients, numerics."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from cimlic.config import LossConfig, ModelConfig
from cimlic.losses import build_loss
from cimlic.models import METHODS, ClipError, build_model
from cimlic.models.dualcoop import DualCoOpConfig, dualcoop_aggregate
from cimlic.models.linear_probe import LinearProbeConfig
from cimlic.models.zeroshot import ZeroShotCLIP

CLASSES = ["dog", "cat", "traffic light", "potted_plant"]
ARCHS = ["cimlic-tiny-vit", "cimlic-tiny-rn"]
EXPECTED_TRAINABLE = {
    "zeroshot": set(),
    "linear_probe": {"head.weight", "head.bias"},
    "coop": {"prompt.ctx"},
    "dualcoop": {"prompt_pos.ctx", "prompt_neg.ctx"},
    "lmpt": {"prompt.ctx"},
}


BUILDABLE = [name for name, spec in METHODS.items() if spec.build is not None]  # every one-run method
STATE_BUFFERS = {"trmml": {"visual_proto", "proto_seen", "pos_threshold", "neg_threshold", "threshold_ready"}}


def _build(name: str, arch: str = "cimlic-tiny-vit", **overrides):
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, clip_arch=arch, random_init=True, **overrides)
    return build_model(cfg, CLASSES)


def _images(model, n: int = 3, seed: int = 0) -> torch.Tensor:
    size = model.clip.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------ the contract
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", BUILDABLE)
def test_forward_and_cache_equivalence(name, arch):
    model = _build(name, arch).eval()
    x = _images(model)
    with torch.no_grad():
        logits = model({"image": x})["logits"]
        feats = model.image_features(x)  # what the feature cache stores
        cached = model({f"feat_{k}": v for k, v in feats.items()})["logits"]
    assert logits.shape == (3, len(CLASSES)) and torch.isfinite(logits).all()
    torch.testing.assert_close(cached, logits, rtol=0, atol=1e-6)
    trains_tower = {"hpdval_stage1", "hpdval_joint", "cprfl"}  # those train the image tower (cprfl: by default)
    assert (model.feature_tower is not None) is (name not in trains_tower)
    assert set(feats) == set(model.feature_keys)
    if name != "cprfl":  # CPRFL's features have the backbone's width, not CLIP's embedding width
        assert feats["global"].shape == (3, model.clip.embed_dim)
    model.train()
    assert not any(m.training for m in model.clip.modules())


@pytest.mark.parametrize("name", BUILDABLE)
def test_trainable_parameters_and_gradients(name):
    model = _build(name).train()
    trainable = _trainable(model)
    if name in EXPECTED_TRAINABLE:
        assert trainable == EXPECTED_TRAINABLE[name]
    assert not any(n.startswith("clip.") for n in trainable)
    assert not any(p.requires_grad for p in model.clip.parameters())
    # checkpoints hold exactly the trainable tensors once CLIP's are left out (derived buffers are not persistent),
    # plus the training state kept in persistent buffers (TRM-ML's prototypes and thresholds)
    state = STATE_BUFFERS.get(name, set())
    assert {k for k in model.state_dict() if not k.startswith(model.frozen_prefixes())} == trainable | state
    if name == "trmml":  # its MLP's last layer starts at zero (pure attention pooling): as after some training
        torch.nn.init.normal_(model.mlp[-1].weight, std=0.02)
    out = model({"image": _images(model)})
    if not trainable:
        assert not out["logits"].requires_grad
        return
    out["logits"].square().sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in model.clip.parameters())


# ---------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("arch", ARCHS)
def test_zeroshot_equals_open_clip(arch):
    model = _build("zeroshot", arch)
    x = _images(model)
    oc = model.clip.model  # the open_clip CLIP itself
    tokens = open_clip.get_tokenizer(arch)([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES])
    with torch.no_grad():
        img = F.normalize(oc.encode_image(x), dim=-1)
        txt = F.normalize(oc.encode_text(tokens), dim=-1)
        expected = oc.logit_scale.exp() * img @ txt.T
        got = model({"image": x})["logits"]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("csc", [False, True])
def test_coop_from_words_equals_zeroshot(csc):
    coop = _build("coop", ctx_init="a photo of a", csc=csc)
    assert coop.prompt.n_ctx == 4
    assert coop.prompt.ctx.shape == ((len(CLASSES), 4, 128) if csc else (4, 128))
    zeroshot = ZeroShotCLIP(coop.clip, CLASSES, ["a photo of a {}."])
    x = _images(coop)
    with torch.no_grad():
        torch.testing.assert_close(coop({"image": x})["logits"], zeroshot({"image": x})["logits"], rtol=0, atol=1e-5)


def test_coop_random_context_shapes():
    shared, specific = _build("coop", n_ctx=8), _build("coop", n_ctx=8, csc=True)
    assert shared.prompt.ctx.shape == (8, 128) and specific.prompt.ctx.shape == (len(CLASSES), 8, 128)
    assert shared.prompt.ctx.std().item() == pytest.approx(0.02, rel=0.2)
    with pytest.raises(ValueError, match="'traffic light' needs .* tokens but CLIP 'cimlic-tiny-vit' holds 32"):
        _build("coop", n_ctx=28)


def test_template_ensemble_equals_manual_average():
    templates = ["a photo of a {}.", "a drawing of the {}.", "itap of a {}."]
    model = _build("zeroshot", templates=templates)
    clip = model.clip
    names = [c.replace("_", " ") for c in CLASSES]
    with torch.no_grad():
        per = [F.normalize(clip.encode_text(clip.tokenize([t.format(c) for c in names])), dim=-1) for t in templates]
        expected = F.normalize(torch.stack(per).mean(0), dim=-1)  # (C, D)
    torch.testing.assert_close(model.text_features(), expected, rtol=0, atol=1e-6)
    x = _images(model)
    with torch.no_grad():
        img = F.normalize(clip.encode_image(x), dim=-1)
        torch.testing.assert_close(model({"image": x})["logits"], clip.logit_scale * img @ expected.T)
    with pytest.raises(ValueError, match="slot"):
        _build("zeroshot", templates=["no slot"])


def test_dualcoop_aggregate_by_hand():
    s_pos = torch.tensor([[[0.5], [0.1]]])  # (B=1, N=2, C=1)
    s_neg = torch.tensor([[[0.2], [0.3]]])
    a1 = 1 / (1 + math.exp(-20 * (0.5 - 0.1)))  # softmax over the two regions at tau_s = 20
    expected = 5 * (a1 * 0.5 + (1 - a1) * 0.1) - 5 * (a1 * 0.2 + (1 - a1) * 0.3)
    assert dualcoop_aggregate(s_pos, s_neg, 20.0, 5.0).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_dualcoop_matches_formula(arch):
    model = _build("dualcoop", arch, n_ctx=4, dualcoop=DualCoOpConfig(n_ctx_neg=6)).eval()
    x = _images(model, n=2)
    with torch.no_grad():
        local = model.image_features(x)["local"]  # (B, N, D)
        s_pos, s_neg = model.region_scores(local)  # (B, N, C)
        logits = model({"image": x})["logits"]
    B, N, C = s_pos.shape
    assert s_pos.shape == (2, local.shape[1], len(CLASSES))
    for b in range(B):
        for c in range(C):
            w = [math.exp(20 * s_pos[b, r, c].item()) for r in range(N)]
            a = [wr / sum(w) for wr in w]
            pos = 5 * sum(a[r] * s_pos[b, r, c].item() for r in range(N))
            neg = 5 * sum(a[r] * s_neg[b, r, c].item() for r in range(N))
            assert logits[b, c].item() == pytest.approx(pos - neg, abs=1e-5)
    # region scores are cosines of the local tokens with the prompt text features
    t_pos, _ = model.prompt_features()
    torch.testing.assert_close(s_pos[0, 0, 1], F.cosine_similarity(local[0, 0], t_pos[1], dim=0), rtol=0, atol=1e-6)


def test_dualcoop_learnable_temperatures():
    model = _build("dualcoop", dualcoop=DualCoOpConfig(learn_temps=True, tau_s=10.0, tau=2.0), csc=True)
    assert _trainable(model) == {"prompt_pos.ctx", "prompt_neg.ctx", "log_tau_s", "log_tau"}
    assert model.tau_s.item() == pytest.approx(10.0) and model.tau.item() == pytest.approx(2.0)
    model({"image": _images(model)})["logits"].square().sum().backward()
    assert model.log_tau_s.grad is not None and model.log_tau.grad is not None
    with pytest.raises(KeyError, match="'feat_global' and 'feat_local'"):
        model({"feat_global": torch.zeros(2, 128)})


def test_lmpt_loss_inputs():
    model = _build("lmpt").train()
    assert model.prompt.csc and model.prompt.ctx.shape[0] == len(CLASSES)
    captions = ["a dog on a sofa.", "a cat next to a traffic light and a potted plant."]
    tokens = model.tokenize_captions(captions)
    out = model({"image": _images(model, n=2), "caption_tokens": tokens})
    inputs = out["loss_inputs"]
    assert inputs["prompt_emb"].shape == (len(CLASSES), 128) and inputs["caption_emb"].shape == (2, 128)
    torch.testing.assert_close(inputs["caption_emb"], model.clip.encode_text(tokens))
    assert not inputs["caption_emb"].requires_grad and inputs["prompt_emb"].requires_grad
    # the LMPT loss takes them as keyword arguments; its CSE part reaches the context through prompt_emb
    loss_fn = build_loss(LossConfig(name="lmpt"), class_counts=torch.tensor([50.0, 20.0, 5.0, 2.0]), num_images=60)
    targets = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 1]])
    loss = loss_fn(out["logits"], targets, **inputs)
    loss.backward()
    assert torch.isfinite(loss) and model.prompt.ctx.grad.abs().sum() > 0
    assert "loss_inputs" not in model.eval()({"image": _images(model, n=2)})
    with pytest.raises(ValueError, match="caption_tokens must be"):
        model({"image": _images(model, n=2), "caption_tokens": tokens[:, :5]})


# ------------------------------------------------------------------------------------------- build
def test_build_model_errors():
    with pytest.raises(ValueError, match=r"unknown model 'nope'; valid: \['zeroshot', 'linear_probe', 'coop'"):
        build_model(ModelConfig(name="nope", random_init=True), CLASSES)
    with pytest.raises(ClipError, match="no weights for CLIP 'RN50'"):
        build_model(ModelConfig(name="coop"), CLASSES)
    with pytest.raises(ValueError, match="no class names"):
        build_model(ModelConfig(name="coop", clip_arch="cimlic-tiny-vit", random_init=True), [])
    with pytest.raises(KeyError, match="needs 'image' or cached 'feat_global'"):
        _build("coop")({"target": torch.zeros(1, 4)})


def test_linear_probe_dropout_and_normalisation():
    model = _build("linear_probe", linear_probe=LinearProbeConfig(dropout=0.5))
    assert model.dropout.p == 0.5 and model.normalize
    feats = torch.randn(4, 128)
    with torch.no_grad():
        got = model.eval()({"feat_global": feats})["logits"]
        torch.testing.assert_close(got, model.head(F.normalize(feats, dim=-1)))


@pytest.mark.parametrize("arch", ARCHS)
def test_linear_probe_zeroshot_init_equals_zeroshot(arch):
    """linear_probe.init=zeroshot: before training the probe's logits are zero-shot CLIP's, and it still trains."""
    probe = _build("linear_probe", arch, linear_probe=LinearProbeConfig(init="zeroshot")).eval()
    zeroshot = _build("zeroshot", arch).eval()
    x = _images(probe)
    with torch.no_grad():
        torch.testing.assert_close(
            probe({"image": x})["logits"], zeroshot({"image": x})["logits"], rtol=1e-5, atol=1e-5
        )
    assert probe.head.weight.requires_grad
    random = _build("linear_probe", arch)
    assert not torch.allclose(random.head.weight, probe.head.weight)
    with pytest.raises(ValueError, match="do not fit the probe"):
        probe.init_from_text(torch.randn(2, probe.head.weight.shape[1]))
