"""Training progress on standard output: fastai's bars in a terminal, plain lines anywhere else.

fastai's console bars redraw themselves with carriage returns whether or not standard output is a
terminal, so a Slurm log or a pipe fills with bar frames. When standard output is not a terminal,
``EpochLines`` prints instead one line at the end of each phase (training, validation) and the
epoch's row of losses and metrics, as fastai's table does.
"""

from __future__ import annotations

import sys
import time

from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastprogress.fastprogress import format_time

BAR_LOSS_EVERY = 10
"""Training batches between two updates of the smoothed loss shown on a terminal's bar (each update
copies it to the host, a wait in the step)."""


class TerminalProgress(ProgressCallback):
    """fastai's progress bars, with the smoothed loss read every ``BAR_LOSS_EVERY`` batches."""

    def after_batch(self) -> None:
        self.pbar.update(self.iter + 1)
        if self.training and self.iter % BAR_LOSS_EVERY == 0 and hasattr(self, "smooth_loss"):
            self.pbar.comment = f"{float(self.smooth_loss):.4f}"


class EpochLines(Callback):
    """One line per phase and one table row per epoch, flushed at once (see the module docstring)."""

    order = ProgressCallback.order

    def __init__(self, first_epoch: int, epochs: int):
        self.first_epoch, self.epochs = first_epoch, epochs

    def before_fit(self) -> None:
        self.widths: list[int] = []
        self.learn.logger = self.write_row
        self.write_row(self.recorder.metric_names)

    def before_train(self) -> None:
        self.started = time.time()

    def before_validate(self) -> None:
        self.started = time.time()

    def after_train(self) -> None:
        self.phase_line("training")

    def after_validate(self) -> None:
        self.phase_line("validation")

    def phase_line(self, phase: str) -> None:
        print(f"Epoch {self.first_epoch + self.epoch + 1}/{self.epochs}: {phase} done, {self.n_iter} batches in "
              f"{format_time(time.time() - self.started)}", flush=True)

    def write_row(self, values) -> None:
        """A row of the epoch table: names the first time, then values aligned under them."""
        cells = [f"{value:.6f}" if isinstance(value, float) else str(value) for value in values]
        if not self.widths:
            self.widths = [max(8, len(cell)) for cell in cells]
        else:
            cells[0] = str(self.first_epoch + int(cells[0]))  # fastai counts the epochs of this fit
        print("  ".join(cell.ljust(width) for cell, width in zip(cells, self.widths)).rstrip(), flush=True)

    def after_fit(self) -> None:
        self.learn.logger = print


def progress_callback(first_epoch: int, epochs: int, stream=None) -> Callback:
    """``TerminalProgress`` when `stream` (standard output) is a terminal, else ``EpochLines``."""
    stream = sys.stdout if stream is None else stream
    return TerminalProgress() if stream.isatty() else EpochLines(first_epoch, epochs)
