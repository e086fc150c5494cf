"""HP-DVAL (Huang, Yan, Liu, Liu, Hong, IEEE TIP 2025; METHODS §5.3): dual-view alignment, then prompt tuning.

Score of class c (both stages): s_c = scale * [alpha * cos(P^G_c, f_cls) + (1 - alpha) * TopKMean_j cos(P^L_c, f_j)],
f_cls (B, D) the global and f_1..f_N (B, N, D) the local image features of the *student* image tower, P^G / P^L
(C, D) the text features of the global / local prompts.

- ``hpdval_stage1`` (DVAL): the student (a trainable copy of CLIP's image tower) is trained with the hand-crafted
  prompts "a photo of a [CLASS]." (P^G = P^L = P^H, fixed) and L_kd = ||f_CLIP(x) - f_cls(x)||_1 against the frozen
  CLIP image tower (the teacher: ``clip``'s own tower, never shared with the student).
- ``hpdval_stage2`` (HPT): the stage-1 student is loaded from ``hpdval.stage1_run`` and frozen (its features are
  cached like any frozen tower's); class-shared global and local contexts are learned with
  L_sc = ||P^H - P^G||_1.
- ``hpdval_joint``: student and prompts trained together (L_kd + L_sc), the paper's one-stage ablation.

Both L1 distances are taken on unnormalised features and reduced as the mean absolute difference (PyTorch's
``l1_loss``: the paper's ||.||_1 per image / class divided by D, averaged over images / classes) **[our
reading]**; the per-vector norm is that times D (set ``kd_weight`` / ``sc_weight`` = D to get it).

Switches for the authors' released code (default = the paper; ``model.preset: released`` sets them all, see
``cimlic.presets``): ``cosine=False`` scores raw dot products of the features (no L2 normalisation);
``logit_scale=1`` applies no scale to the fused score; ``fusion=released`` L2-normalises each view's score vector
over classes and puts alpha on the *local* view; ``prompt_init=words`` starts the contexts from "a photo of a";
``share_contexts=True`` makes the global and local contexts two parameters over one tensor (the released prompt
model wraps the same init tensor twice, so every optimiser step applies both parameters' updates to one context);
``sc_on=local`` ties the local prompts to P^H; ``load_stage1=False`` runs stage 2 on the un-trained student (the
released stage 2 does not load stage 1). ``student_init=clip`` is the released init and our default (the paper's
ImageNet-1K ViT is not available offline; ``random`` is a from-scratch stand-in). ``embed_head=mlp`` **[our
design]** adds a residual two-layer MLP after CLIP's projection whose last layer starts at zero, so the student
starts exactly at CLIP's embedding.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cimlic.cache import weights_digest
from cimlic.checkpoint import CheckpointError, check_identity, read_checkpoint
from cimlic.errors import ConfigError
from cimlic.io import state_dict_mismatch
from cimlic.models.base import Method, MethodSpec
from cimlic.models.clip import ClipModel, dense_image_features
from cimlic.models.prompts import PromptLearner, encode_prompts
from cimlic.models.text import hand_text_features

if TYPE_CHECKING:
    from cimlic.config import Config, ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class HPDVALConfig:
    alpha: float = 0.4  # fusion weight of the global view (fusion=released: of the local view)
    topk: int = 32  # local view: mean of the k best token scores per class (clamped to the token count)
    fusion: Literal["paper", "released"] = "paper"  # released: L2-normalise each view's scores over classes first
    cosine: bool = True  # score cosine similarities (paper); false = raw dot products of the features (released)
    logit_scale: float = 0.0  # multiplier of the fused scores; 0 = CLIP's logit scale, 1 = none (released)
    student_init: Literal["clip", "random"] = "clip"  # stage-1 student: CLIP's image tower (released) or random
    embed_head: Literal["linear", "mlp"] = "linear"  # student to text space: CLIP's proj, or proj + residual MLP
    kd_weight: float = 1.0  # weight of L_kd = mean |f_CLIP(x) - f_cls(x)| (||.||_1 / D; stage 1, joint)
    stage1_run: str = ""  # stage 2: stage-1 run folder whose best student is loaded and frozen
    load_stage1: bool = True  # stage 2 starts from the stage-1 student; false = from the un-trained one (released)
    n_ctx: int = 4  # stage 2 / joint: context vectors M of the global and of the local prompts
    prompt_init: Literal["random", "words"] = "random"  # contexts from N(0, 0.02) (paper) or "a photo of a" (released)
    share_contexts: bool = False  # global and local contexts as two parameters over ONE tensor (released, see docs)
    learn_global: bool = True  # learnable global prompts (False: the global view uses the hand-crafted P^H)
    learn_local: bool = True  # learnable local prompts (False: the local view uses the hand-crafted P^H)
    use_sc: bool = True  # add the semantic-consistency loss L_sc (stage 2, joint)
    sc_on: Literal["global", "local"] = "global"  # prompts L_sc ties to P^H: global (paper) or local (released)
    sc_weight: float = 1.0  # weight of L_sc = mean |P^H - P^G| (or P^L; ||.||_1 / D)
    stage2_epochs: int = 10  # model.name=hpdval (both stages in one run): epochs of stage 2 (stage 1: train.epochs)
    stage2_lr: float = 5e-6  # model.name=hpdval: peak learning rate of stage 2 (stage 1: train.lr)

    RANGES = {"alpha": "[0, 1]", "topk": ">=1", "n_ctx": ">=1", "kd_weight": ">=0", "sc_weight": ">=0",
              "logit_scale": ">=0", "stage2_epochs": ">=0", "stage2_lr": ">0"}  # fmt: skip


STAGES = ("stage1", "stage2", "joint")
STUDENT_RUNS = ("hpdval_stage1", "hpdval_joint")  # run kinds whose student stage 2 can start from
WORDS_INIT = "a photo of a"  # released-code context init (prompt_init=words)


# ------------------------------------------------------------------------------------------ scoring
def topk_mean(scores: Tensor, k: int, dim: int = 1) -> Tensor:
    """Mean of the ``k`` largest values along ``dim``; ``k`` is clamped to the size of that dimension."""
    if k < 1:
        raise ValueError(f"top-k needs k >= 1 (got {k})")
    return scores.topk(min(k, scores.shape[dim]), dim=dim).values.mean(dim=dim)


def fuse_views(s_global: Tensor, s_local: Tensor, alpha: float, fusion: str = "paper") -> Tensor:
    """Fused scores (B, C) of the global-view (B, C) and pooled local-view (B, C) scores.

    paper: alpha * s_global + (1 - alpha) * s_local. released: each view's score vector is L2-normalised over the
    classes first, and alpha weights the local view: (1 - alpha) * s_global / |s_global| + alpha * s_local / |s_local|.
    """
    if fusion == "paper":
        return alpha * s_global + (1.0 - alpha) * s_local
    if fusion == "released":
        return (1.0 - alpha) * F.normalize(s_global, dim=-1) + alpha * F.normalize(s_local, dim=-1)
    raise ConfigError(f"unknown fusion {fusion!r}; valid: ['paper', 'released']")


def dual_view_scores(
    f_global: Tensor,
    f_local: Tensor,
    text_global: Tensor,
    text_local: Tensor,
    alpha: float,
    k: int,
    fusion: str,
    cosine: bool = True,
) -> Tensor:
    """Unscaled fused scores (B, C) from features (B, D), (B, N, D) and prompt features (C, D), (C, D).

    ``cosine`` (paper): cosine similarities; False (released code): raw dot products of the unnormalised features.
    """
    if cosine:
        f_global, f_local = F.normalize(f_global, dim=-1), F.normalize(f_local, dim=-1)
        text_global, text_local = F.normalize(text_global, dim=-1), F.normalize(text_local, dim=-1)
    s_global = f_global @ text_global.T  # (B, C)
    s_local = f_local @ text_local.T  # (B, N, C)
    return fuse_views(s_global, topk_mean(s_local, k, dim=1), alpha, fusion)


def l1_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute difference of (n, D) and (n, D) (= mean_i ||a_i - b_i||_1 / D), in float32."""
    return (a.float() - b.float()).abs().mean()


# --------------------------------------------------------------------------------------- the student
class ResidualMLP(nn.Module):
    """Two-layer embedding head f + W2 GELU(W1 f) (D -> D -> D); W2 starts at zero (the head starts as identity)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


def reinitialise_(module: nn.Module) -> nn.Module:
    """Random weights in place: ``reset_parameters`` of standard layers, N(0, d^-1/2) for the other parameters."""
    covered: set[int] = set()
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
        if callable(reset):
            reset()
            covered |= {id(p) for p in m.parameters(recurse=False)}
    for p in module.parameters():
        if id(p) not in covered:  # class/positional embeddings, projections: scaled like open_clip's constructor
            nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    return module


class StudentEncoder(nn.Module):
    """The student image tower: an open_clip image tower (own weights) + optional embedding head.

    Args:
        visual: the tower (a deep copy of CLIP's ``model.visual``; it must not be shared with CLIP).
        embed_dim: dimension D of the joint space.
        head: ``linear`` (CLIP's ``proj`` only) or ``mlp`` (proj, then :class:`ResidualMLP`).
        init: ``clip`` keeps the weights of ``visual``; ``random`` re-initialises them.
    """

    def __init__(self, visual: nn.Module, embed_dim: int, head: str = "linear", init: str = "clip") -> None:
        super().__init__()
        if head not in ("linear", "mlp") or init not in ("clip", "random"):
            raise ConfigError(f"student: embed_head must be linear|mlp and student_init clip|random ({head}, {init})")
        self.visual = reinitialise_(visual) if init == "random" else visual
        self.head = ResidualMLP(embed_dim) if head == "mlp" else None

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``{"global": f_cls (B, D), "local": f_1..f_N (B, N, D)}`` in the text space."""
        feats = dense_image_features(self.visual, images)
        if self.head is not None:
            feats = {k: self.head(v) for k, v in feats.items()}
        return feats


def load_stage1_student(student: StudentEncoder, run_dir: str | Path, clip: ClipModel | None = None) -> dict:
    """Load the ``best`` student of a stage-1 (or joint) run folder into ``student``; return the checkpoint meta.

    Raises:
        CheckpointError: no checkpoint there, not an HP-DVAL student run, tensors that do not fit ``student``, or
            (when ``clip`` is given and the run has ``clip.json``) a stage 1 trained on other CLIP weights.
    """
    run = Path(run_dir)
    try:
        tensors, meta = read_checkpoint(run / "best")
    except CheckpointError as err:
        raise CheckpointError(f"hpdval.stage1_run: {err}") from None
    tensor_path, meta_path = run / "best.safetensors", run / "best.json"
    model_cfg = (meta.get("config") or {}).get("model") or {}
    if model_cfg.get("name") not in STUDENT_RUNS:
        raise CheckpointError(f"{meta_path}: not an HP-DVAL stage-1 run (model {model_cfg.get('name')!r})")
    sub = {k.removeprefix("student."): v for k, v in tensors.items() if k.startswith("student.")}
    problems = state_dict_mismatch(student.state_dict(), sub)
    if problems:
        stage1 = (
            f"clip_arch {model_cfg.get('clip_arch')}, embed_head {(model_cfg.get('hpdval') or {}).get('embed_head')}"
        )
        problem = "; ".join(problems)
        raise CheckpointError(f"{tensor_path}: stage-1 student does not fit this model ({stage1}; {problem})")
    if clip is not None:  # stage 1's only frozen part was CLIP
        identity = {"digest": weights_digest(clip), "parts": {"clip": weights_digest(clip)}, "source": clip.source}
        check_identity(run / "clip.json", identity, "stage 1")
    student.load_state_dict(sub, strict=True)
    logger.info("stage-1 student loaded from %s (epoch %s)", tensor_path, meta.get("epoch"))
    return meta


# ------------------------------------------------------------------------------------------ the model
class HPDVAL(Method):
    """HP-DVAL in one of its modes: ``stage1`` (DVAL), ``stage2`` (HPT on the frozen stage-1 student), ``joint``.

    Attributes:
        clip: the frozen CLIP (text tower for all prompts; its image tower is the L_kd teacher).
        student: :class:`StudentEncoder`, trainable in stage1/joint; a frozen part in stage2 (its features are then
            cached, and its weights are part of the run's identity, so a changed stage-1 run is detected).
        prompt_global / prompt_local: :class:`PromptLearner` (stage2/joint, when learned) or None (P^H used).
        hand_text: P^H (C, D), a non-persistent buffer.
    Forward: ``{"logits": (B, C), "aux_losses": {"kd"?, "sc"?}}`` (aux losses in training mode only).
    """

    feature_keys = ("global", "local")

    def __init__(
        self,
        clip: ClipModel,
        classnames: Sequence[str],
        stage: str = "stage1",
        cfg: HPDVALConfig | None = None,
        templates: Sequence[str] = ("a photo of a {}.",),
    ) -> None:
        super().__init__(len(classnames))
        cfg = cfg or HPDVALConfig()
        _check_config(cfg, stage)
        self.freeze("clip", clip, clip.source)
        self.stage = stage
        self.alpha, self.topk, self.fusion, self.sc_on = cfg.alpha, cfg.topk, cfg.fusion, cfg.sc_on
        self.cosine = cfg.cosine
        self.scale = float(cfg.logit_scale) if cfg.logit_scale > 0 else clip.logit_scale
        visual = copy.deepcopy(clip.model.visual).requires_grad_(True)  # own weights, never CLIP's (the teacher)
        student = StudentEncoder(visual, clip.embed_dim, cfg.embed_head, cfg.student_init).to(clip.device)
        if stage == "stage2":
            if cfg.load_stage1 and cfg.stage1_run:
                load_stage1_student(student, cfg.stage1_run, clip)
                source = str(Path(cfg.stage1_run) / "best")
            else:
                why = "hpdval.load_stage1=false" if not cfg.load_stage1 else "no hpdval.stage1_run"
                logger.warning("%s: prompts are tuned on the un-trained student (student_init=%s), as the released "
                               "stage 2 does; stage-1 weights (%s) are not used", why, cfg.student_init,
                               cfg.stage1_run or "none given")  # fmt: skip
                source = f"un-trained student (student_init={cfg.student_init})"
            self.freeze("student", student, source)
        else:
            self.student = student
            if cfg.stage1_run:
                logger.warning("hpdval.stage1_run is only used by hpdval_stage2; ignored by hpdval_%s", stage)
        self.register_buffer("hand_text", hand_text_features(clip, classnames, templates), persistent=False)
        learn = stage != "stage1"
        words = WORDS_INIT if cfg.prompt_init == "words" else ""
        self.prompt_global = PromptLearner(clip, classnames, cfg.n_ctx, words) if learn and cfg.learn_global else None
        self.prompt_local = PromptLearner(clip, classnames, cfg.n_ctx, words) if learn and cfg.learn_local else None
        if learn and cfg.share_contexts:
            share_context_storage(self.prompt_global, self.prompt_local)
        sc_prompt = self.prompt_global if cfg.sc_on == "global" else self.prompt_local
        self.kd_weight = cfg.kd_weight if stage != "stage2" else 0.0
        self.sc_weight = cfg.sc_weight if learn and cfg.use_sc and sc_prompt is not None else 0.0
        if learn and cfg.use_sc and sc_prompt is None:
            logger.info("L_sc is off: the %s prompts it ties to P^H are not learned", cfg.sc_on)

    @property
    def student_trainable(self) -> bool:
        return self.stage != "stage2"

    @property
    def feature_tower(self) -> nn.Module | None:
        """The frozen stage-2 student (its features are cached); stage 1 and joint train it: nothing to cache."""
        return None if self.student_trainable else self.student

    @property
    def teacher_tower(self) -> nn.Module | None:
        """CLIP (its image tower is the L_kd teacher) while the student trains with L_kd; else None."""
        return self.clip if self.student_trainable and self.kd_weight > 0 else None

    # ------------------------------------------------------------------------------------ features
    @torch.no_grad()
    def teacher_features(self, images: Tensor) -> dict[str, Tensor]:
        """``{"teacher": (B, D)}``: CLIP's image features, the L_kd target (cached when the view is deterministic)."""
        return {"teacher": self.clip.encode_image(images.to(self.clip.device, self.clip.dtype))}

    @torch.no_grad()
    def image_features(self, images: Tensor) -> dict[str, Tensor]:
        """What the feature cache stores: the student's ``{"global": (B, D), "local": (B, N, D)}``."""
        return self.student(images.to(self.clip.device, self.clip.dtype))

    def _features(self, batch: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        """(student features, the images or None when cached features were given)."""
        if "feat_global" in batch and "feat_local" in batch:
            if self.training and self.student_trainable:
                raise ValueError(
                    f"hpdval_{self.stage} trains its student: the batch needs 'image', not cached features"
                )
            feats = {k: batch[f"feat_{k}"].to(self.clip.device, self.clip.dtype) for k in ("global", "local")}
            return feats, None
        if "image" not in batch:
            raise KeyError(
                f"HPDVAL: the batch needs 'image' or cached 'feat_global' and 'feat_local'; got {sorted(batch)}"
            )
        images = batch["image"].to(self.clip.device, self.clip.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.student_trainable):
            return self.student(images), images

    def prompt_features(self) -> tuple[Tensor, Tensor]:
        """(P^G, P^L), (C, D) each: the learned prompts' text features, or P^H for a view without prompts."""
        learners = [p for p in (self.prompt_global, self.prompt_local) if p is not None]
        feats = iter(encode_prompts(self.clip, *learners) if learners else [])
        text_global = next(feats) if self.prompt_global is not None else self.hand_text
        text_local = next(feats) if self.prompt_local is not None else self.hand_text
        return text_global, text_local

    # ------------------------------------------------------------------------------------- forward
    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor | dict[str, Tensor]]:
        feats, images = self._features(batch)
        text_global, text_local = self.prompt_features()
        scores = dual_view_scores(
            feats["global"], feats["local"], text_global, text_local, self.alpha, self.topk, self.fusion, self.cosine
        )  # (B, C)
        out: dict[str, Tensor | dict[str, Tensor]] = {"logits": self.scale * scores}
        aux: dict[str, Tensor] = {}
        if self.training and self.kd_weight > 0:
            aux["kd"] = self.kd_weight * self.kd_loss(feats["global"], images, batch.get("feat_teacher"))
        if self.training and self.sc_weight > 0:
            aux["sc"] = self.sc_weight * l1_distance(
                self.hand_text, text_global if self.sc_on == "global" else text_local
            )
        if aux:
            out["aux_losses"] = aux
        return out

    def kd_loss(self, f_cls: Tensor, images: Tensor | None, cached: Tensor | None = None) -> Tensor:
        """L_kd = mean |f_CLIP(x) - f_cls(x)| over images and dimensions; the teacher is CLIP's frozen image tower.

        ``cached``: the teacher's (B, D) features of these images from the feature cache (``feat_teacher``); they
        are what the tower computes (float32 on the CPU: bit for bit), so the teacher's forward is skipped.
        """
        if cached is not None:
            teacher = cached.to(f_cls.device, self.clip.dtype)  # (B, D)
        elif images is None:
            raise ValueError("L_kd needs the images (the teacher sees them): cached features cannot be used")
        else:
            with torch.no_grad():
                teacher = self.clip.encode_image(images)  # (B, D)
        return l1_distance(teacher, f_cls)


def share_context_storage(first: PromptLearner | None, second: PromptLearner | None) -> None:
    """Make ``second.ctx`` a second parameter over ``first.ctx``'s tensor (the released prompt model's layout).

    Both parameters stay separate to the optimiser (each has its own gradient and state), but they write into one
    tensor, so after every step the two contexts are identical and carry both updates.
    """
    if first is None or second is None:
        raise ConfigError("hpdval.share_contexts needs both learn_global and learn_local")
    if first.ctx.shape != second.ctx.shape:
        raise ConfigError(f"hpdval.share_contexts: context shapes differ ({first.ctx.shape} vs {second.ctx.shape})")
    second.ctx = nn.Parameter(first.ctx.data)  # shares the storage, not a copy
    logger.warning("hpdval.share_contexts: the global and local prompts train ONE context tensor through two "
                   "parameters, as in the released code (the paper has two separate contexts)")  # fmt: skip


def _check_config(cfg: HPDVALConfig, stage: str) -> None:
    if stage not in STAGES:
        raise ConfigError(f"unknown HP-DVAL stage {stage!r}; valid: {list(STAGES)}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ConfigError(f"hpdval.alpha must be in [0, 1] (got {cfg.alpha})")
    if cfg.topk < 1 or cfg.n_ctx < 1:
        raise ConfigError(f"hpdval.topk and hpdval.n_ctx must be >= 1 (got {cfg.topk}, {cfg.n_ctx})")
    if min(cfg.kd_weight, cfg.sc_weight, cfg.logit_scale) < 0:
        raise ConfigError("hpdval.kd_weight, sc_weight and logit_scale must be >= 0")


# ------------------------------------------------------------------------------------ registration
def _builder(stage: str):
    def build(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> HPDVAL:
        return HPDVAL(clip, classnames, stage, cfg.hpdval, cfg.templates)

    return build


def two_stages(cfg: Config, run_dir: Path) -> list[tuple[str, Config]]:
    """``model.name: hpdval``: stage 1 into ``run_dir/stage1``, then stage 2 on its frozen student into ``stage2``.

    Stage 2 runs ``hpdval.stage2_epochs`` epochs at peak learning rate ``hpdval.stage2_lr``; everything else is
    the config of the whole run.
    """
    stage1 = copy.deepcopy(cfg)
    stage1.model.name, stage1.name = "hpdval_stage1", f"{cfg.name}/stage1"
    stage2 = copy.deepcopy(cfg)
    stage2.model.name, stage2.name = "hpdval_stage2", f"{cfg.name}/stage2"
    stage2.model.hpdval.stage1_run = str((Path(run_dir) / "stage1").resolve())
    stage2.train.epochs, stage2.train.lr = cfg.model.hpdval.stage2_epochs, cfg.model.hpdval.stage2_lr
    return [("stage1", stage1), ("stage2", stage2)]


SECTIONS = {"hpdval": HPDVALConfig}
SPECS = {
    "hpdval_stage1": MethodSpec(_builder("stage1"), SECTIONS, summary="HP-DVAL stage 1 (DVAL): the student"),
    "hpdval_stage2": MethodSpec(_builder("stage2"), SECTIONS, summary="HP-DVAL stage 2 (HPT): hierarchical prompts"),
    "hpdval_joint": MethodSpec(_builder("joint"), SECTIONS, summary="HP-DVAL, student and prompts trained jointly"),
    "hpdval": MethodSpec(None, SECTIONS, stages=two_stages, summary="HP-DVAL, both stages in one run folder"),
}
