"""Shared fixtures: tiny synthetic datasets in the COV19-CT-DB layout and one tiny trained run."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from cov3d.preprocessing.workers import available_cpus
from cov3d.settings import VolumeShape
from cov3d.synthetic.generator import generate_dataset

TINY_SIZE = (8, 32, 32)  # (D, H, W): small enough for r3d_18 on a CPU in well under a second per step
DISK_NEEDED_GIB = 6  # each of the two workers' folders peaks at about 2.2 GB (every r3d_18 file is 130-400 MB, whatever the volume size), plus a margin


TRAINING_FIXTURES = {"tiny_run", "demo", "ddp_run", "runs", "lesion_model"}
"""Fixtures that train a model: every test that uses one, directly or through another fixture, is slow."""
UNMARKED_FIT_PARAMETERS = 100_000
"""A test may fit a toy model (a linear layer) unmarked; r3d_18 (33 M parameters) makes it slow."""
_running: dict[str, pytest.Item | None] = {"item": None}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark as ``slow`` every test that uses a training fixture (the others that train carry the mark)."""
    for item in items:
        if TRAINING_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _running["item"] = item  # session and module fixtures are set up within the first test that needs them


def pytest_runtest_teardown(item: pytest.Item) -> None:
    _running["item"] = None


def refuse_unmarked_training() -> None:
    """Make fastai's ``Learner.fit`` of a real network fail a test that lacks the ``slow`` mark, so that
    ``pytest -m "not slow"`` stays the fast tier (training in a subprocess is marked by hand)."""
    from fastai.learner import Learner

    fit = Learner.fit

    def checked_fit(self, *args, **kwargs):
        item = _running["item"]
        parameters = sum(p.numel() for p in self.model.parameters())
        if item is not None and item.get_closest_marker("slow") is None and parameters > UNMARKED_FIT_PARAMETERS:
            pytest.fail(f"{item.nodeid} trains a model (Learner.fit) without @pytest.mark.slow; mark it, "
                        "or the test's training fixture in TRAINING_FIXTURES (tests/conftest.py).", pytrace=False)
        return fit(self, *args, **kwargs)

    Learner.fit = checked_fit


def pytest_configure(config: pytest.Config) -> None:
    """In each pytest-xdist worker (``-n 2`` in pyproject.toml), torch and the processes the tests start
    use that worker's share of the cores, so that the workers do not oversubscribe them (unless
    ``OMP_NUM_THREADS`` is set already: the user's choice stands)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, available_cpus() // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop at once, in one line, when the temporary folder's disk cannot hold the suite's model files;
    refuse training in tests that are not marked slow."""
    refuse_unmarked_training()
    folder = Path(session.config.option.basetemp or tempfile.gettempdir()).resolve()
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    free_gib = shutil.disk_usage(existing).free / 2**30
    if free_gib < DISK_NEEDED_GIB:
        pytest.exit(
            f"Only {free_gib:.1f} GiB free on the disk of {folder}; the tests need about {DISK_NEEDED_GIB} GiB. "
            "Free some space or point --basetemp at a larger disk.",
            returncode=1,
        )


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.cache/cov3d from a test."""
    monkeypatch.setenv("COV3D_CACHE_DIR", str(tmp_path_factory.mktemp("default-cache")))
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture(scope="module")
def module_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for one test module's shared fixtures, deleted after the module unless one of its
    tests failed: the suite's disk use stays at one module's model files, not the sum of all."""
    failed_before = request.session.testsfailed
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """12 scans of 32x32 slices with severity CSVs and an unlabelled test split; read-only for tests."""
    out = tmp_path_factory.mktemp("tiny-dataset")
    generate_dataset(out, scans=16, seed=0, slice_size=32, depth_scale=0.05)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_dataset) -> Path:
    """A one-epoch training run on the tiny dataset (from scratch, fp32, CPU)."""
    from cov3d.training.train import TrainSettings, train

    root = tmp_path_factory.mktemp("tiny-run")
    depth, height, width = TINY_SIZE
    settings = TrainSettings(shape=VolumeShape(depth, height, width), epochs=1, penultimate=16, severity_factor=0.5)
    train(
        tiny_dataset, root / "run", settings, cache_dir=root / "cache", pretrained=False,
        device="cpu", precision="fp32", workers=1,
    )
    return root / "run"
