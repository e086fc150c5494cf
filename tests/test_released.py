"""Released-code parity: each released formula pinned by hand, and the presets that switch them on together.

The expected values are written from the formulas (the README's "Paper or released code" table), never from any
other repository's code.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import average_precision_score

from cimlic import checkpoint as ckpt
from cimlic.config import Config, ConfigError, ModelConfig, load_config, to_dict
from cimlic.metrics import evaluate
from cimlic.models import build_model
from cimlic.models.cprfl import CPRFLConfig, VSILayer
from cimlic.models.dualcoop import DualCoOpConfig, dualcoop_aggregate
from cimlic.models.hpdval import HPDVALConfig, dual_view_scores
from cimlic.presets import NOT_REPRODUCED, PRESETS, RELEASED, markdown_table, preset_overrides

CLASSES = ["dog", "cat", "traffic light", "potted_plant"]
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(size: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _hpdval(name: str = "hpdval_stage2", **hp):
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, clip_arch="cimlic-tiny-vit", random_init=True, hpdval=HPDVALConfig(**hp))
    return build_model(cfg, CLASSES)


# ------------------------------------------------------------------------------------------- HP-DVAL
def test_released_scores_hand_computed():
    """Released: raw dot products, each view's score vector L2-normalised over classes, alpha on the local view."""
    f_global = torch.tensor([[1.0, 2.0]])  # (B=1, D=2)
    f_local = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]]])  # (1, N=3, 2)
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # (C=2, 2): the same prompts for both views
    # dot products: global (1, 3); local tokens (1, 1), (0, 3), (2, 4); top-2 mean: (1.5, 3.5)
    g, loc = [1.0, 3.0], [1.5, 3.5]
    ng, nl = math.hypot(*g), math.hypot(*loc)
    expected = [0.7 * g[c] / ng + 0.3 * loc[c] / nl for c in range(2)]  # (1 - alpha) global + alpha local
    got = dual_view_scores(f_global, f_local, text, text, alpha=0.3, k=2, fusion="released", cosine=False)
    torch.testing.assert_close(got, torch.tensor([expected]))
    cosine = dual_view_scores(f_global, f_local, text, text, alpha=0.3, k=2, fusion="released", cosine=True)
    assert not torch.allclose(cosine, got)  # normalising the features first changes the scores


def test_released_hpdval_forward_equals_formula():
    """The model's logits under the released settings: no feature normalisation, no logit scale."""
    model = _hpdval("hpdval_stage1", cosine=False, fusion="released", logit_scale=1.0, alpha=0.5, topk=2).eval()
    x = _images(model.clip.image_size)
    with torch.no_grad():
        feats = model.student(x)
        text = model.hand_text
        s_g = feats["global"] @ text.T  # (B, C)
        s_l = (feats["local"] @ text.T).topk(2, dim=1).values.mean(dim=1)  # (B, C)
        expected = 0.5 * s_g / s_g.norm(dim=1, keepdim=True) + 0.5 * s_l / s_l.norm(dim=1, keepdim=True)
        logits = model({"image": x})["logits"]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert logits.abs().max() <= 1.0 + 1e-6  # no logit scale: a convex mix of two unit vectors' entries


def test_shared_contexts_are_one_tensor_updated_twice(tmp_path):
    """share_contexts: two parameters over one tensor; an AdamW step applies both parameters' updates to it."""
    model = _hpdval(prompt_init="words", share_contexts=True).train()
    g_ctx, l_ctx = model.prompt_global.ctx, model.prompt_local.ctx
    assert g_ctx is not l_ctx and g_ctx.data_ptr() == l_ctx.data_ptr()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"prompt_global.ctx", "prompt_local.ctx"}
    x = _images(model.clip.image_size)
    target = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0]])
    out = model({"image": x})
    F.binary_cross_entropy_with_logits(out["logits"], target).backward()
    g1, g2 = g_ctx.grad.clone(), l_ctx.grad.clone()
    assert not torch.allclose(g1, g2)  # each parameter gets its own view's gradient
    c0 = g_ctx.detach().clone()
    lr, wd, eps = 0.01, 0.1, 1e-8
    torch.optim.AdamW([g_ctx, l_ctx], lr=lr, weight_decay=wd, eps=eps).step()
    # AdamW's first step moves by lr * g / (|g| + eps) after the decoupled decay, once per parameter, in order
    c1 = c0 * (1 - lr * wd) - lr * g1 / (g1.abs() + eps)
    c2 = c1 * (1 - lr * wd) - lr * g2 / (g2.abs() + eps)
    torch.testing.assert_close(g_ctx.detach(), c2, rtol=1e-5, atol=1e-7)
    assert torch.equal(g_ctx, l_ctx)
    ckpt.save_checkpoint(tmp_path / "best", model, {"classnames": CLASSES})  # copies: safetensors accepts them
    fresh = _hpdval(prompt_init="words", share_contexts=True)
    ckpt.load_checkpoint(tmp_path / "best", fresh, classnames=CLASSES)
    assert fresh.prompt_global.ctx.data_ptr() == fresh.prompt_local.ctx.data_ptr()
    assert torch.equal(fresh.prompt_global.ctx, g_ctx) and torch.equal(fresh.prompt_local.ctx, g_ctx)
    separate = _hpdval(prompt_init="words")
    assert separate.prompt_global.ctx.data_ptr() != separate.prompt_local.ctx.data_ptr()
    with pytest.raises(ValueError, match="share_contexts needs both"):
        _hpdval(share_contexts=True, learn_local=False)


def test_load_stage1_false_keeps_the_untrained_student(tmp_path):
    stage1 = _hpdval("hpdval_stage1")
    with torch.no_grad():
        for p in stage1.student.parameters():
            p.add_(0.05)
    cfg = Config(model=ModelConfig(name="hpdval_stage1", clip_arch="cimlic-tiny-vit", random_init=True))
    ckpt.save_checkpoint(tmp_path / "s1" / "best", stage1, {"config": to_dict(cfg), "classnames": CLASSES})
    loaded = _hpdval(stage1_run=str(tmp_path / "s1"))
    released = _hpdval(stage1_run=str(tmp_path / "s1"), load_stage1=False)
    clip_visual = released.clip.model.visual.state_dict()
    for name, value in released.student.visual.state_dict().items():
        assert torch.equal(value, clip_visual[name]), name  # CLIP's own tower: stage 1 not loaded
    assert not torch.equal(loaded.student.visual.conv1.weight, released.student.visual.conv1.weight)


# ------------------------------------------------------------------------------------------ DualCoOp
def test_dualcoop_released_logits_carry_tau_s_times_tau():
    s_pos = torch.tensor([[[0.2], [0.5]]])  # (B=1, N=2, C=1)
    s_neg = torch.tensor([[[0.1], [-0.3]]])
    a0 = math.exp(20 * 0.2) / (math.exp(20 * 0.2) + math.exp(20 * 0.5))
    a1 = 1 - a0
    # released: sum_r a_r (20 s_r), times 5, for both prompts
    expected = 5 * (a0 * 20 * 0.2 + a1 * 20 * 0.5) - 5 * (a0 * 20 * 0.1 + a1 * 20 * -0.3)
    got = dualcoop_aggregate(s_pos, s_neg, 20.0, 5.0, released=True)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() == pytest.approx(20 * dualcoop_aggregate(s_pos, s_neg, 20.0, 5.0).item(), rel=1e-6)


def test_mean_token_equals_the_attention_pool_mean_token():
    """The 50th region: the pool's mean token through its value and output projections, from the spatial features."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="dualcoop", clip_arch="cimlic-tiny-rn", random_init=True, n_ctx=4,
                      dualcoop=DualCoOpConfig(n_ctx_neg=4, logit="released", mean_token=True))  # fmt: skip
    model = build_model(cfg, CLASSES).eval()
    clip, x = model.clip, _images(model.clip.image_size)
    visual = clip.model.visual
    with torch.no_grad():
        h = visual.stem(x)
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            h = layer(h)
        tokens = h.flatten(2).transpose(1, 2)  # (B, hw, C)
        pool = visual.attnpool
        mean_token = tokens.mean(dim=1) + pool.positional_embedding[0]  # CLIP's pool: mean first, own position
        direct = pool.c_proj(pool.v_proj(mean_token))  # (B, D)
        local = clip.encode_image_dense(x)["local"]  # (B, hw, D)
        with_mean = clip.add_mean_token(local)
        torch.testing.assert_close(with_mean[:, 0], direct, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(with_mean[:, 1:], local)
        # the model aggregates over 1 + hw regions, from images or from the cached spatial features alike
        pos, neg = model.prompt_features()
        loc = F.normalize(with_mean, dim=-1)
        s_pos, s_neg = loc @ F.normalize(pos, dim=-1).T, loc @ F.normalize(neg, dim=-1).T
        expected = dualcoop_aggregate(s_pos, s_neg, 20.0, 5.0, released=True)
        feats = model.image_features(x)
        torch.testing.assert_close(model({"image": x})["logits"], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model({f"feat_{k}": v for k, v in feats.items()})["logits"], expected,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    assert with_mean.shape[1] == local.shape[1] + 1
    vit = build_model(ModelConfig(name="dualcoop", clip_arch="cimlic-tiny-vit", random_init=True,
                                  n_ctx=4, dualcoop=DualCoOpConfig(n_ctx_neg=4, mean_token=True)), CLASSES)  # fmt: skip
    assert vit.mean_token is False  # a ViT has no pool mean token: its patch tokens are the regions


# --------------------------------------------------------------------------------------------- CPRFL
def test_vsi_released_layout_has_no_qkv_biases_and_matches_its_formula():
    torch.manual_seed(0)
    released = VSILayer(16, heads=2, head_dim=6, ffn=32, dropout=0.0)
    standard = VSILayer(16, heads=2, head_dim=6, ffn=32, dropout=0.0, layout="standard")
    assert released.q.bias is None and released.kv.bias is None and released.out.bias is not None
    n_params = sum(p.numel() for p in standard.parameters()) - sum(p.numel() for p in released.parameters())
    assert n_params == 3 * 2 * 6  # q, k and v biases of heads x head_dim each
    big = sum(p.numel() for p in VSILayer(64, heads=8, head_dim=512, ffn=32, layout="standard").parameters())
    assert big - sum(p.numel() for p in VSILayer(64, heads=8, head_dim=512, ffn=32).parameters()) == 12288
    x = torch.randn(2, 7, 16)
    with torch.no_grad():  # the released layer by hand: pre-norm attention without residual, then the FFN
        h = released.norm1(x)
        wq, (wk, wv) = released.q.weight, released.kv.weight.view(2, 12, 16)  # (12, 16) each
        q = (h @ wq.T).view(2, 7, 2, 6).transpose(1, 2)
        k, v = (h @ wk.T).view(2, 7, 2, 6).transpose(1, 2), (h @ wv.T).view(2, 7, 2, 6).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) * 6**-0.5, dim=-1) @ v  # (B, H, T, hd)
        y = released.out(att.transpose(1, 2).reshape(2, 7, 12))
        y = released.ffn(released.norm2(y))
        torch.testing.assert_close(released(x, n_out=3), y[:, -3:], rtol=0, atol=1e-5)
        standard.load_state_dict(released.state_dict(), strict=False)  # same weights; zero biases
        torch.nn.init.zeros_(standard.q.bias)
        torch.nn.init.zeros_(standard.kv.bias)
        torch.testing.assert_close(standard.eval()(x, n_out=3), released.eval()(x, n_out=3), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="vsi_layout"):
        VSILayer(16, heads=2, layout="fancy")


@pytest.mark.parametrize(("layout", "attn_dropout"), [("released", 0.0), ("standard", 0.3)])
def test_vsi_dropout_on_attention_weights_only_in_the_standard_layout(monkeypatch, layout, attn_dropout):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dropout_p", 0.0))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr("cimlic.models.cprfl.F.scaled_dot_product_attention", spy)
    layer = VSILayer(16, heads=2, ffn=32, dropout=0.3, layout=layout).train()
    layer(torch.randn(2, 5, 16), n_out=2)
    layer.eval()(torch.randn(2, 5, 16), n_out=2)
    assert seen == [attn_dropout, 0.0]


def test_cprfl_default_layout_is_the_released_one():
    assert CPRFLConfig().vsi_layout == "released"
    torch.manual_seed(0)
    cfg = ModelConfig(name="cprfl", clip_arch="cimlic-tiny-vit", random_init=True,
                      cprfl=CPRFLConfig(ffn=32, heads=2, freeze_backbone=True))  # fmt: skip
    model = build_model(cfg, CLASSES)
    assert model.vsi.q.bias is None and model.vsi.kv.bias is None and model.vsi.p_attn == 0.0


def test_cprfl_released_loss_hand_computed():
    """Released CPRFL: ASL (gamma- 4, gamma+ 0, clip 0.05), focusing weight a constant, mean over B x C."""
    from cimlic.losses import build_loss

    cfg = load_config(None, ["model.name=cprfl", "model.preset=released", "loss.name=asl"])
    loss_fn = build_loss(cfg.loss)
    z = torch.tensor([[0.5, -1.0], [2.0, 0.3]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    value = loss_fn(z, y)
    p = [[1 / (1 + math.exp(-v)) for v in row] for row in z.tolist()]
    terms, grads = [], []
    for r in range(2):
        for c in range(2):
            if y[r, c] == 1:  # weight (1 - p)^0 = 1
                terms.append(-math.log(p[r][c]))
                grads.append(-(1 - p[r][c]) / 4)
            else:
                pm = max(p[r][c] - 0.05, 0.0)
                w = pm**4  # a constant: only d/dz of -log(1 - pm) carries the gradient
                terms.append(-w * math.log(1 - pm))
                grads.append(w * p[r][c] * (1 - p[r][c]) / (1 - pm) / 4 if pm > 0 else 0.0)
    assert value.item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    value.backward()
    np.testing.assert_allclose(z.grad.flatten().numpy(), grads, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------------ evaluation
def test_class_softmax_ap_equals_sklearn_on_softmax_scores():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 3)) * 3
    targets = (rng.random((40, 3)) < 0.4).astype(np.int8)
    targets[0] = 1
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    soft = e / e.sum(axis=1, keepdims=True)
    out = evaluate(logits, targets, ["a", "b", "c"], ap_scores="class_softmax")
    expected = np.mean([average_precision_score(targets[:, c], soft[:, c]) for c in range(3)]) * 100
    assert out["map"] == pytest.approx(expected, rel=1e-9) and out["ap_scores"] == "class_softmax"
    plain = evaluate(logits, targets, ["a", "b", "c"])
    assert plain["map"] != pytest.approx(out["map"], rel=1e-6) and plain["ap_scores"] == "logits"
    assert plain["of1"] == out["of1"]  # threshold metrics keep the sigmoid
    with pytest.raises(ValueError, match="ap_scores"):
        evaluate(logits, targets, ["a", "b", "c"], ap_scores="softmax")


# ------------------------------------------------------------------------------------------- presets
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _flat(v, key + ".") if isinstance(v, dict) else {key: v}
    return out


PAPER_CONFIGS = {
    "hpdval": ["voc_lt/hpdval.yaml", "coco_lt/hpdval.yaml"],
    "hpdval_stage1": ["voc_lt/hpdval_stage1.yaml", "coco_lt/hpdval_stage1.yaml"],
    "hpdval_stage2": ["voc_lt/hpdval_stage2.yaml", "coco_lt/hpdval_stage2.yaml"],
    "cprfl": ["voc_lt/cprfl.yaml", "coco_lt/cprfl.yaml"],
    "dualcoop": ["voc_lt/dualcoop.yaml", "coco_lt/dualcoop.yaml"],
    "lmpt": ["voc_lt/lmpt.yaml", "coco_lt/lmpt.yaml"],
}


@pytest.mark.parametrize("preset", ["released", "released_exact"])
@pytest.mark.parametrize(("name", "path"), [(n, p) for n, ps in PAPER_CONFIGS.items() for p in ps])
def test_released_preset_differs_from_the_paper_config_exactly_where_it_should(name, path, preset):
    config = ROOT / "configs" / path
    paper = _flat(to_dict(load_config(config)))
    released = _flat(to_dict(load_config(config, [f"model.preset={preset}"])))
    assert paper["model.name"] == name
    diffs = [d for d in RELEASED[name] if preset == "released_exact" or not d.exact_only]
    for d in RELEASED[name]:
        assert paper[d.key] == d.paper, f"{path}: {d.key} is {paper[d.key]!r}, the table says {d.paper!r}"
    assert {k for k in paper if paper[k] != released[k]} == {"model.preset"} | {d.key for d in diffs}
    assert all(released[d.key] == d.released for d in diffs)


def test_released_exact_adds_only_the_bugs():
    for name, diffs in RELEASED.items():
        released, exact = preset_overrides(name, "released"), preset_overrides(name, "released_exact")
        assert set(exact) - set(released) == {d.key for d in diffs if d.exact_only}
        assert all(exact[k] == v for k, v in released.items())
    assert preset_overrides("coop", "paper") == {}
    assert {d.key for d in RELEASED["hpdval"] if d.exact_only} == {
        "model.hpdval.kd_weight", "loss.db.focal_reduction", "model.hpdval.load_stage1"
    }  # fmt: skip


def test_set_overrides_win_over_the_preset_and_saved_configs_reload_as_they_are(tmp_path):
    config = ROOT / "configs" / "voc_lt" / "hpdval.yaml"
    cfg = load_config(config, ["model.preset=released", "model.hpdval.topk=8"])
    assert cfg.model.hpdval.topk == 8 and cfg.model.hpdval.fusion == "released" and cfg.loss.db.pos_scale == 10.0
    from cimlic.config import save_config

    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml", apply_preset=False)
    assert to_dict(again) == to_dict(cfg)  # what a run folder holds is what it trained with
    text = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert text["model"]["preset"] == "released"


def test_preset_errors_name_the_method_and_the_choices():
    with pytest.raises(ConfigError, match="no released preset; presets exist for"):
        load_config(None, ["model.name=coop", "model.preset=released"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config(None, ["model.preset=authors"])
    assert PRESETS == ("paper", "released", "released_exact")


def test_readme_table_is_the_presets_table():
    """The README's table is ``python -m cimlic.presets``, row for row (regenerate it when a preset changes)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme
    assert all(f"`{d.key}`" in markdown_table() for diffs in RELEASED.values() for d in diffs)
    assert all(note in markdown_table() for notes in NOT_REPRODUCED.values() for note in notes)
    assert "as in the authors' code" not in readme  # the inexact claims are gone


def test_released_preset_trains_and_reloads_end_to_end(glyph_data, tmp_path):
    """A DualCoOp run under the released preset: the run folder holds the released values and eval reloads it."""
    from cimlic.apps.cli import main

    cfg = {"name": "rel", "data": glyph_data,
           "model": {"name": "dualcoop", "clip_arch": "cimlic-tiny-rn", "random_init": True, "n_ctx": 4,
                     "dualcoop": {"n_ctx_neg": 4}, "preset": "released"},
           "train": {"epochs": 1, "batch_size": 16, "num_workers": 0, "lr": 0.01,
                     "cache_dir": str(tmp_path / "cache")},
           "loss": {"name": "asl"}}  # fmt: skip
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert saved["preset"] == "released" and saved["dualcoop"] == saved["dualcoop"] | {
        "logit": "released",
        "mean_token": True,
    }
    first = yaml.safe_load((run / "eval.json").read_text())
    assert main(["eval", "--run", str(run)]) == 0
    again = yaml.safe_load((run / "eval_test_sklearn.json").read_text())
    assert again["map"] == pytest.approx(first["map"], abs=1e-9)
    paper = copy.deepcopy(cfg)
    paper["model"]["preset"] = "paper"
    config.write_text(yaml.safe_dump(paper))
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "paper")]) == 0
    assert yaml.safe_load((tmp_path / "paper" / "eval.json").read_text())["map"] != pytest.approx(first["map"])


def test_shared_contexts_resume_exactly(tmp_path):
    """Released stage 2 (shared contexts, DB with pos_scale, EMA, one-cycle): stop + resume == one run, bitwise."""
    from cimlic.cache import CachedFeatureDataset
    from cimlic.config import TrainConfig
    from cimlic.engine import Trainer
    from cimlic.losses import build_loss

    cfg = load_config(None, ["model.name=hpdval_stage2", "model.preset=released", "seed=3"])
    cfg.train = TrainConfig(epochs=3, batch_size=8, lr=0.05, device="cpu", num_workers=0, log_every=1,
                            ema=cfg.train.ema, schedule=cfg.train.schedule)  # fmt: skip
    g = torch.Generator().manual_seed(0)

    def data(n: int) -> CachedFeatureDataset:
        feats = {"global": torch.randn(n, 128, generator=g), "local": torch.randn(n, 5, 128, generator=g)}
        return CachedFeatureDataset(feats, (torch.rand(n, len(CLASSES), generator=g) < 0.4).float())

    train, val, test = data(24), data(12), data(12)
    counts = train.targets.sum(0).clamp(min=1)

    def trainer(run: Path) -> Trainer:
        model = _hpdval(**{k: getattr(cfg.model.hpdval, k) for k in ("cosine", "fusion", "logit_scale", "alpha",
                        "prompt_init", "share_contexts", "sc_on")}, topk=2)  # fmt: skip
        loss = build_loss(cfg.loss, counts, len(train))
        return Trainer(cfg, model, loss, train, val, test, CLASSES, counts, run)

    ref = trainer(tmp_path / "a")
    ref_result = ref.fit()
    assert trainer(tmp_path / "b").fit(stop_after_epochs=1) == {"stopped_after_epoch": 1}
    resumed = trainer(tmp_path / "b")
    assert resumed.fit(resume=True) == ref_result
    for name in ("prompt_global", "prompt_local"):
        assert torch.equal(getattr(resumed.model, name).ctx, getattr(ref.model, name).ctx)
    assert resumed.model.prompt_global.ctx.data_ptr() == resumed.model.prompt_local.ctx.data_ptr()
