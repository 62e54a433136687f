"""The layout of the model's outputs per scan (paper eqs. 1 and 3): the presence logit x, then the
severity logits z_0..z_4 (z_0 "COVID negative", z_1..z_4 mild..critical). A presence-only model
(lambda = 0) has x alone; a model trained with the original code's graded-only severity loss has x
and z_1..z_4 (1 + 4 outputs, no z_0). Probabilities kept in the same layout (sigmoid(x), softmax(z))
are read with the same helpers. Torch-free: the helpers slice any (B, outputs) array.
"""

from __future__ import annotations

from typing import TypeVar

Array = TypeVar("Array")

PRESENCE_OUTPUTS = 1
"""Outputs of a presence-only model (lambda = 0): x."""
SEVERITY_CLASSES = 5
"""Softmax classes of eq. 3: 0 = COVID negative, 1..4 = mild..critical."""
OUTPUTS = PRESENCE_OUTPUTS + SEVERITY_CLASSES
"""Outputs of the combined model: x, z_0..z_4."""
GRADE_CLASSES = SEVERITY_CLASSES - 1
"""Mild, moderate, severe, critical."""
GRADED_OUTPUTS = PRESENCE_OUTPUTS + GRADE_CLASSES
"""Outputs of a model trained with the graded-only severity loss: x, z_1..z_4."""
PRESENCE_COLUMN = 0
SEVERITY_COLUMNS = slice(PRESENCE_OUTPUTS, None)
"""z_0..z_4 (z_1..z_4 for a graded-only model) among the outputs."""
GRADES = slice(1, SEVERITY_CLASSES)
"""z_1..z_4 (mild..critical) among the severity logits z_0..z_4."""
GRADE_COLUMNS = slice(-GRADE_CLASSES, None)
"""z_1..z_4 (mild..critical) among the outputs: the last four in both layouts."""


def model_outputs(severity_factor: float, graded_only: bool = False) -> int:
    """Outputs of a model trained with lambda = ``severity_factor``: x alone for 0, else x and z_0..z_4
    (x and z_1..z_4 with the ``graded_only`` severity loss)."""
    if severity_factor == 0.0:
        return PRESENCE_OUTPUTS
    return GRADED_OUTPUTS if graded_only else OUTPUTS


def has_severity(outputs: int) -> bool:
    """Whether a model of ``outputs`` outputs predicts severity."""
    return outputs >= GRADED_OUTPUTS


def has_negative_class(outputs: int) -> bool:
    """Whether a model of ``outputs`` outputs has z_0, "COVID negative" (the paper's 1 + 5 layout)."""
    return outputs >= OUTPUTS


def presence_output(outputs: Array) -> Array:
    """(B, outputs) -> (B,): x (or sigmoid(x)), e.g. ``presence_output(logits)``."""
    return outputs[:, PRESENCE_COLUMN]


def severity_outputs(outputs: Array) -> Array:
    """(B, 6) -> (B, 5): z_0..z_4 (or their softmax); (B, 5) -> (B, 4), z_1..z_4, for a graded-only model."""
    return outputs[:, SEVERITY_COLUMNS]


def grade_outputs(outputs: Array) -> Array:
    """(B, 6) or (B, 5) -> (B, 4): z_1..z_4, mild..critical (or their probabilities)."""
    return outputs[:, GRADE_COLUMNS]
