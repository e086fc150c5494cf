"""CPRFL on tiny random CLIPs and tiny torchvision/timm backbones: shapes, the score and PI numerics, the dual-path
gradient switches, frozen/trainable parts, the diversity module, backbone weights files, and one run through main()."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from safetensors.torch import save_file

from cimlic import checkpoint as ckpt
from cimlic.apps.cli import main
from cimlic.cache import weights_digest
from cimlic.config import ModelConfig
from cimlic.errors import ConfigError
from cimlic.models import build_model
from cimlic.models.backbones import build_backbone, list_backbones
from cimlic.models.cprfl import CPRFL, CPRFLConfig, VSILayer
from cimlic.models.diversity import DiversityConfig
from runs import sklearn_map

CLASSES = ["dog", "cat", "traffic light", "potted_plant"]
NEEDS_TIMM = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed (optional)")
SMALL = dict(ffn=64)  # a small VSI feed-forward keeps the tests fast
BACKBONES = [  # (clip arch, cprfl overrides)
    ("cimlic-tiny-vit", dict(backbone="clip")),
    ("cimlic-tiny-rn", dict(backbone="clip")),
    ("cimlic-tiny-vit", dict(backbone="resnet18", image_size=64, dim=64)),
    pytest.param("cimlic-tiny-vit", dict(backbone="timm:resnet18", image_size=32, dim=64), marks=NEEDS_TIMM),
]


def _build(arch: str = "cimlic-tiny-vit", diversity: bool = False, **cprfl) -> CPRFL:
    torch.manual_seed(0)  # the same random CLIP and head in every build
    cfg = ModelConfig(name="cprfl", clip_arch=arch, random_init=True, cprfl=CPRFLConfig(**(SMALL | cprfl)),
                      diversity=DiversityConfig(enabled=diversity, heads=4, dropout=0.0))  # fmt: skip
    return build_model(cfg, CLASSES)


def _images(model: CPRFL, n: int = 2, seed: int = 0) -> torch.Tensor:
    size = model.input_spec()[0]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------- shapes, numerics
@pytest.mark.parametrize(("arch", "over"), BACKBONES, ids=["clip-vit", "clip-rn", "torchvision", "timm"])
def test_shapes_and_classifier_by_hand(arch, over):
    model = _build(arch, **over).eval()
    x = _images(model)
    with torch.no_grad():
        parts = model.parts({"image": x})
        logits = model({"image": x})["logits"]
    d = parts["prompts"].shape[1]
    assert logits.shape == (2, len(CLASSES)) and torch.isfinite(logits).all()
    assert parts["visual"].shape[::2] == (2, d) and parts["refined"].shape == (2, len(CLASSES), d)
    assert parts["visual"].shape[1] == model.backbone(x).shape[1]  # v backbone tokens
    for b in range(2):  # s_c = sigma(p'_c . p_c): each refined feature against its own prompt
        for c in range(len(CLASSES)):
            expected = torch.dot(parts["refined"][b, c], parts["prompts"][c])
            assert logits[b, c].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)
    size, mean, std = model.input_spec()
    if over["backbone"] == "clip":
        assert (size, mean, std) == (model.clip.image_size, model.clip.image_mean, model.clip.image_std)
    else:
        assert size == over["image_size"] and mean == pytest.approx((0.485, 0.456, 0.406))


def test_prompt_init_is_the_mlp_of_encode_text():
    model = _build()
    clip = model.clip
    tokens = clip.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES])
    with torch.no_grad():
        W = clip.encode_text(tokens)  # (C, D), CLIP's own text path
        fc1, act, fc2 = model.pi
        expected = fc2(F.gelu(fc1(W)))  # GELU(W W1 + b1) W2 + b2
        torch.testing.assert_close(model.text_features(), W, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.prompts(), expected, rtol=0, atol=1e-6)
    assert fc1.out_features == model.prompts().shape[1] // 2 and isinstance(act, torch.nn.GELU)  # hidden d / 2
    assert "text_embeddings" not in model.state_dict()  # derived from class names: not persistent


@pytest.mark.parametrize("residual", [False, True])
def test_vsi_layer_equals_full_pre_norm_layer(residual):
    """Only the prompt queries are computed; that equals a full pre-norm layer over [F; P] cut to its last C outputs."""
    torch.manual_seed(0)
    layer = VSILayer(16, heads=2, head_dim=6, ffn=32, dropout=0.0, residual=residual).eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        got = layer(x, n_out=3)
        h = layer.norm1(x)
        q = layer.q(h).view(2, 7, 2, 6).transpose(1, 2)
        k, v = layer.kv(h).view(2, 7, 2, 2, 6).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(6), dim=-1) @ v  # (B, H, T, hd)
        y = layer.out(attn.transpose(1, 2).reshape(2, 7, 12))
        y = x + y if residual else y
        y = y + layer.ffn(layer.norm2(y)) if residual else layer.ffn(layer.norm2(y))
    torch.testing.assert_close(got, y[:, -3:], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="must be >= 1 and divide"):
        VSILayer(10, heads=3)


# --------------------------------------------------------------------------------------- gradients
def _pi_grads(model: CPRFL, x: torch.Tensor, vsi: bool, dot: bool) -> list[torch.Tensor | None]:
    model.vsi_path, model.dot_path = vsi, dot
    model.zero_grad(set_to_none=True)
    weights = torch.linspace(-1, 1, len(CLASSES))  # a generic (non-symmetric) loss
    (model({"image": x})["logits"] * weights).sum().backward()
    return [None if p.grad is None else p.grad.clone() for p in model.pi.parameters()]


def test_dual_path_gradients_add_up_and_switches_cut_them():
    model = _build().eval()  # eval: no dropout, so the four passes see the same function
    x = _images(model)
    both, vsi_only, dot_only = (_pi_grads(model, x, *s) for s in [(True, True), (True, False), (False, True)])
    for g, gv, gd in zip(both, vsi_only, dot_only, strict=True):
        assert gv.abs().sum() > 0 and gd.abs().sum() > 0  # each path alone still reaches the PI MLP
        torch.testing.assert_close(g, gv + gd, rtol=1e-4, atol=1e-6)  # dual path = the sum of the two paths
    assert all(g is None for g in _pi_grads(model, x, False, False))  # both cut: the PI MLP gets nothing
    assert model.phi.weight.grad.abs().sum() > 0  # the rest still trains


def test_gradient_reaches_backbone_phi_and_vsi():
    model = _build().train()
    assert not any(n.startswith(("clip.", "text_encoder.")) for n in _trainable(model))
    assert {n.split(".")[0] for n in _trainable(model)} == {"backbone", "phi", "pi", "vsi"}
    model({"image": _images(model)})["logits"].square().sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.clip.parameters())
    assert "proj" not in dict(model.backbone.trunk.named_parameters())  # CLIP's projection is not part of the trunk


# ------------------------------------------------------------------------------- frozen / trainable
def test_text_tower_frozen_by_default_trainable_with_switch(tmp_path):
    frozen = _build()
    assert frozen.text_encoder is None and not any(p.requires_grad for p in frozen.clip.parameters())
    model = _build(train_text=True).train()
    text = {n for n in _trainable(model) if n.startswith("text_encoder.")}
    assert "text_encoder.model.token_embedding.weight" in text and "text_encoder.model.logit_scale" not in text
    assert not any(n.startswith("text_encoder.model.visual") for n in model.state_dict())  # no image-tower copy
    torch.testing.assert_close(model.text_features(), frozen.text_features(), rtol=0, atol=1e-5)  # same W at init
    digest = weights_digest(model.clip)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model({"image": _images(model)})["logits"].square().mean().backward()
    assert model.text_encoder.model.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.allclose(model.text_features(), frozen.text_features())  # W moves with the text tower
    assert weights_digest(model.clip) == digest  # the run's CLIP itself stays frozen (clip.json check holds)
    # the trained text tower travels in the checkpoint
    ckpt.save_checkpoint(tmp_path / "best", model, {"classnames": CLASSES})
    again = _build(train_text=True)
    ckpt.load_checkpoint(tmp_path / "best", again)
    x = _images(model)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()({"image": x})["logits"], model.eval()({"image": x})["logits"])


def test_freeze_backbone():
    model = _build("cimlic-tiny-rn", freeze_backbone=True).train()  # a ResNet: batch-norm must stay in eval mode
    assert model.feature_tower is model.backbone and "backbone" in model.frozen_parts()
    assert not model.backbone.training
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert {n.split(".")[0] for n in _trainable(model)} == {"phi", "pi", "vsi"}
    assert not any(k.startswith("backbone.") for k in ckpt.trainable_state(model))  # frozen: never checkpointed
    x = _images(model)
    model({"image": x})["logits"].sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters()) and model.phi.weight.grad is not None
    model.eval()
    with torch.no_grad():
        feats = model.image_features(x)  # what the runner's feature cache stores
        torch.testing.assert_close(model({"feat_local": feats["local"]})["logits"], model({"image": x})["logits"])
    assert feats["local"].shape[::2] == (2, model.backbone.width) and feats["global"].shape == (2, 512)
    with pytest.raises(KeyError, match="needs 'image'"):
        model({"target": x})


def test_diversity_module_on_off():
    off, on = _build(), _build(diversity=True)
    extra = _trainable(on) - _trainable(off)
    assert extra and all(n.startswith("diversity.") for n in extra) and _trainable(off) <= _trainable(on)
    x = _images(off)
    with torch.no_grad():
        a, b = off.eval().parts({"image": x}), on.eval().parts({"image": x})
    assert a["refined"].shape == b["refined"].shape and a["logits"].shape == b["logits"].shape
    torch.testing.assert_close(a["logits"], b["logits"])  # the module starts as the identity (zero out-projection)
    on.train()({"image": x})["logits"].square().sum().backward()
    assert on.diversity.attn.out_proj.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------- backbones
def test_backbone_weights_from_local_file(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18()
    full, trunk_only = tmp_path / "r18.pt", tmp_path / "r18_trunk.safetensors"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, full)
    save_file({k: v.contiguous() for k, v in source.state_dict().items() if not k.startswith("fc.")}, trunk_only)
    for path in (full, trunk_only):
        backbone = build_backbone("resnet18", str(path), image_size=32)
        torch.testing.assert_close(backbone.trunk[0].weight, source.conv1.weight, rtol=0, atol=0)  # conv1
        torch.testing.assert_close(backbone.trunk[7][1].bn2.running_var, source.layer4[1].bn2.running_var)
    other_head = torchvision.models.resnet18(num_classes=10)  # another classifier: ignored
    torch.save(other_head.state_dict(), tmp_path / "r18_10.pt")
    torch.testing.assert_close(build_backbone("resnet18", str(tmp_path / "r18_10.pt")).trunk[0].weight,
                               other_head.conv1.weight, rtol=0, atol=0)  # fmt: skip
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pt")
    with pytest.raises(ValueError, match=r"r34\.pt: weights do not fit .*unexpected"):
        build_backbone("resnet18", str(tmp_path / "r34.pt"))
    with pytest.raises(ConfigError, match="nope.pt: backbone weights file not found"):
        build_backbone("resnet18", str(tmp_path / "nope.pt"))
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"bad\.pt: not a readable backbone weights file"):
        build_backbone("resnet18", str(tmp_path / "bad.pt"))


@NEEDS_TIMM
def test_timm_backbone_weights_and_errors(tmp_path):
    import timm

    source = timm.create_model("resnet18", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "timm.pt")  # with its classifier: ignored
    backbone = build_backbone("timm:resnet18", str(tmp_path / "timm.pt"), image_size=32)
    torch.testing.assert_close(backbone.trunk.conv1.weight, source.conv1.weight, rtol=0, atol=0)
    assert backbone.width == 512 and backbone(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 512)
    with pytest.raises(ValueError, match=r"unknown timm backbone 'resnet1x'.*resnet18"):
        build_backbone("timm:resnet1x")


def test_backbone_errors(monkeypatch):
    assert "resnet101" in list_backbones() and list_backbones()[0] == "clip"
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet_nope'; valid: \['clip', .*'resnet101'"):
        build_backbone("resnet_nope")
    with pytest.raises(ValueError, match="unknown backbone 'vit_b_16'"):  # a torchvision model we do not cut
        build_backbone("vit_b_16")
    with pytest.raises(ValueError, match="backbone_weights must be empty"):
        _build(backbone_weights="imagenet")
    with pytest.raises(ValueError, match="takes 32 px images"):
        _build(image_size=64)

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(ConfigError, match="no network.*local state-dict file"):
        build_backbone("resnet18", "imagenet")


# ------------------------------------------------------------------------------------ end to end
def test_train_eval_through_cli(tmp_path, glyph_data):
    """model.name=cprfl with ASL through main(): frozen RN trunk (feature cache), diversity, EMA; eval reproduces."""
    cfg = {
        "name": "tiny_cprfl",
        "data": glyph_data,
        "model": {"name": "cprfl", "clip_arch": "cimlic-tiny-rn", "random_init": True,
                  "cprfl": {"freeze_backbone": True, "dim": 64, "ffn": 64}, "diversity": {"enabled": True}},
        "train": {"epochs": 2, "batch_size": 16, "num_workers": 0, "lr": 1e-3, "ema": 0.9,
                  "cache_dir": str(tmp_path / "cache")},
        "loss": {"name": "asl"},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(run)]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["map"] == pytest.approx(sklearn_map(run), abs=1e-6) and result["num_images"] == 24
    assert list((tmp_path / "cache").glob("*.safetensors"))  # frozen backbone: its tokens were cached
    saved = set(ckpt.read_checkpoint(run / "best")[0])
    assert any(k.startswith("diversity.") for k in saved) and not any(k.startswith("clip.") for k in saved)
    assert main(["eval", "--run", str(run)]) == 0  # rebuild, load best, evaluate: the same mAP
    again = json.loads((run / "eval_test_sklearn.json").read_text())
    assert again["map"] == pytest.approx(result["map"], abs=1e-9)
    assert Path(run / "clip.json").is_file()
