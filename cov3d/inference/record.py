"""What made a predictions CSV's rows, kept beside it (``cov3d.runfiles.predictions_record``), so that
``infer --resume`` never appends one ensemble's rows to a CSV that another began.

The record lists the ensemble's members (each model's ``ModelSource.digest``, the tasks it predicts and
the window it reads DICOM/NIfTI scans with) and the settings that change a prediction's meaning (the
reflection test-time augmentation, the Monte-Carlo samples, whether the members' temperatures are applied, whether flagged scans are
left out). Paths are kept for the reader only: a
model moved elsewhere is still the same model. Device, precision, batch size, workers and the seed are
not part of it (they change the last digits, or which Monte-Carlo samples are drawn).
"""

from __future__ import annotations

import json
from pathlib import Path

from cov3d.atomic import write_text_atomically
from cov3d.errors import Cov3dError
from cov3d.inference.ensemble import Ensemble
from cov3d.inference.streaming import RESUME_REMEDY
from cov3d.runfiles import predictions_record

RECORD_FORMAT, RECORD_VERSION = "cov3d-predictions-record", 1
IDENTITY_KEYS = ("members", "tta", "mc_samples", "calibrated", "skip_flagged")
"""The parts of a record that must match for rows to be appended."""


def ensemble_record(ensemble: Ensemble, *, reflect: bool, mc_samples: int, calibrated: bool = True,
                    skip_flagged: bool = False) -> dict:
    """The record of the rows that ``ensemble`` makes with these settings."""
    members = [
        {"sha256": member.source.digest, "tasks": list(member.tasks), "window": str(member.shape.window),
         "path": str(member.source.path)}
        for member in ensemble.members
    ]
    return {"format": RECORD_FORMAT, "version": RECORD_VERSION, "members": members, "tta": reflect,
            "mc_samples": mc_samples, "calibrated": calibrated, "skip_flagged": skip_flagged}


def read_record(path: Path) -> dict | None:
    """The record in ``path``, or ``None`` if it is missing or not a record of cov3d's."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or not isinstance(record.get("members"), list):
        return None
    if not all(isinstance(member, dict) and isinstance(member.get("tasks"), list) for member in record["members"]):
        return None
    return record


def is_record(path: Path) -> bool:
    """Whether ``path`` holds a record of cov3d's (``check_output``'s test of its own file)."""
    return read_record(path) is not None


def _member_key(member: dict) -> tuple:
    """What tells two members apart: the model's digest, its tasks and its window."""
    return str(member.get("sha256")), tuple(member["tasks"]), str(member.get("window"))


def _identity(record: dict) -> tuple:
    members = sorted(_member_key(member) for member in record["members"])
    return (tuple(members), record.get("tta"), record.get("mc_samples"), record.get("calibrated"),
            record.get("skip_flagged", False))


def _describe(members: list[dict], others: list[dict]) -> str:
    """The members not among ``others``: 'run1 (presence, severity; window -470,1410), ...'."""
    known = {_member_key(member) for member in others}
    return ", ".join(
        f"{member.get('path')} ({', '.join(map(str, member['tasks']))}; window {member.get('window')})"
        for member in members if _member_key(member) not in known
    ) or "none"


def differences(recorded: dict, current: dict) -> str:
    """How ``current`` differs from ``recorded``, in words (empty if it does not)."""
    if _identity(recorded) == _identity(current):
        return ""
    parts = []
    if recorded.get("tta") != current.get("tta"):
        parts.append(f"reflection TTA was {'on' if recorded.get('tta') else 'off'}, now {'on' if current['tta'] else 'off'}")
    if recorded.get("mc_samples") != current.get("mc_samples"):
        parts.append(f"--mc-samples was {recorded.get('mc_samples')}, now {current['mc_samples']}")
    if recorded.get("calibrated") != current.get("calibrated"):
        parts.append(f"the probabilities were {'calibrated' if recorded.get('calibrated') else 'uncalibrated'}, "
                     f"now {'calibrated' if current.get('calibrated') else 'uncalibrated (--uncalibrated)'}")
    if recorded.get("skip_flagged", False) != current.get("skip_flagged", False):
        parts.append(f"flagged scans were {'left out (--skip-flagged)' if recorded.get('skip_flagged') else 'kept'}, "
                     f"now {'left out (--skip-flagged)' if current.get('skip_flagged') else 'kept'}")
    if _identity(recorded)[0] != _identity(current)[0]:
        parts.append(f"begun with {_describe(recorded['members'], current['members'])}; "
                     f"now {_describe(current['members'], recorded['members'])}")
    return "; ".join(parts)


def check_same_rows(output: Path, current: dict) -> None:
    """Refuse to append rows made as ``current`` says to the predictions CSV ``output``, whose rows
    were made as its record says, unless the two match (``IDENTITY_KEYS``)."""
    path = predictions_record(output)
    recorded = read_record(path)
    if recorded is None:
        raise Cov3dError(
            f"{output} has no record of the models that made its rows ({path} is missing or damaged), so they cannot "
            "be continued: give another --output, or run without --resume to predict every scan again."
        )
    changed = differences(recorded, current)
    if changed:
        raise Cov3dError(
            f"{output} was begun by other models or settings ({changed}), and its rows must stay one ensemble's: "
            f"resume with the models and options listed in {path}, give another --output, "
            "or run without --resume to predict every scan again."
        )


def write_record(output: Path, record: dict) -> None:
    """Write the record of the predictions CSV ``output`` (atomically)."""
    write_text_atomically(predictions_record(output), json.dumps(record, indent=1), RESUME_REMEDY)
