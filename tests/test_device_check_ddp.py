"""scripts/device_check_ddp.py: a group prints one line; on a machine without CUDA it is a skip."""

import pytest
import torch
from scripts_loader import load_script


def test_a_group_prints_one_line(capsys, monkeypatch):
    script = load_script("device_check_ddp")
    monkeypatch.setitem(script.CHECKS, "fine", lambda: (True, "1 wait a step"))
    monkeypatch.setitem(script.CHECKS, "broken", lambda: 1 / 0)
    for name in ("fine", "broken"):
        script.run_group(name)
    if not torch.cuda.is_available():
        script.run_group("launch")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok   fine: 1 wait a step [") and lines[1].startswith("FAIL broken: ZeroDivisionError")
    if not torch.cuda.is_available():
        assert lines[2].startswith("skip launch: needs a CUDA GPU")


def test_unknown_group_is_refused(monkeypatch):
    script = load_script("device_check_ddp")
    monkeypatch.setattr("sys.argv", ["device_check_ddp.py", "--only", "nope"])
    with pytest.raises(SystemExit):
        script.main()
