"""A run's config.json read back for --resume: the precision the run resolved is the one it resumes in."""

import pytest

from cov3d.training.runconfig import resumed_options


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
         "loader_workers": None, "use_wandb": False}, [])
    unrecorded = {"data_dir": "/data", "arguments": {"precision": "fp32"}}
    assert resumed_options(unrecorded, {})[0]["precision"] == "fp32"
