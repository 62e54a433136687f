"""The two recipes of a training run, as tables of defaults (docs/faithfulness.md).

``paper`` (the default): what the paper describes, and where it is silent the original code's
defaults (``TrainSettings``'s own defaults). ``original``: the defaults of the original code as it
was when the paper was written (rbturnbull/cov3d at c562971, July 2022), where they differ from
the paper: its coordinate warp, a 4-way severity loss over graded scans only (1 + 4 outputs), a
presence BCE with ``pos_weight``, batch 4, fastai's weight decay of 0.01, 20 epochs, reflection off
(and, when on, applied to validation scans as well), presence decided by the mean logit, and one
kept checkpoint per run.

A recipe only changes defaults: every option given explicitly wins over it. Torch-free, and
imports nothing from ``cov3d.settings`` (which imports it).
"""

from __future__ import annotations

from typing import Any

from cov3d.errors import Cov3dError

PAPER, ORIGINAL = "paper", "original"
RECIPES = (PAPER, ORIGINAL)
"""The recipes, the default first."""

ORIGINAL_WARP = 0.5
"""The warp factor the original code applied to every volume by default; the paper does not describe
the warp, so the paper recipe's is 0 (off)."""

EVERY_SCAN, GRADED_ONLY = "every-scan", "graded-only"
SEVERITY_LOSSES = (EVERY_SCAN, GRADED_ONLY)
"""The severity loss: the paper's 5-way cross entropy over every scan (eqs. 3-5: negatives as class 0,
ungraded positives by eq. 5, class weights and neighbour smoothing; 1 + 5 outputs), or the original
code's default, a 4-way unweighted, unsmoothed cross entropy over the graded scans of a batch only
(1 + 4 outputs; 0 for a batch without a graded scan)."""
ITEM_WEIGHTS, POS_WEIGHT = "item-weights", "pos-weight"
PRESENCE_WEIGHTINGS = (ITEM_WEIGHTS, POS_WEIGHT)
"""How presence is weighted: eq. 2's weight w_i of each scan (class-balancing, ``class_weights``), or
the original code's BCE ``pos_weight`` = non-covid / covid training scans, which multiplies the
y log p term only."""
MEAN_PROBABILITY, MEAN_LOGIT = "mean-probability", "mean-logit"
PRESENCE_DECISIONS = (MEAN_PROBABILITY, MEAN_LOGIT)
"""P(covid) over a scan and its reflection: the mean of the two probabilities (paper §3.5), or the
sigmoid of the mean logit (the original code decided presence by mean logit >= 0)."""
PER_TASK, ONE_CHECKPOINT = "per-task", "one"
KEPT_WEIGHTS = (PER_TASK, ONE_CHECKPOINT)
"""The weights a run keeps: the best of each task (paper §3.4), or one checkpoint, the best presence
F1 (the best severity F1 when lambda = 1), which then predicts both tasks (the original code)."""

CHOICES = {
    "recipe": RECIPES, "severity_loss": SEVERITY_LOSSES, "presence_weighting": PRESENCE_WEIGHTINGS,
    "presence_decision": PRESENCE_DECISIONS, "kept_weights": KEPT_WEIGHTS,
}
"""The settings that name one of a few choices, with their choices."""

ORIGINAL_DEFAULTS: dict[str, Any] = {
    "epochs": 20,
    "batch_size": 4,
    "weight_decay": 0.01,
    "reflect": False,
    "validation_reflection": True,
    "severity_loss": GRADED_ONLY,
    "severity_smoothing": 0.0,
    "presence_weighting": POS_WEIGHT,
    "presence_decision": MEAN_LOGIT,
    "kept_weights": ONE_CHECKPOINT,
}
"""The original code's defaults at c562971 where they differ from the paper recipe (``TrainSettings``
fields; the warp is ``RECIPE_WARPS``). Its severity smoothing was commented out, so ε_s is 0."""
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {PAPER: {}, ORIGINAL: ORIGINAL_DEFAULTS}
"""Per recipe, the ``TrainSettings`` fields whose defaults it changes."""
RECIPE_WARPS = {PAPER: 0.0, ORIGINAL: ORIGINAL_WARP}
"""Per recipe, the default warp factor of the volumes (``VolumeShape.warp``)."""
RECIPE_HELP = (
    "Which defaults the other options take: paper (what the paper describes) or original (the original code's "
    f"defaults at c562971: warp {ORIGINAL_WARP}, 1 + 4 outputs with a 4-way cross entropy over graded scans only, "
    "presence BCE with pos_weight, batch 4, weight decay 0.01, 20 epochs, no reflection (when on, validation is "
    "reflected too), presence by the mean logit, one checkpoint). Options given explicitly win. Recorded in the run."
)


def check_choice(name: str, value: Any) -> None:
    """``Cov3dError`` unless ``value`` is one of the choices of the setting ``name`` (``CHOICES``)."""
    if value not in CHOICES[name]:
        raise Cov3dError(f"`{name}` must be one of {', '.join(CHOICES[name])}, got '{value}'.")


def check_recipe_settings(settings: Any) -> None:
    """Reject recipe-related settings (of a ``TrainSettings``) that are not choices or do not go
    together: the graded-only loss has no label smoothing."""
    for name in CHOICES:
        check_choice(name, getattr(settings, name))
    if settings.severity_loss == GRADED_ONLY and settings.severity_smoothing > 0 and settings.severity_factor > 0:
        raise Cov3dError(
            f"`severity_loss={GRADED_ONLY}` (the original code's loss) has no label smoothing: give "
            f"`severity_smoothing=0`, or `severity_loss={EVERY_SCAN}` to smooth."
        )


def recipe_defaults(recipe: str) -> dict[str, Any]:
    """The ``TrainSettings`` fields whose defaults ``recipe`` changes, with its values."""
    check_choice("recipe", recipe)
    return dict(RECIPE_DEFAULTS[recipe])


def recipe_warp(recipe: str, warp: float | None = None) -> float:
    """``warp`` if given, else the warp factor of ``recipe``."""
    check_choice("recipe", recipe)
    return RECIPE_WARPS[recipe] if warp is None else warp
