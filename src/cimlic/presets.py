"""Presets: a method as its paper describes it (the default) or as the authors' released code computes it.

``model.preset`` names one of ``PRESETS``:

- ``paper``: nothing changes; every default and shipped config follows the paper.
- ``released``: every difference the released code makes on purpose (``RELEASED`` below, per method).
- ``released_exact``: ``released`` plus the released code's bugs that shaped its numbers (``exact_only``). Each of
  them is logged as a warning when it is switched on, so none is reproduced silently.

A preset is applied on top of the config file, and ``--set`` overrides win over it (``cimlic.config.load_config``);
the resolved config saved in a run folder holds the values, so a finished run reloads without re-applying it.
The facts come from reading the released repositories; the tests pin each formula by hand, and the README's table
("Paper or released code") is this module in prose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cimlic.errors import ConfigError

logger = logging.getLogger(__name__)

PRESETS = ("paper", "released", "released_exact")


@dataclass(frozen=True)
class Difference:
    """One place where the released code differs from the paper, as a config key.

    Attributes:
        key: dotted config key.
        paper: the value the paper (and the shipped configs) use.
        released: the value that reproduces the released code.
        what: what the released code does there.
        exact_only: a bug of the released code: only ``released_exact`` switches it on.
    """

    key: str
    paper: Any
    released: Any
    what: str
    exact_only: bool = False


HPDVAL = (
    Difference("model.hpdval.cosine", True, False, "scores are raw dot products of the unnormalised features"),
    Difference("model.hpdval.logit_scale", 0.0, 1.0, "no logit scale on the fused score (0 = CLIP's scale)"),
    Difference("model.hpdval.fusion", "paper", "released",
               "each view's score vector is L2-normalised over the classes; alpha weights the local view"),
    Difference("model.hpdval.alpha", 0.4, 0.5, "the headline logs' fusion weight"),
    Difference("model.hpdval.topk", 32, 16, "the headline logs' k of the local view"),
    Difference("model.hpdval.prompt_init", "random", "words", 'contexts start from "a photo of a" (paper: N(0, 0.02))'),
    Difference("model.hpdval.share_contexts", False, True,
               "the global and local contexts are two parameters over one tensor (the word init wrapped twice), "
               "so every optimiser step applies both updates to one shared context"),
    Difference("model.hpdval.sc_on", "global", "local", "L_sc ties the local prompts (paper: the global ones) to P^H"),
    Difference("loss.name", "db_star", "db", "plain DB: the DB* class weighting w_c = n_c / max n_k is not there"),
    Difference("loss.db.pos_scale", 1.0, 10.0, "a constant scale of 10 on the positive logits, on top of DB's weights"),
    Difference("loss.db.bias_convention", "paper", "released", "DB's logit shift is kappa * b_c / lambda"),
    Difference("train.ema", 0.0, 0.998, "EMA of the weights; the EMA weights are evaluated"),
    Difference("train.schedule", "cosine", "onecycle", "one-cycle learning rate"),
    Difference("eval.select_on", "val", "test", "the epoch is selected on the test set (labelled selected_on: test)"),
    Difference("model.hpdval.kd_weight", 1.0, 0.0,
               "the teacher shares its modules with the student, so L_kd is identically 0 (bug)", exact_only=True),
    Difference("loss.db.focal_reduction", "element", "batch",
               "DB's focal factor is one scalar per batch, from the batch-mean BCE (bug)", exact_only=True),
    Difference("model.hpdval.load_stage1", True, False,
               "stage 2 does not load the stage-1 student: prompts are tuned on the un-trained one", exact_only=True),
)  # fmt: skip

CPRFL = (
    Difference("model.cprfl.train_text", False, True, "the CLIP text encoder is trained (paper: frozen)"),
    Difference("loss.asl.detach_focusing", False, True, "ASL's focusing weight is a constant (no gradient through it)"),
    Difference("loss.asl.reduction", "sum", "mean", "ASL is averaged over the B x C entries"),
    Difference("train.schedule", "cosine", "onecycle", "one-cycle learning rate"),
    Difference("train.onecycle_pct", 0.2, 0.1, "one-cycle rises over the first 10 % of the steps"),
    Difference("eval.select_on", "val", "test", "the epoch is selected on the test set (labelled selected_on: test)"),
)  # fmt: skip

DUALCOOP = (
    Difference("model.dualcoop.logit", "paper", "released",
               "the tau_s-scaled region scores are reused in the weighted sum: the logits carry tau_s * tau = 100"),
    Difference("model.dualcoop.mean_token", False, True,
               "ResNet CLIPs: the attention pool's mean token is a 50th region (ViT towers: no change)"),
)  # fmt: skip

LMPT = (
    Difference("loss.db.bias_convention", "paper", "released", "DB's logit shift is kappa * b_c / lambda"),
    Difference("eval.ap_scores", "logits", "class_softmax",
               "AP ranks the softmax of the logits across classes (evaluation and selection)"),
    Difference("eval.select_on", "val", "test", "the epoch is selected on the test set (labelled selected_on: test)"),
    Difference("loss.db.focal_reduction", "element", "batch",
               "DB's focal factor is one scalar per batch, from the batch-mean BCE (bug)", exact_only=True),
)  # fmt: skip

# model.name -> the released-code differences of its method
RELEASED: dict[str, tuple[Difference, ...]] = {
    "hpdval": HPDVAL,
    "hpdval_stage1": HPDVAL,
    "hpdval_stage2": HPDVAL,
    "hpdval_joint": HPDVAL,
    "cprfl": CPRFL,
    "dualcoop": DUALCOOP,
    "lmpt": LMPT,
}

ONECYCLE_MOMENTUM = (
    "torch's OneCycleLR also cycles the momentum (beta1 0.95 -> 0.85 -> 0.95) by default: cimlic's onecycle sets "
    "the same learning rates and keeps beta1"
)
# released behaviours with no switch, per method, and why (the README's table lists them too)
NOT_REPRODUCED: dict[str, tuple[str, ...]] = {
    "hpdval": (ONECYCLE_MOMENTUM,),
    "cprfl": (
        ONECYCLE_MOMENTUM,
        "train.py's own defaults (batch 16, a one-cycle schedule over 80 epochs, 0.1x learning rates for "
        "'Backbone' parameter groups, no weight decay on biases and 1-D tensors): the preset keeps the paper's recipe",
    ),
    "dualcoop": (),
    "lmpt": (
        "the released class-specific embedding loss (token-embedding cosines, softmax-of-counts weights) cannot run "
        "as published (it sums a (B, C) tensor over dim 2): cimlic's CSE loss is [our design] from the paper",
        "ReduceLROnPlateau on the test mAP",
    ),
}


def preset_overrides(model_name: str, preset: str) -> dict[str, Any]:
    """The ``key -> value`` settings of ``preset`` for the method of ``model_name`` (empty for ``paper``).

    Raises:
        ConfigError: unknown preset, or a released preset for a method that has none.
    """
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: {preset!r} is not one of {list(PRESETS)}")
    if preset == "paper":
        return {}
    if model_name not in RELEASED:
        raise ConfigError(
            f"model.preset={preset}: model {model_name!r} has no released preset; presets exist for {sorted(RELEASED)}"
        )
    return {d.key: d.released for d in RELEASED[model_name] if preset == "released_exact" or not d.exact_only}


def apply_preset(cfg: Any) -> dict[str, Any]:
    """Set ``cfg.model.preset``'s values on ``cfg`` in place; returns what was set (logged)."""
    values = preset_overrides(cfg.model.name, cfg.model.preset)
    bugs = {d.key for d in RELEASED.get(cfg.model.name, ()) if d.exact_only}
    for key, value in values.items():
        *path, leaf = key.split(".")
        target = cfg
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, value)
        if key in bugs:
            logger.warning("preset %s: %s=%r reproduces a bug of the released code", cfg.model.preset, key, value)
    if values:
        logger.info("preset %s for %s: %s", cfg.model.preset, cfg.model.name,
                    ", ".join(f"{k}={v!r}" for k, v in values.items()))  # fmt: skip
    return values


METHOD_NAMES = {"hpdval": "HP-DVAL", "cprfl": "CPRFL", "dualcoop": "DualCoOp", "lmpt": "LMPT"}


def markdown_table() -> str:
    """The README's table of paper-vs-released differences (and the released behaviours with no switch)."""
    rows = ["| method | switch | paper (default) | released | what the released code does | preset |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for method, title in METHOD_NAMES.items():
        for d in RELEASED[method]:
            preset = "`released_exact` (bug)" if d.exact_only else "`released`"
            rows.append(f"| {title} | `{d.key}` | `{d.paper!r}` | `{d.released!r}` | {d.what} | {preset} |")
    notes = [f"- {METHOD_NAMES[m]}: {note}" for m, items in NOT_REPRODUCED.items() for note in items]
    return "\n".join(rows) + "\n\nReleased behaviours with no switch:\n" + "\n".join(notes) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
