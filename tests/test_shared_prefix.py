"""The shared-prefix text pass (``model.text_pass: shared_prefix``): class-shared contexts through the text tower
once; features and context gradients equal to the plain pass and to open_clip's ``encode_text``."""

from __future__ import annotations

import pytest
import torch
import yaml

from cimlic.apps.cli import main
from cimlic.config import ModelConfig
from cimlic.models import build_model
from cimlic.models.clip import ClipError, ClipModel, load_clip
from cimlic.models.prompts import PromptLearner, encode_prompts

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ["dog", "traffic light", "potted plant", "person", "hair drier"]


@pytest.fixture(scope="module", params=["cimlic-tiny-vit", "cimlic-tiny-rn"])
def clip(request) -> ClipModel:
    torch.manual_seed(0)
    return load_clip(request.param, random_init=True)


def _both(clip: ClipModel, learners: list[PromptLearner]) -> dict[str, tuple[list, list]]:
    """{pass: (features, context gradients)} of a fixed linear loss on every learner's features."""
    weights = [torch.randn(len(lr.classnames), clip.embed_dim, generator=torch.Generator().manual_seed(k))
               for k, lr in enumerate(learners)]  # fmt: skip
    out = {}
    for mode in ("plain", "shared_prefix"):
        clip.text_pass = mode
        for lr in learners:
            lr.ctx.grad = None
        feats = encode_prompts(clip, *learners)
        sum((f * w).sum() for f, w in zip(feats, weights, strict=True)).backward()
        out[mode] = ([f.detach() for f in feats], [lr.ctx.grad.clone() for lr in learners])
    clip.text_pass = "shared_prefix"
    return out


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= rel * float(a.abs().max()), float((a - b).abs().max() / a.abs().max())


def test_shared_prefix_equals_the_plain_pass_features_and_gradients(clip):
    assert clip.shared_prefix_fits
    torch.manual_seed(1)
    learners = [PromptLearner(clip, CLASSES, 4), PromptLearner(clip, CLASSES, 4), PromptLearner(clip, CLASSES, 7)]
    runs = _both(clip, learners)  # two (prefix, tail) shapes: two shared-prefix groups in one call
    for plain, shared in zip(*(runs[m][0] + runs[m][1] for m in ("plain", "shared_prefix")), strict=True):
        _close(plain, shared)
    assert all(g.abs().sum() > 0 for g in runs["shared_prefix"][1])
    assert all(p.grad is None for p in clip.parameters())  # the tower stays frozen


def test_shared_prefix_of_word_contexts_is_encode_text(clip):
    """Contexts from "a photo of a": the prompts are the hand-written ones, so open_clip's encode_text is the answer."""
    learner = PromptLearner(clip, CLASSES, ctx_init="a photo of a")
    expected = clip.encode_text(clip.tokenize([f"a photo of a {c}." for c in CLASSES]))
    clip.text_pass = "shared_prefix"
    _close(expected, encode_prompts(clip, learner)[0])
    direct = clip.encode_text_shared_prefix(
        learner.shared_prefix()[None], learner.suffix, torch.zeros(len(CLASSES), dtype=torch.long), learner.eot_index
    )
    _close(expected, direct)


def test_class_specific_contexts_and_unfit_towers_take_the_plain_pass(clip, monkeypatch):
    calls = []
    real = ClipModel.encode_text_shared_prefix
    monkeypatch.setattr(ClipModel, "encode_text_shared_prefix", lambda self, *a: calls.append(1) or real(self, *a))
    shared, csc = PromptLearner(clip, CLASSES, 4), PromptLearner(clip, CLASSES, 4, csc=True)
    with pytest.raises(ValueError, match="class-specific contexts have no shared prefix"):
        csc.shared_prefix()
    encode_prompts(clip, shared, csc)  # one class-specific learner: the whole call runs plain
    assert calls == []
    encode_prompts(clip, shared)
    assert calls == [1]

    class Patched(type(clip._text.transformer.resblocks[0])):
        def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):  # a block computing something else
            return super().forward(q_x, k_x, v_x, attn_mask) * 2

    block = clip._text.transformer.resblocks[0]
    monkeypatch.setattr(block, "__class__", Patched)
    assert not clip.shared_prefix_fits
    encode_prompts(clip, shared)
    assert calls == [1]
    with pytest.raises(ClipError, match="does not fit the shared-prefix pass"):
        real(clip, shared.shared_prefix()[None], shared.suffix, torch.zeros(5, dtype=torch.long), shared.eot_index)


@pytest.mark.parametrize("name", ["coop", "dualcoop", "hpdval_stage1"])
def test_model_text_pass_is_set_from_the_config(name):
    for mode in ("plain", "shared_prefix"):
        cfg = ModelConfig(name=name, clip_arch="cimlic-tiny-vit", random_init=True, n_ctx=4, text_pass=mode)
        assert build_model(cfg, CLASSES).clip.text_pass == mode


def test_a_coop_run_trains_the_same_either_way(tmp_path, glyph_data):
    """Two short CoOp runs, plain and shared prefix: the same losses to float rounding, the same mAP to 1e-3."""
    import json

    cfg = {"name": "sp", "data": glyph_data,
           "model": {"name": "coop", "clip_arch": "cimlic-tiny-vit", "random_init": True, "n_ctx": 4},
           "train": {"epochs": 2, "batch_size": 8, "num_workers": 0, "lr": 0.01, "log_every": 1,
                     "cache_dir": str(tmp_path / "cache")},
           "loss": {"name": "asl"}}  # fmt: skip
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    result = {}
    for mode in ("plain", "shared_prefix"):
        run = tmp_path / mode
        assert main(["train", "--config", str(config), "--run-dir", str(run), "--set", f"model.text_pass={mode}"]) == 0
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        result[mode] = ([r["loss"] for r in lines if "loss" in r], json.loads((run / "eval.json").read_text())["map"])
    torch.testing.assert_close(torch.tensor(result["plain"][0]), torch.tensor(result["shared_prefix"][0]), rtol=1e-4,
                               atol=0)  # fmt: skip
    assert result["plain"][1] == pytest.approx(result["shared_prefix"][1], abs=1e-3)
