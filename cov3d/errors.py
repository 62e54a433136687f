"""Errors that the command line shows to the user as a single line.

A message names the settings it is about by their Python names in backticks, alone or with a value:
`` `learning_rate` ``, `` `precision=fp32` ``, `` `pretrained=False` ``. That is how a Python caller
passes them; the command line shows each as its option (``--learning-rate``, ``--precision fp32``,
``--no-pretrained``; ``cov3d.cli.phrase``). Errors that carry data keep it in fields.
"""

from __future__ import annotations

from typing import Any


class Cov3dError(Exception):
    """A user-facing error: its message is shown as one line.

    The message is kept apart from ``args``, which fastai rewrites ("Exception occured in
    `Callback` when calling event ...") when an error passes through a training callback.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def one_line(text: object) -> str:
    """``str(text)`` with all whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


class OptionOutOfRange(Cov3dError):
    """The setting ``option`` (its Python name, e.g. ``learning_rate``) got ``value``, which breaks
    ``rule`` (in words: 'a finite number > 0'); ``limit`` is the ``cov3d.limits.Limit``."""

    def __init__(self, option: str, value: Any, rule: str, limit: Any = None):
        self.option, self.value, self.rule, self.limit = option, value, rule, limit
        super().__init__(f"`{option}` must be {rule}, got {value!r}.")


class BaselineNotBeaten(Cov3dError):
    """The demo's model scored no better than the trivial baseline; ``report`` holds all its scores."""

    def __init__(self, message: str, report: Any):
        super().__init__(message)
        self.report = report


class NonFiniteTraining(Cov3dError):
    """Training met a loss or gradient that is not finite; nothing of that step was applied.

    Carries where it happened (1-based `epoch` of `epochs`, `batch` of `batches`), `what` went
    non-finite ("training loss", "validation loss" or "gradient of <parameter>"), the `precision` in
    use and the last completed epoch the run can resume from (None: nothing to resume).
    """

    def __init__(self, *, what: str, epoch: int, epochs: int, batch: int, batches: int, precision: str,
                 learning_rate: float, resumable_epoch: int | None, run_dir: str):
        self.what, self.epoch, self.epochs, self.batch, self.batches = what, epoch, epochs, batch, batches
        self.precision, self.learning_rate, self.resumable_epoch, self.run_dir = (
            precision, learning_rate, resumable_epoch, run_dir)
        if precision == "fp32":
            cause, remedy = "a learning rate too high for this data", "Try a lower --learning-rate"
        else:
            cause = f"reduced precision ({precision}) overflowing or a kernel computing it wrongly"
            remedy = "Try --precision fp32 or a lower --learning-rate"
        if resumable_epoch is None:
            kept = "no epoch had finished, so start the run again"
        else:
            kept = f"the checkpoint and best weights of epoch {resumable_epoch} are intact; continue with --resume {run_dir}"
        super().__init__(
            f"Training stopped at epoch {epoch} of {epochs}, batch {batch} of {batches}: the {what} is not finite, "
            f"likely from {cause}. {remedy} (now {learning_rate:g}); {kept}."
        )
