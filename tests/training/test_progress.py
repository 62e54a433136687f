"""Progress on standard output: one line per phase and one row per epoch when it is not a terminal,
fastai's bars (with carriage-return frames) on a terminal."""

import io
from contextlib import redirect_stdout

import torch
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from torch.utils.data import TensorDataset

from cov3d.training.progress import EpochLines, TerminalProgress, progress_callback


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def toy_fit(progress, epochs: int = 2) -> str:
    """Stdout of a fit of a linear layer (3 training batches, 2 validation batches an epoch) with `progress`."""
    data = TensorDataset(torch.arange(12.0).reshape(6, 2), torch.ones(6, 1))
    valid = TensorDataset(torch.ones(4, 2), torch.ones(4, 1))
    learner = Learner(DataLoaders.from_dsets(data, valid, bs=2, device="cpu"), torch.nn.Linear(2, 1),
                      loss_func=torch.nn.functional.mse_loss)
    learner.remove_cb(ProgressCallback)
    learner.add_cb(progress)
    out = io.StringIO()
    with redirect_stdout(out):
        learner.fit(epochs, lr=1e-3)
    return out.getvalue()


def test_the_stream_chooses_the_progress():
    assert isinstance(progress_callback(0, 2, io.StringIO()), EpochLines)
    assert isinstance(progress_callback(0, 2, Terminal()), TerminalProgress)


def test_a_log_gets_one_line_per_phase_and_a_row_per_epoch():
    log = toy_fit(EpochLines(first_epoch=3, epochs=5))
    assert "\r" not in log
    lines = log.splitlines()
    assert lines[0].split() == ["epoch", "train_loss", "valid_loss", "time"]
    assert lines[1].startswith("Epoch 4/5: training done, 3 batches in ")
    assert lines[2].startswith("Epoch 4/5: validation done, 2 batches in ")
    assert lines[3].split()[0] == "3" and len(lines[3].split()) == 4  # the absolute epoch, 0-based as metrics.csv
    assert lines[4].startswith("Epoch 5/5: training done") and lines[6].split()[0] == "4"
    assert len(lines) == 7


def test_fastais_bars_write_frames_anywhere():
    """Why the log needs its own progress: fastai's console bars redraw with carriage returns even into a pipe."""
    assert toy_fit(ProgressCallback()).count("\r") > 10
