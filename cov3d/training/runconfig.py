"""A training run's folder: the checks before a new run is started in it, its config.json read
back, and what ``cov3d train --resume`` takes from it.

A new run refuses a folder inside the data it reads, a scan folder, or one that holds a run's
files already (unless ``--overwrite``: those files are then removed first, so that no weights of
other settings stay beside the new run's). A run that never finished an epoch (no checkpoint, no
weights: killed, or out of disk space, during its first epoch) holds nothing to keep or continue: the
same command, or ``--resume``, starts it again (``unfinished_first_epoch``).

A resumed run is the run that was started: its settings, data folder, cache folder, device,
precision (the one the run resolved, e.g. bf16 for ``auto`` on a bf16 CPU), worker counts, W&B
logging and the choice of deterministic kernels all come from config.json. Runtime options given again are overrides, each reported
as one line ``overriding X: recorded A, now B``. A missing, truncated or incomplete config.json
is a one-line error naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cov3d.dataset.scans import is_scan
from cov3d.errors import Cov3dError
from cov3d.limits import option_name
from cov3d.model.files import with_legacy_defaults
from cov3d.outputs import notice, refuse_inside
from cov3d.runfiles import CONFIG_FILE, RESUME_FILE, WEIGHTS_FILES, existing_run_files, leftover_run_temporaries
from cov3d.runtime import PRECISION_NAMES
from cov3d.settings import DETERMINISTIC

KINETICS_PRETRAINED = "kinetics-400"
"""What config.json records as ``pretrained`` for torchvision's Kinetics-400 weights (else a file, or null)."""
RESTORE = "Restore it from a copy or start a new run."
NEW_RUN_REMEDY = "Free some space or choose another `output_dir`."
"""What to do when a new run's config.json cannot be written."""


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
    """The ``settings_class`` (``TrainSettings``) recorded in ``config``, checked like new
    settings; keys that older runs lack take the value their code used (``with_legacy_defaults``)."""
    path = Path(run_dir) / CONFIG_FILE
    config = with_legacy_defaults(config)
    missing = [key for key in (*settings_class.config_keys(), "data_dir") if key not in config]
    if missing:
        raise Cov3dError(f"{path} is incomplete: it lacks {', '.join(missing)}. {RESTORE}")
    try:
        return settings_class.from_config(config)
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
        "deterministic": bool(arguments.get("deterministic", DETERMINISTIC)),
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
            option = option_name(name)
            overrides.append(f"overriding {option.removeprefix('--')}: recorded {_shown(options[name])}, now {_shown(value)}")
        options[name] = value
    return options, overrides


def unfinished_first_epoch(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds files of a run that never finished an epoch: no checkpoint and no weights."""
    existing = existing_run_files(run_dir)
    return bool(existing) and not any(path.name in (RESUME_FILE, *WEIGHTS_FILES.values()) for path in existing)


def check_new_run(run_dir: Path, *, overwrite: bool, inputs: Iterable[Path] = ()) -> list[Path]:
    """Refuse to start a run in ``run_dir`` if it lies inside the data read, is itself a scan
    folder, or already holds a run's files, unless ``overwrite`` or that run never finished an
    epoch (``unfinished_first_epoch``); then those files are returned, for ``remove_run_files`` to
    delete before the new run writes anything."""
    run_dir = Path(run_dir)
    refuse_inside(run_dir, inputs, "run folder")
    if os.path.lexists(run_dir) and not run_dir.is_dir():
        raise Cov3dError(f"{run_dir} exists and is not a folder: give a folder for the run (--output-dir).")
    if run_dir.is_dir() and is_scan(run_dir):
        raise Cov3dError(f"{run_dir} is a CT scan folder: give another --output-dir for the run.")
    existing = existing_run_files(run_dir)
    if existing and not overwrite and not unfinished_first_epoch(run_dir):
        names = ", ".join(path.name for path in existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        if (run_dir / RESUME_FILE).is_file():
            remedy = f"continue it with 'cov3d train --resume {run_dir}', give another --output-dir,"
        else:
            remedy = f"it cannot be continued (no {RESUME_FILE}): give another --output-dir,"
        raise Cov3dError(f"{run_dir} already holds a cov3d run ({names}): {remedy} or --overwrite to replace it.")
    return existing


def remove_leftover_temporaries(run_dir: Path) -> None:
    """Delete the temporary files a killed run left in ``run_dir`` (``leftover_run_temporaries``) and say
    so in one line. Only for the holder of the run folder's lock: no other writer can be at work there."""
    removed, kept = [], []
    for path in leftover_run_temporaries(run_dir):
        try:
            path.unlink(missing_ok=True)
            removed.append(path.name)
        except OSError:
            kept.append(path.name)
    if removed:
        notice(f"Removed {len(removed)} temporary file(s) that a killed run left in {run_dir}: {', '.join(removed)}")
    if kept:
        notice(f"Could not remove {len(kept)} temporary file(s) that a killed run left in {run_dir} "
               f"(not yours?): {', '.join(kept)}. They are never read; delete them when you can.")


def remove_run_files(run_dir: Path, files: Sequence[Path]) -> None:
    """Delete an earlier run's files (``check_new_run``) and say so in one line."""
    unfinished = unfinished_first_epoch(run_dir)
    for path in files:
        Path(path).unlink(missing_ok=True)
    if files:
        why = "it had not finished an epoch" if unfinished else "--overwrite"
        notice(f"Replacing the earlier run in {run_dir} ({why}): removed {', '.join(Path(p).name for p in files)}")
