"""The light commands never import torch or fastai: ``cov3d --help`` and ``cov3d stats`` run in a
fresh interpreter, which then reports the heavy modules it loaded."""

import json
import subprocess
import sys

import pytest

HEAVY_MODULES = ("torch", "fastai")
RUN_AND_REPORT = """
import json, sys
from cov3d.cli import app
try:
    app(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps([name for name in {heavy!r} if name in sys.modules]))
"""


def loaded_heavy_modules(*arguments: str) -> list[str]:
    """The modules of ``HEAVY_MODULES`` in ``sys.modules`` after ``cov3d ARGUMENTS`` in a new process."""
    script = RUN_AND_REPORT.format(heavy=HEAVY_MODULES)
    result = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arguments", [("--help",), ("stats", "--help")])
def test_help_imports_no_torch(arguments):
    assert loaded_heavy_modules(*arguments) == []


def test_stats_imports_no_torch(tiny_dataset, tmp_path):
    assert loaded_heavy_modules("stats", str(tiny_dataset), "--output", str(tmp_path / "stats")) == []
    assert any((tmp_path / "stats").iterdir())
