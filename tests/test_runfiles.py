"""The names of a run's files, and what makes a folder a run, without importing torch."""

import subprocess
import sys

from cov3d.runfiles import (
    CONFIG_FILE,
    RESUME_FILE,
    TASK_METRICS,
    TASKS,
    WEIGHTS_BY_METRIC,
    WEIGHTS_FILES,
    existing_run_files,
    is_run_dir,
    leftover_run_temporaries,
    run_file_names,
)


def test_every_task_has_its_weights_and_score():
    assert set(WEIGHTS_FILES) == set(TASK_METRICS) == set(TASKS)
    assert WEIGHTS_BY_METRIC == {"presence_f1": "best-presence.safetensors", "severity_f1": "best-severity.safetensors"}
    assert {"confusion-presence.png", "confusion-severity.csv", "curves.png", "summary.json"} <= run_file_names()


def test_a_run_is_a_config_beside_weights_or_a_checkpoint(tmp_path):
    assert not is_run_dir(tmp_path) and existing_run_files(tmp_path / "missing") == []
    (tmp_path / CONFIG_FILE).write_text("{}")
    assert not is_run_dir(tmp_path)
    (tmp_path / RESUME_FILE).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert is_run_dir(tmp_path)
    assert [path.name for path in existing_run_files(tmp_path)] == [RESUME_FILE, CONFIG_FILE]


def test_leftover_run_temporaries_are_those_of_run_files(tmp_path):
    names = [".config.json.k9x_2abc.tmp", ".best-presence.safetensors.00000000.tmp"]
    for name in (*names, ".notes.txt.k9x_2abc.tmp", ".config.json.lock", CONFIG_FILE):
        (tmp_path / name).write_text("")
    assert [path.name for path in leftover_run_temporaries(tmp_path)] == sorted(names)


def test_the_run_layout_imports_no_torch():
    script = "import sys, cov3d.runfiles, cov3d.outputs; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip() == "False"
