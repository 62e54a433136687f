"""scripts/device_check.py: every check ends in one line, an exception is a FAIL line, not a crash."""

import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.mark.slow
def test_help_lists_the_checks():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"), "--help"],
                            capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torchrun" in result.stdout and "--only" in result.stdout
