"""A training run's config.json read back, and what ``cov3d train --resume`` takes from it.

A resumed run is the run that was started: its settings, data folder, cache folder, device,
precision (the one the run resolved, e.g. bf16 for ``auto`` on a bf16 CPU), worker counts and
W&B logging all come from config.json. Runtime options given again are overrides, each reported
as one line ``overriding X: recorded A, now B``. A missing, truncated or incomplete config.json
is a one-line error naming it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from cov3d.errors import Cov3dError
from cov3d.limits import option_name
from cov3d.model.files import CONFIG_FILE, with_legacy_defaults
from cov3d.runtime import PRECISION_NAMES

RESTORE = "Restore it from a copy or start a new run."
NEW_RUN_REMEDY = "Free some space or choose another `output_dir`."
"""What to do when a new run's config.json cannot be written."""
OPTION_NAMES = {"data_dir": "--directory", "use_wandb": "--wandb"}
"""Keyword arguments of ``cov3d.training.train.train`` whose option is not spelt like them."""
RESUMABLE = ("data_dir", "cache_dir", "device", "precision", "workers", "loader_workers", "use_wandb")
"""What a resumed run takes from config.json unless it is given again (keyword arguments of ``train``)."""


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The JSON object in ``run_dir``/config.json; one-line ``Cov3dError`` if it is missing or damaged."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise Cov3dError(f"{path} not found: `resume` needs a run folder written by 'cov3d train'.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise Cov3dError(f"{path} is not valid JSON (truncated or damaged: {error}). {RESTORE}") from None
    if not isinstance(config, dict):
        raise Cov3dError(f"{path} does not hold a JSON object. {RESTORE}")
    return config


def recorded_settings(config: dict[str, Any], run_dir: Path, settings_class: type) -> Any:
    """The ``settings_class`` dataclass (``TrainSettings``) recorded in ``config``, checked like new
    settings; keys that older runs lack take the value their code used (``with_legacy_defaults``)."""
    path = Path(run_dir) / CONFIG_FILE
    config = with_legacy_defaults(config)
    missing = [field.name for field in dataclasses.fields(settings_class) if field.name not in config]
    if "data_dir" not in config:
        missing.append("data_dir")
    if missing:
        raise Cov3dError(f"{path} is incomplete: it lacks {', '.join(missing)}. {RESTORE}")
    try:
        return settings_class(**{field.name: config[field.name] for field in dataclasses.fields(settings_class)})
    except (Cov3dError, TypeError) as error:
        raise Cov3dError(f"{path} records an invalid setting ({error}). {RESTORE}") from None


def recorded_options(config: dict[str, Any]) -> dict[str, Any]:
    """The runtime options the run was started with (``train`` keyword arguments); ``None``: the default."""
    arguments = config.get("arguments")
    arguments = arguments if isinstance(arguments, dict) else {}
    return {
        "data_dir": config["data_dir"],
        "cache_dir": arguments.get("cache_dir"),
        "device": arguments.get("device", "auto"),
        "precision": recorded_precision(config),
        "workers": arguments.get("workers"),
        "loader_workers": arguments.get("loader_workers"),
        "use_wandb": bool(arguments.get("wandb", False)),
    }


def recorded_precision(config: dict[str, Any]) -> str:
    """The precision the run resolved (``bf16`` for an ``auto`` run on a bf16 machine), as a
    ``--precision`` value; what it was started with when config.json records none."""
    precision = config.get("precision")
    if precision in PRECISION_NAMES.values():
        return precision
    arguments = config.get("arguments")
    return arguments.get("precision", "auto") if isinstance(arguments, dict) else "auto"


def _shown(value: Any) -> str:
    return "default" if value is None else str(value)


def resumed_options(config: dict[str, Any], given: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The recorded options with those ``given`` again, and one line for each that differs."""
    options = recorded_options(config)
    overrides = []
    arguments = config.get("arguments")
    started = arguments.get("precision") if isinstance(arguments, dict) else None
    if "precision" not in given and started == "auto" and options["precision"] != "auto":
        overrides.append(f"precision: {options['precision']}, as the run resolved --precision auto when it started")
    for name, value in given.items():
        if name in options and _shown(value) != _shown(options[name]):
            option = OPTION_NAMES.get(name, option_name(name))
            overrides.append(f"overriding {option.removeprefix('--')}: recorded {_shown(options[name])}, now {_shown(value)}")
        options[name] = value
    return options, overrides
