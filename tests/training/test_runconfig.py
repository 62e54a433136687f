"""A run folder's config read back (old runs included) and the checks before a new run starts in a folder."""

import json

import pytest

from cov3d.errors import Cov3dError
from cov3d.runfiles import CONFIG_FILE, WEIGHTS_FILES
from cov3d.settings import TrainSettings
from cov3d.training.runconfig import check_new_run, recorded_settings, remove_run_files

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
    with pytest.raises(Cov3dError, match="already holds a cov3d run .*--resume"):
        check_new_run(run, overwrite=False)
    earlier = check_new_run(run, overwrite=True)
    assert sorted(path.name for path in earlier) == sorted([CONFIG_FILE, WEIGHTS_FILES["presence"]])
    remove_run_files(run, earlier)
    assert [path.name for path in run.iterdir()] == ["notes.txt"]


def test_a_new_run_refuses_a_folder_inside_its_data(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(Cov3dError, match="inside the input folder"):
        check_new_run(tmp_path / "data" / "run", overwrite=True, inputs=[tmp_path / "data"])
