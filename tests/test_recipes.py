"""The recipes: ``paper`` is today's defaults, ``original`` the original code's defaults at c562971 as
the review listed them; explicit options win; the recipe is recorded and read back."""

import dataclasses
import re

import pytest
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.errors import Cov3dError
from cov3d.model.files import with_legacy_defaults
from cov3d.settings import SMALL, TrainSettings

ORIGINAL_CODE = {
    "epochs": 20, "batch_size": 4, "weight_decay": 0.01, "reflect": False, "validation_reflection": True,
    "severity_loss": "graded-only", "severity_smoothing": 0.0, "presence_weighting": "pos-weight",
    "presence_decision": "mean-logit", "kept_weights": "one",
}
"""The original code's defaults where they differ from the paper (issue text, from c562971)."""


def test_paper_recipe_is_the_default_settings():
    paper = TrainSettings.for_recipe("paper")
    assert paper == TrainSettings() and paper.recipe == "paper" and paper.shape == SMALL
    assert (paper.epochs, paper.batch_size, paper.weight_decay, paper.reflect, paper.outputs) == (40, 2, 1e-5, True, 6)


def test_original_recipe_has_the_original_codes_defaults():
    original = TrainSettings.for_recipe("original")
    assert {name: getattr(original, name) for name in ORIGINAL_CODE} == ORIGINAL_CODE
    assert original.shape.warp == 0.5 and original.recipe == "original"
    assert original.outputs == 5 and TrainSettings.for_recipe("original", severity_factor=0.0).outputs == 1
    # where both agree, the same values
    paper = TrainSettings()
    for name in ("learning_rate", "presence_smoothing", "pool", "final_bias", "presence_averaging", "dropout", "optimizer"):
        assert getattr(original, name) == getattr(paper, name)


def test_explicit_settings_override_the_recipe():
    settings = TrainSettings.for_recipe("original", batch_size=2, reflect=True, kept_weights="per-task")
    assert (settings.batch_size, settings.reflect, settings.kept_weights) == (2, True, "per-task")
    assert (settings.epochs, settings.weight_decay, settings.validation_reflection) == (20, 0.01, True)


def test_graded_only_loss_has_no_smoothing_and_choices_are_checked():
    with pytest.raises(Cov3dError, match="severity_smoothing=0"):
        TrainSettings.for_recipe("original", severity_smoothing=0.1)
    assert TrainSettings.for_recipe("original", severity_smoothing=0.1, severity_factor=0.0).severity_smoothing == 0.1
    with pytest.raises(Cov3dError, match="recipe"):
        TrainSettings.for_recipe("cookbook")
    with pytest.raises(Cov3dError, match="kept_weights"):
        TrainSettings(kept_weights="all")


def test_the_recipe_is_recorded_and_read_back():
    original = TrainSettings.for_recipe("original", seed=3)
    assert TrainSettings.from_config(original.to_config()) == original
    old = {key: value for key, value in TrainSettings().to_config().items()
           if key not in ("recipe", "severity_loss", "presence_weighting", "validation_reflection", "presence_decision",
                          "kept_weights")}
    assert TrainSettings.from_config(with_legacy_defaults(old)) == TrainSettings()  # older runs: the paper recipe


def captured_settings(monkeypatch, *arguments: str) -> TrainSettings:
    """The settings `cov3d train ARGUMENTS` would train with (training itself replaced)."""
    import cov3d.training.train as training

    captured = {}

    def fake_train(data_dir, run_dir, settings, **options):
        captured["settings"] = settings
        return training.TrainResult(run_dir, {})

    monkeypatch.setattr(training, "train", fake_train)
    result = CliRunner().invoke(app, ["train", "--directory", "DATA", *arguments])
    assert result.exit_code == 0, result.output
    return captured["settings"]


def test_train_command_takes_the_recipes_defaults_and_explicit_options_win(monkeypatch):
    assert captured_settings(monkeypatch) == TrainSettings()
    original = captured_settings(monkeypatch, "--recipe", "original")
    assert original == TrainSettings.for_recipe("original")
    overridden = captured_settings(monkeypatch, "--recipe", "original", "--batch-size", "2", "--warp", "0",
                                   "--reflect", "--severity-loss", "every-scan", "--severity-smoothing", "0.1",
                                   "--presence-decision", "mean-probability")
    assert overridden == dataclasses.replace(
        TrainSettings.for_recipe("original"), shape=SMALL, batch_size=2, reflect=True, severity_loss="every-scan",
        severity_smoothing=0.1, presence_decision="mean-probability")
    paper_with_original_parts = captured_settings(monkeypatch, "--presence-weighting", "pos-weight", "--kept-weights", "one")
    assert (paper_with_original_parts.recipe, paper_with_original_parts.presence_weighting,
            paper_with_original_parts.kept_weights, paper_with_original_parts.batch_size) == ("paper", "pos-weight", "one", 2)


def test_help_shows_the_recipe_and_each_recipes_defaults():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"})
    text = re.sub(r"[\s│]+", " ", result.output)
    assert "--recipe" in text and "Recorded in the run." in text
    for shown in ("Default: 40; --recipe original: 20.", "Default: 2; --recipe original: 4.",
                  "Default: 1e-05; --recipe original: 0.01.", "Default: 0.0; --recipe original: 0.5.",
                  "Default: every-scan; --recipe original: graded-only."):
        assert shown in text


def test_resume_keeps_the_recipe_and_refuses_another(tmp_path):
    from cov3d.training.runconfig import recorded_settings

    original = TrainSettings.for_recipe("original", batch_size=3)
    config = {**original.to_config(), "data_dir": "DATA"}
    assert recorded_settings(config, tmp_path, TrainSettings) == original
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path), "--recipe", "paper"])
    assert result.exit_code != 0 and "--recipe cannot change when resuming" in result.output
