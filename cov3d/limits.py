"""The allowed range of every numeric setting, declared once and checked before any data is read.

A ``Limit`` says what a value must be (a whole number or a finite number, and its bounds). The
settings objects declare their fields with ``limited(default, LIMIT)`` and check them all with
``check_fields`` when they are made; functions that take plain arguments (inference, the synthetic
data writer, preprocessing) check them with ``Limit.check`` on entry. The command line relies on
these checks and repeats no range. A value outside its range is an ``OptionOutOfRange`` error that
carries the setting's name (``learning_rate``, shown as ``--learning-rate`` by the command line),
the rule and the value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from cov3d.errors import OptionOutOfRange

LIMIT_KEY = "limit"
"""Key of a field's ``Limit`` in its dataclass metadata."""


@dataclass(frozen=True)
class Limit:
    """A whole number (``whole``) or a finite real number, with optional bounds.

    ``low`` <= value (< with ``low_open``) and value <= ``high`` (< with ``high_open``); ``None``
    for no bound. ``optional``: ``None`` is allowed too (meaning "the default").
    """

    whole: bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def describe(self) -> str:
        """The rule in words: 'a whole number >= 1', 'a finite number in [0, 1)'."""
        kind = "a whole number" if self.whole else "a finite number"
        if self.low is None and self.high is None:
            return kind
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {_number(self.low)}"
        if self.low is None:
            return f"{kind} {'<' if self.high_open else '<='} {_number(self.high)}"
        if self.whole:
            first = int(self.low) + self.low_open
            return f"{kind} from {first} to {int(self.high) - self.high_open}"
        return f"{kind} in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}{')' if self.high_open else ']'}"

    def problem(self, value: Any) -> bool:
        """Whether ``value`` breaks this limit."""
        if value is None:
            return not self.optional
        if isinstance(value, bool) or not isinstance(value, int if self.whole else (int, float)):
            return True
        if not self.whole and not math.isfinite(value):
            return True
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return True
        return self.high is not None and (value >= self.high if self.high_open else value > self.high)

    def check(self, name: str, value: Any) -> Any:
        """``value`` if it keeps this limit, else ``OptionOutOfRange`` for the setting ``name``."""
        if self.problem(value):
            raise OptionOutOfRange(name, value, self.describe(), self)
        return value


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


OPTION_SPELLINGS = {"data_dir": "directory", "use_wandb": "wandb", "output_dir": "output", "reflect": "tta", "models": "model"}
"""The one map from library names to command-line names that differ (``data_dir`` is ``--directory``),
for the commands that have no option spelt like the library name (``train`` has ``--output-dir``)."""


def command_parameter(name: str) -> str:
    """The command's parameter for the library name ``name``: ``data_dir`` -> ``directory``."""
    return OPTION_SPELLINGS.get(name, name)


def option_name(name: str) -> str:
    """The command-line spelling of a setting: ``learning_rate`` -> ``--learning-rate``, ``data_dir``
    -> ``--directory``."""
    return name if name.startswith("--") else "--" + command_parameter(name).replace("_", "-")


def limited(default: Any, limit: Limit) -> Any:
    """A dataclass field with ``default`` whose values ``check_fields`` holds to ``limit``."""
    return dataclasses.field(default=default, metadata={LIMIT_KEY: limit})


def check_fields(settings: Any) -> None:
    """Check every field of the dataclass ``settings`` declared with ``limited``."""
    for field in dataclasses.fields(settings):
        limit = field.metadata.get(LIMIT_KEY)
        if limit is not None:
            limit.check(field.name, getattr(settings, field.name))


SIZE = Limit(whole=True, low=1)
"""Volume sizes, epochs, batch sizes, layer widths: at least 1."""
OPTIONAL_SIZE = Limit(whole=True, low=1, optional=True)
"""Like ``SIZE``; ``None`` means the default (e.g. --workers: all CPU cores)."""
COUNT = Limit(whole=True, low=0)
"""Monte-Carlo samples, background processes: 0 (none) or more."""
OPTIONAL_COUNT = Limit(whole=True, low=0, optional=True)
WORKERS = OPTIONAL_SIZE
"""Preprocessing processes; ``None``: all CPU cores."""
LOADER_WORKERS = OPTIONAL_COUNT
"""Batch-loading processes per training process (0: in the process); ``None``: the default."""
SEED = Limit(whole=True, low=0, high=2**32, high_open=True)
"""NumPy's legacy generator (seeded by fastai's ``set_seed``) takes 0 <= seed < 2**32; Python's
``random`` and torch take more, so this is what all three take."""
LEARNING_RATE = Limit(whole=False, low=0, low_open=True)
WEIGHT_DECAY = Limit(whole=False, low=0)
DIV_FACTOR = Limit(whole=False, low=0, low_open=True)
"""A 1cycle divisor of the maximum learning rate (the start's, the end's): any positive number."""
FRACTION = Limit(whole=False, low=0, high=1)
"""A share in [0, 1], e.g. lambda in eq. 6 (0: presence only, 1: severity only)."""
BELOW_ONE = Limit(whole=False, low=0, high=1, high_open=True)
MOMENTUM = BELOW_ONE
"""Adam's beta1 along the 1cycle schedule: 0 <= beta1 < 1."""
DROPOUT = BELOW_ONE
"""A dropout probability: 0 <= p < 1 (1 would zero every feature)."""
SMOOTHING = BELOW_ONE
"""Label smoothing eps: 0 <= eps < 1 (1 would leave no weight on the true class)."""
WARP = BELOW_ONE
"""The cubic coordinate warp factor f: 0 (off) <= f < 1, where u -> f u^3 + (1 - f) u maps [-1, 1]
one-to-one onto itself."""

SYNTHETIC_SCANS = Limit(whole=True, low=8)
"""Scans of a synthetic dataset: validation gets round(20 %) of them and needs 2, so at least 8."""
SLICE_SIZE = Limit(whole=True, low=8, high=1024)
"""Synthetic slices: the phantom needs 8 pixels; 1024 is twice the real data's 512."""
DEPTH_SCALE = Limit(whole=False, low=0, high=1, low_open=True)
"""Scale of the synthetic slice counts: 1.0 is COV19-CT-DB's own (up to 1,201 slices)."""
DEMO_SCANS = Limit(whole=True, low=20, optional=True)
"""The demo needs a few graded scans of each severity in training; ``None``: the workload's."""
