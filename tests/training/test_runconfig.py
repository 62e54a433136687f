"""A run folder's config read back (old runs included, and the precision the run resolved for --resume) and the
checks before a new run starts in a folder."""

import json
from pathlib import Path

import pytest

from cov3d.errors import Cov3dError
from cov3d.runfiles import CONFIG_FILE, WEIGHTS_FILES
from cov3d.settings import TrainSettings
from cov3d.training.runconfig import (
    check_new_run,
    recorded_settings,
    remove_leftover_temporaries,
    remove_run_files,
    resumed_options,
)

SCHEDULE_KEYS = ("pct_start", "div_factor", "final_div_factor", "momentums")


def test_settings_round_trip_through_config_json(tmp_path):
    settings = TrainSettings(pct_start=0.3, div_factor=10.0, final_div_factor=1e4, momentums=(0.9, 0.8, 0.9))
    config = json.loads(json.dumps({**settings.to_config(), "data_dir": str(tmp_path)}))
    assert config["momentums"] == [0.9, 0.8, 0.9]
    assert recorded_settings(config, tmp_path, TrainSettings) == settings


def test_runs_made_before_the_schedule_was_recorded_resume_with_the_schedule_they_ran(tmp_path):
    config = {key: value for key, value in TrainSettings().to_config().items() if key not in SCHEDULE_KEYS}
    settings = recorded_settings({**config, "data_dir": str(tmp_path)}, tmp_path, TrainSettings)
    assert (settings.pct_start, settings.div_factor, settings.final_div_factor) == (0.25, 25.0, 1e5)
    assert settings.momentums == (0.95, 0.85, 0.95)


def test_a_new_run_refuses_a_folder_with_a_run_unless_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_FILE).write_text("{}")
    (run / WEIGHTS_FILES["presence"]).write_bytes(b"")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(Cov3dError, match="already holds a cov3d run .*cannot be continued .*--overwrite"):
        check_new_run(run, overwrite=False)
    earlier = check_new_run(run, overwrite=True)
    assert sorted(path.name for path in earlier) == sorted([CONFIG_FILE, WEIGHTS_FILES["presence"]])
    remove_run_files(run, earlier)
    assert [path.name for path in run.iterdir()] == ["notes.txt"]


def test_leftover_temporaries_are_removed_and_said_so_and_one_that_cannot_be_is_named(tmp_path, capsys, monkeypatch):
    removable, stuck, foreign = ".metrics.csv.a1b2c3d4.tmp", ".config.json.e5f6g7h8.tmp", ".notes.txt.a1b2c3d4.tmp"
    for name in (removable, stuck, foreign):
        (tmp_path / name).write_text("")
    unlink = Path.unlink

    def refuse_stuck(path, missing_ok=False):
        if path.name == stuck:
            raise PermissionError(1, "Operation not permitted")
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse_stuck)
    remove_leftover_temporaries(tmp_path)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"Removed 1 temporary file(s) that a killed run left in {tmp_path}: {removable}",
                     f"Could not remove 1 temporary file(s) that a killed run left in {tmp_path} (not yours?): {stuck}. "
                     "They are never read; delete them when you can."]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([stuck, foreign])
    remove_leftover_temporaries(tmp_path / "missing")  # a new run's folder: nothing to do, nothing said
    assert capsys.readouterr().err == ""


def test_a_new_run_refuses_a_folder_inside_its_data(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(Cov3dError, match="inside the input folder"):
        check_new_run(tmp_path / "data" / "run", overwrite=True, inputs=[tmp_path / "data"])


def config(precision: str, started_with: str = "auto") -> dict:
    return {"data_dir": "/data", "precision": precision,
            "arguments": {"precision": started_with, "device": "auto", "cache_dir": None}}


@pytest.mark.parametrize("recorded", ["bf16", "fp16", "fp32"])
def test_a_run_started_with_auto_resumes_in_the_precision_it_resolved(recorded):
    """What train.py records (Precision.name) is read back as that --precision, whatever auto means on
    the machine that resumes, and the resume says so in one line."""
    options, messages = resumed_options(config(recorded), {})
    assert options["precision"] == recorded
    assert messages == [f"precision: {recorded}, as the run resolved --precision auto when it started"]


def test_a_precision_given_again_overrides_the_recorded_one():
    options, messages = resumed_options(config("bf16"), {"precision": "fp32"})
    assert options["precision"] == "fp32"
    assert messages == ["overriding precision: recorded bf16, now fp32"]


def test_an_explicit_precision_resumes_without_a_note_and_an_unrecorded_one_as_started():
    assert resumed_options(config("bf16", started_with="bf16"), {}) == (
        {"data_dir": "/data", "cache_dir": None, "device": "auto", "precision": "bf16", "workers": None,
         "loader_workers": None, "use_wandb": False, "deterministic": True}, [])
    unrecorded = {"data_dir": "/data", "arguments": {"precision": "fp32"}}
    assert resumed_options(unrecorded, {})[0]["precision"] == "fp32"


def test_a_run_resumes_with_the_kernels_it_chose():
    """--no-deterministic is recorded in the run's arguments and kept on resume; runs from before the option
    were deterministic."""
    fast = {**config("fp32", started_with="fp32"), "arguments": {"precision": "fp32", "deterministic": False}}
    assert resumed_options(fast, {})[0]["deterministic"] is False
    assert resumed_options(config("fp32", started_with="fp32"), {})[0]["deterministic"] is True
    options, messages = resumed_options(fast, {"deterministic": True})
    assert options["deterministic"] is True and messages == ["overriding deterministic: recorded False, now True"]
