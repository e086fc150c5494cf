"""HP-DVAL on a tiny random CLIP: fusion math, student vs teacher, stage 1 -> stage 2 loading, switches, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cimlic import checkpoint as ckpt
from cimlic.apps.cli import main
from cimlic.config import Config, LossConfig, ModelConfig, to_dict
from cimlic.losses import build_loss
from cimlic.models import build_model
from cimlic.models.hpdval import HPDVAL, HPDVALConfig, dual_view_scores, fuse_views, l1_distance, topk_mean
from glyphs import build_world
from runs import sklearn_map

CLASSES = ["dog", "cat", "traffic light", "potted_plant"]
PROMPTS = {"prompt_global.ctx", "prompt_local.ctx"}


def _cfg(name: str, **hp) -> ModelConfig:
    return ModelConfig(name=name, clip_arch="cimlic-tiny-vit", random_init=True, hpdval=HPDVALConfig(**hp))


def _build(name: str, **hp) -> HPDVAL:
    torch.manual_seed(0)  # the same random CLIP in every build
    return build_model(_cfg(name, **hp), CLASSES)


def _images(model: HPDVAL, n: int = 3, seed: int = 0) -> torch.Tensor:
    size = model.clip.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _trainable(model: HPDVAL) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _perturb(module: torch.nn.Module, seed: int = 1, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(std * torch.randn(p.shape, generator=g))


def _stage1_run(run: Path, **hp) -> dict[str, torch.Tensor]:
    """A stage-1 run folder with a ``best`` checkpoint of a perturbed student; returns its tensors."""
    cfg = _cfg("hpdval_stage1", **hp)
    model = _build("hpdval_stage1", **hp)
    _perturb(model.student)
    ckpt.save_checkpoint(run / "best", model, {"config": to_dict(Config(model=cfg)), "classnames": CLASSES})
    return ckpt.read_checkpoint(run / "best")[0]


# ------------------------------------------------------------------------------------ the score math
def test_topk_mean_hand_computed():
    s = torch.tensor([[[0.1, 0.9], [0.5, 0.2], [0.3, 0.4]]])  # (B=1, N=3, C=2)
    torch.testing.assert_close(topk_mean(s, 2), torch.tensor([[0.4, 0.65]]))
    torch.testing.assert_close(topk_mean(s, 1), torch.tensor([[0.5, 0.9]]))
    torch.testing.assert_close(topk_mean(s, 32), torch.tensor([[0.3, 0.5]]))  # k clamped to the 3 tokens
    with pytest.raises(ValueError, match="k >= 1"):
        topk_mean(s, 0)


def test_fuse_views_both_modes():
    s_g, s_l = torch.tensor([[0.6, 0.8]]), torch.tensor([[0.0, 2.0]])
    torch.testing.assert_close(fuse_views(s_g, s_l, 0.4, "paper"), torch.tensor([[0.24, 0.32 + 1.2]]))
    # released: |s_g| = 1, s_l / |s_l| = (0, 1); alpha weights the local view
    torch.testing.assert_close(fuse_views(s_g, s_l, 0.4, "released"), torch.tensor([[0.36, 0.48 + 0.4]]))
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse_views(s_g, s_l, 0.4, "other")


@pytest.mark.parametrize("fusion", ["paper", "released"])
def test_dual_view_scores_hand_computed(fusion):
    f_global = torch.tensor([[2.0, 0.0]])  # (B=1, D=2)
    f_local = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]]])  # (1, N=3, 2)
    text_global = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # (C=2, 2): global prompts score the global view ...
    text_local = torch.tensor([[0.0, 1.0], [5.0, 0.0]])  # ... and the local prompts the local view
    r = math.sqrt(10.0)  # |(3, 1)|
    s_g = torch.tensor([1.0, 0.0])
    s_l = torch.tensor([(1.0 + 1.0 / r) / 2, (1.0 + 3.0 / r) / 2])  # top-2 of (0, 1, 1/r) and (1, 0, 3/r)
    paper = 0.4 * s_g + 0.6 * s_l
    released = 0.6 * s_g / s_g.norm() + 0.4 * s_l / s_l.norm()  # alpha on the local view, each view normalised
    expected = paper if fusion == "paper" else released
    got = dual_view_scores(f_global, f_local, text_global, text_local, 0.4, 2, fusion)
    torch.testing.assert_close(got, expected.unsqueeze(0))


def test_stage1_logits_are_scaled_dual_view_scores_of_hand_prompts():
    model = _build("hpdval_stage1", logit_scale=10.0).eval()
    x = _images(model)
    with torch.no_grad():
        names = ["dog", "cat", "traffic light", "potted plant"]
        hand = model.clip.encode_text(model.clip.tokenize([f"a photo of a {c}." for c in names]))
        torch.testing.assert_close(model.hand_text, hand)
        f = model.student(x)
        expected = 10.0 * dual_view_scores(f["global"], f["local"], hand, hand, 0.4, 32, "paper")
        torch.testing.assert_close(model({"image": x})["logits"], expected)
    assert "hand_text" not in model.state_dict()  # derived from class names: not persistent


# -------------------------------------------------------------------------------- student and teacher
def test_stage1_student_is_separate_and_kd():
    model = _build("hpdval_stage1").train()
    assert model.feature_tower is None and model.feature_keys == ("global", "local")
    assert {id(p) for p in model.student.parameters()}.isdisjoint(id(p) for p in model.clip.parameters())
    assert all(p.requires_grad for p in model.student.parameters())
    assert not any(p.requires_grad for p in model.clip.parameters())
    assert _trainable(model) == {k for k in model.state_dict() if not k.startswith(model.frozen_prefixes())}
    x = _images(model)
    out = model({"image": x})
    assert set(out["aux_losses"]) == {"kd"} and float(out["aux_losses"]["kd"].detach()) < 1e-5  # student starts at CLIP
    teacher = model.clip.encode_image(x)
    _perturb(model.student)
    kd = model({"image": x})["aux_losses"]["kd"]
    assert float(kd.detach()) > 1e-3
    assert torch.equal(model.clip.encode_image(x), teacher)  # the teacher did not move with the student
    kd.backward()
    assert model.student.visual.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.clip.parameters())
    model.eval()
    assert "aux_losses" not in model({"image": x})  # losses are computed in training mode only


def test_student_init_and_embed_head():
    x = _images(_build("hpdval_stage1"))
    base = _build("hpdval_stage1").eval()
    rand = _build("hpdval_stage1", student_init="random").train()
    assert not torch.equal(rand.student.visual.conv1.weight, base.clip.model.visual.conv1.weight)
    assert float(rand({"image": x})["aux_losses"]["kd"].detach()) > 1e-2
    mlp = _build("hpdval_stage1", embed_head="mlp").eval()
    assert {"student.head.fc1.weight", "student.head.fc2.weight"} <= _trainable(mlp)
    with torch.no_grad():  # the residual head starts as the identity
        torch.testing.assert_close(mlp({"image": x})["logits"], base({"image": x})["logits"])


# ----------------------------------------------------------------------------------------- stage 2
def test_stage2_trains_only_prompts_and_keeps_the_student(tmp_path):
    _stage1_run(tmp_path / "s1")
    model = _build("hpdval_stage2", stage1_run=str(tmp_path / "s1")).train()
    assert _trainable(model) == PROMPTS
    assert set(ckpt.trainable_tensors(model)) == PROMPTS  # what a checkpoint holds
    assert model.feature_tower is model.student and list(model.frozen_parts()) == ["clip", "student"]
    assert not model.student.training
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    ctx = model.prompt_global.ctx.detach().clone()
    loss_fn = build_loss(LossConfig(name="db_star"), torch.tensor([5, 3, 2, 1]), 8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model({"image": _images(model), "target": torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0]])})
    assert set(out["aux_losses"]) == {"sc"}
    loss = loss_fn(out["logits"], torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0]])) + out["aux_losses"]["sc"]
    loss.backward()
    optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in model.student.state_dict().items())
    assert not torch.equal(model.prompt_global.ctx, ctx)


def test_stage2_loads_the_stage1_student(tmp_path):
    saved = _stage1_run(tmp_path / "s1")
    model = _build("hpdval_stage2", stage1_run=str(tmp_path / "s1"))
    for name, value in model.student.state_dict().items():
        assert torch.equal(value, saved[f"student.{name}"]), name
    assert "student: " in model.identity()["source"] and str(tmp_path / "s1") in model.identity()["source"]
    fresh = _build("hpdval_stage2")  # no stage-1 run: the un-trained student (released-code behaviour)
    x = _images(model)
    with torch.no_grad():
        assert not torch.allclose(model({"image": x})["logits"], fresh({"image": x})["logits"])


def test_stage2_bad_stage1_run_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ckpt.CheckpointError) as err:
        _build("hpdval_stage2", stage1_run=str(missing))
    assert str(missing / "best.safetensors") in str(err.value) and "\n" not in str(err.value)
    _stage1_run(tmp_path / "s1")  # linear head
    with pytest.raises(ckpt.CheckpointError, match=r"best\.safetensors: stage-1 student does not fit .*missing"):
        _build("hpdval_stage2", stage1_run=str(tmp_path / "s1"), embed_head="mlp")
    coop = build_model(ModelConfig(name="coop", clip_arch="cimlic-tiny-vit", random_init=True, n_ctx=2), CLASSES)
    meta = {"config": to_dict(Config(model=ModelConfig(name="coop"))), "classnames": CLASSES}
    ckpt.save_checkpoint(tmp_path / "coop" / "best", coop, meta)
    with pytest.raises(ckpt.CheckpointError, match=r"best\.json: not an HP-DVAL stage-1 run \(model 'coop'\)"):
        _build("hpdval_stage2", stage1_run=str(tmp_path / "coop"))
    (tmp_path / "s1" / "clip.json").write_text(json.dumps({"digest": "0" * 64, "source": "another CLIP"}))
    with pytest.raises(ckpt.CheckpointError, match=r"clip\.json: the frozen weights differ from those stage 1 was"):
        _build("hpdval_stage2", stage1_run=str(tmp_path / "s1"))


def test_stage2_cached_and_uncached_logits_agree(tmp_path):
    _stage1_run(tmp_path / "s1")
    model = _build("hpdval_stage2", stage1_run=str(tmp_path / "s1")).eval()
    x = _images(model)
    with torch.no_grad():
        feats = model.image_features(x)  # what the feature cache stores
        assert feats["local"].shape[:2] == (3, (model.clip.image_size // 4) ** 2)
        cached = model({f"feat_{k}": v for k, v in feats.items()})["logits"]
        torch.testing.assert_close(cached, model({"image": x})["logits"], rtol=0, atol=1e-6)


def test_words_init_reproduces_the_hand_crafted_prompts():
    """prompt_init=words: P^G = P^L = P^H at init, so L_sc = 0 and stage 2 scores like stage 1."""
    model = _build("hpdval_stage2", prompt_init="words").train()
    p_global, p_local = model.prompt_features()
    torch.testing.assert_close(p_global, model.hand_text, rtol=0, atol=1e-5)
    torch.testing.assert_close(p_local, model.hand_text, rtol=0, atol=1e-5)
    x = _images(model)
    assert float(model({"image": x})["aux_losses"]["sc"].detach()) < 1e-6
    stage1 = _build("hpdval_stage1").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()({"image": x})["logits"], stage1({"image": x})["logits"], atol=1e-4, rtol=0
        )


def test_ablation_switches():
    x = _images(_build("hpdval_stage1"))
    only_local = _build("hpdval_stage2", learn_global=False).train()
    assert only_local.prompt_global is None and _trainable(only_local) == {"prompt_local.ctx"}
    assert "aux_losses" not in only_local({"image": x})  # L_sc is on the (unlearned) global prompts
    local_sc = _build("hpdval_stage2", sc_on="local", sc_weight=2.0).train()
    _, p_local = local_sc.prompt_features()
    expected = 2.0 * l1_distance(local_sc.hand_text, p_local)
    torch.testing.assert_close(local_sc({"image": x})["aux_losses"]["sc"], expected)
    assert "aux_losses" not in _build("hpdval_stage2", use_sc=False).train()({"image": x})
    none = _build("hpdval_stage2", learn_global=False, learn_local=False)
    assert not _trainable(none)
    joint = _build("hpdval_joint").train()
    assert _trainable(joint) > PROMPTS and "student.visual.conv1.weight" in _trainable(joint)
    assert joint.feature_tower is None
    assert set(joint({"image": x})["aux_losses"]) == {"kd", "sc"}
    assert "aux_losses" not in _build("hpdval_stage1", kd_weight=0.0).train()({"image": x})
    with pytest.raises(ValueError, match="hpdval.alpha"):
        _build("hpdval_stage1", alpha=1.5)


# ---------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    build_world(root, n_pool=200, n_test=40, n_max=60, seed=0)
    return root


def _write_config(path: Path, world: Path, model: str, **hp) -> Path:
    cfg = {
        "name": f"tiny_{model}",
        "data": {"classes": str(world / "classes.txt"), "train_labels": str(world / "train.txt"),
                 "test_labels": str(world / "test.txt"), "image_root": str(world / "images"),
                 "image_pattern": "{id}.png"},
        "model": {"name": model, "clip_arch": "cimlic-tiny-vit", "random_init": True, "hpdval": hp},
        "train": {"epochs": 1, "batch_size": 16, "num_workers": 0, "lr": 1e-3, "log_every": 1,
                  "cache_dir": str(path.parent / "cache")},
        "loss": {"name": "db_star"},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses_logged(run: Path) -> set[str]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {k for line in lines for k in line if k.startswith("loss_")}


def test_two_stage_run_through_the_cli(world, tmp_path, capsys):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    assert main(["train", "--config", str(_write_config(tmp_path / "a.yaml", world, "hpdval_stage1")),
                 "--run-dir", str(s1)]) == 0  # fmt: skip
    assert json.loads((s1 / "eval.json").read_text())["map"] == pytest.approx(sklearn_map(s1), abs=1e-6)
    assert {"loss_main", "loss_kd"} <= _losses_logged(s1)
    config = _write_config(tmp_path / "b.yaml", world, "hpdval_stage2", stage1_run=str(s1))
    assert main(["train", "--config", str(config), "--run-dir", str(s2)]) == 0
    assert json.loads((s2 / "eval.json").read_text())["map"] == pytest.approx(sklearn_map(s2), abs=1e-6)
    assert {"loss_main", "loss_sc"} <= _losses_logged(s2) and "loss_kd" not in _losses_logged(s2)
    assert set(load_file(s2 / "best.safetensors")) == PROMPTS  # the frozen student is not saved again
    assert list((tmp_path / "cache").glob("*.safetensors"))  # stage 2 read the student's features from the cache
    assert main(["eval", "--run", str(s2)]) == 0  # reloads stage 1 through hpdval.stage1_run
    bad = _write_config(tmp_path / "c.yaml", world, "hpdval_stage2", stage1_run=str(tmp_path / "nope"))
    capsys.readouterr()
    assert main(["train", "--config", str(bad), "--run-dir", str(tmp_path / "s3")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nope" / "best.safetensors") in err and err.count("\n") == 1


def test_joint_run_through_the_cli(world, tmp_path):
    run = tmp_path / "joint"
    assert main(["train", "--config", str(_write_config(tmp_path / "j.yaml", world, "hpdval_joint")),
                 "--run-dir", str(run)]) == 0  # fmt: skip
    assert json.loads((run / "eval.json").read_text())["map"] == pytest.approx(sklearn_map(run), abs=1e-6)
    assert {"loss_main", "loss_kd", "loss_sc"} <= _losses_logged(run)
    names = set(load_file(run / "best.safetensors"))
    assert names >= PROMPTS and "student.visual.conv1.weight" in names


def test_stage2_logits_use_global_prompts_globally_and_local_prompts_locally():
    model = _build("hpdval_stage2", alpha=0.3, topk=5).eval()
    x = _images(model)
    with torch.no_grad():
        clip = model.clip
        p_global = clip.encode_text_from_embeddings(model.prompt_global(), model.prompt_global.eot_index)
        p_local = clip.encode_text_from_embeddings(model.prompt_local(), model.prompt_local.eot_index)
        f = model.image_features(x)
        expected = clip.logit_scale * dual_view_scores(f["global"], f["local"], p_global, p_local, 0.3, 5, "paper")
        torch.testing.assert_close(model({"image": x})["logits"], expected)


def test_stage1_teacher_from_the_cache_trains_exactly_as_recomputed(tmp_path, glyph_data, monkeypatch, caplog):
    """Deterministic training view: L_kd's teacher features come from the cache; losses and weights are the same."""
    seen = []
    kd_loss = HPDVAL.kd_loss

    def spy(self, f_cls, images, cached=None):
        seen.append(cached is not None)
        return kd_loss(self, f_cls, images, cached)

    monkeypatch.setattr(HPDVAL, "kd_loss", spy)
    cfg = {"name": "kd", "data": glyph_data,
           "model": {"name": "hpdval_stage1", "clip_arch": "cimlic-tiny-vit", "random_init": True,
                     "hpdval": {"topk": 4, "kd_weight": 10.0}},
           "train": {"epochs": 2, "batch_size": 8, "num_workers": 0, "lr": 1e-3, "log_every": 1,
                     "cache_dir": str(tmp_path / "cache")},
           "loss": {"name": "asl"}}  # fmt: skip
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    runs = {}
    for name, sets in (("cached", []), ("recomputed", ["--set", "train.cache_features=false"])):
        seen.clear()
        with caplog.at_level("INFO", logger="cimlic"):
            assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / name), *sets]) == 0
        runs[name] = set(seen)
    assert runs == {"cached": {True}, "recomputed": {False}}
    assert "teacher features of the" in caplog.text and "the teacher runs at every training step" in caplog.text
    assert [json.loads(p.read_text())["view"] for p in (tmp_path / "cache").glob("*.json")] == ["teacher"]

    def losses(run):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["loss_kd"]) for r in records if "loss" in r]

    assert len(losses("cached")) >= 6 and losses("cached") == losses("recomputed")  # equal, float for float
    a, b = (load_file(str(tmp_path / run / "best.safetensors")) for run in ("cached", "recomputed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    caplog.clear()
    with caplog.at_level("INFO", logger="cimlic"):
        assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "aug"), "--set", "train.epochs=1",
                     "--set", "train.augment=true"]) == 0  # fmt: skip
    assert "train.augment is on: the teacher sees each augmented image" in caplog.text
