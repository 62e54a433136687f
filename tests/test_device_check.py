"""scripts/device_check.py: every check ends in one line; an exception, a crash or a hang is a FAIL line, not the
end of the run; the groups run with --only."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts_loader import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_each_check_prints_one_line_and_never_raises(capsys):
    script = load_script("device_check")

    def broken():
        raise RuntimeError("Expected all tensors to be on the same device\nsecond line")

    def unavailable():
        raise script.Skip("needs CUDA")

    assert script.run_check("a", lambda: (True, "fine")) is True
    assert script.run_check("b", lambda: (False, "off by 1")) is False
    assert script.run_check("c", broken) is False
    assert script.run_check("d", unavailable) is None
    lines = capsys.readouterr().out.splitlines()
    assert [line[:4] for line in lines] == ["ok  ", "FAIL", "FAIL", "skip"]
    assert "RuntimeError: Expected all tensors to be on the same device" in lines[2]


def test_a_check_in_its_own_process_that_hangs_or_crashes_is_a_fail_line(tmp_path, capsys):
    script = load_script("device_check")
    result = tmp_path / "result.json"
    answer = f"import json, pathlib; pathlib.Path({str(result)!r}).write_text(json.dumps({{'ok': None, 'line': 'no GPU'}}))"
    assert script.run_isolated("answers", [sys.executable, "-c", answer], result, timeout_s=60) is None
    assert script.run_isolated("hangs", [sys.executable, "-c", "import time; time.sleep(60)"], result, timeout_s=1) is False
    crash = "import os, sys; sys.stderr.write('Segmentation fault'); os._exit(139)"
    assert script.run_isolated("crashes", [sys.executable, "-c", crash], result, timeout_s=60) is False
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("skip answers: no GPU")
    assert lines[1].startswith("FAIL hangs: no result within 1 s (stopped)")
    assert lines[2].startswith("FAIL crashes: exit code 139 without a result: Segmentation fault")
    assert not result.exists() or json.loads(result.read_text())["line"] == "no GPU"


def test_every_group_has_its_checks_and_ddp_runs_every_group_of_its_script(tmp_path):
    script = load_script("device_check")
    groups = script.plan(tmp_path, torch.device("cpu"), (8, 32, 32), (8, 32, 32))
    assert tuple(groups) == script.GROUPS
    assert [entry[2] for entry in groups["ddp"]] == list(script.DDP_GROUPS) == list(load_script("device_check_ddp").CHECKS)
    names = [entry[0] for entries in groups.values() for entry in entries]
    assert len(names) == len(set(names))  # a check's own process finds it by name
    assert {"wheel", "auto fallback", "bf16 refusal", "resume across precision", "memory", "torchrun"} <= set(names)


@pytest.mark.slow
def test_help_lists_the_groups():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"), "--help"],
                            capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torchrun" in result.stdout and "--only" in result.stdout and "ddp" in result.stdout
