"""Safe model files: a run folder or an exported model file, loaded without unpickling anything.

Both are safetensors (tensors and JSON text, no code): a run folder's ``config.json`` with its weights by
task, or one exported ``.safetensors`` file whose metadata holds the run's config and a SHA-256 of config
and tensors (checked: a damaged file is refused; not a signature). Pickle files are refused by name and
content before they are read; so are configs that do not fit their weights and non-finite weights. The
config's ``window`` is the HU -> grey mapping the model expects (docs/inference.md#model-files-and-export);
its ``temperatures`` (task -> T, fitted after training; absent in older runs) calibrate the
probabilities (``cov3d.model.calibration``); its ``training_data`` and ``grey_reference`` say what the
model was trained on (docs/inference.md#flags). All travel in exported files with the rest of the config.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save as safetensors_bytes

from cov3d.atomic import write_bytes_atomically
from cov3d.errors import Cov3dError, one_line
from cov3d.limits import DROPOUT, WARP
from cov3d.locks import writing
from cov3d.logits import has_negative_class, has_severity
from cov3d.model.grey_reference import GreyReference
from cov3d.model.network import build_model
from cov3d.recipes import EVERY_SCAN, ITEM_WEIGHTS, MEAN_PROBABILITY, ONE_CHECKPOINT, PAPER, PER_TASK
from cov3d.runfiles import CONFIG_FILE, MODEL_SUFFIX, TASKS, WEIGHTS_FILES
from cov3d.settings import FASTAI_ADAM, POOLS, VolumeShape
from cov3d.window import DEFAULT_WINDOW, Window

EXPORT_FORMAT, EXPORT_VERSION = "cov3d-model", "1"
PICKLE_SUFFIXES = (".pth", ".pt", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib", ".tar")
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")
"""File starts of pickles (protocol 2+ opcode) and of torch.save's zip container."""
HEADER_SIZE_BYTES = 8
"""A safetensors file starts with its JSON header's length as a little-endian uint64."""
HASH_CHUNK_BYTES = 2**20
ARCHITECTURE_KEYS = ("outputs", "penultimate", "dropout", "pool", "final_bias")
"""Config entries that shape the network (the input's shape, warp and window are in ``ModelSource.shape``)."""
PRIVATE_CONFIG_KEYS = ("data_dir",)
"""Config entries left out of exported files (local paths of the trainer's machine)."""
REQUIRED_CONFIG = {
    "depth": int, "height": int, "width": int, "outputs": int, "penultimate": int,
    "dropout": (int, float), "pool": str,
}
LEGACY_CONFIG = {
    "final_bias": True, "presence_averaging": "weighted", "warp": 0.0, "window": str(DEFAULT_WINDOW),
    "pct_start": 0.25, "div_factor": 25.0, "final_div_factor": 1e5, "momentums": [0.95, 0.85, 0.95],
    "optimizer": FASTAI_ADAM, "recipe": PAPER, "severity_loss": EVERY_SCAN, "presence_weighting": ITEM_WEIGHTS,
    "validation_reflection": False, "presence_decision": MEAN_PROBABILITY, "kept_weights": PER_TASK,
}
"""What runs made before these keys were recorded used: a last linear layer with a bias, presence
terms averaged over their weights, no warp; for DICOM/NIfTI scans, the calibrated default window;
the 1cycle schedule that was fixed in the code (fastai's defaults); fastai's Adam; the paper recipe
(``cov3d.recipes``). A config without a key is read with this value."""
TEMPERATURES_KEY = "temperatures"
"""config.json's {task: T} of the temperatures fitted after training (a task not fitted is absent)."""


def with_legacy_defaults(config: dict) -> dict:
    """``config`` with the keys of ``LEGACY_CONFIG`` it lacks filled in (see there); not modified in place."""
    return {**LEGACY_CONFIG, **config}


@dataclass
class ModelSource:
    """A loaded model: ``config`` (sizes and architecture) and one state dict per task
    (``"presence"`` / ``"severity"``, either may be absent), and where it came from."""

    path: Path
    config: dict
    states: dict[str, dict[str, torch.Tensor]]

    def __post_init__(self) -> None:
        """A run that kept one checkpoint (``kept_weights="one"``, the original recipe) predicts with it
        every task its outputs have; at lambda = 1, whose loss never trains the presence output x, only
        severity (and presence from it where it has z_0: ``tasks``)."""
        if self.config.get("kept_weights") == ONE_CHECKPOINT and len(self.states) == 1:
            (state,) = self.states.values()
            if self.config.get("severity_factor", 0.0) >= 1.0:  # lambda = 1 never trains x: severity weights only
                self.states = {"severity": state}
            else:
                self.states = dict.fromkeys(TASKS if has_severity(self.config["outputs"]) else TASKS[:1], state)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this model can predict: presence from presence weights, or from severity weights
        with the "COVID negative" class z_0 (lambda = 1: P(covid) = s_1 + .. + s_4); severity from
        severity weights with severity outputs. A lambda = 1 model of the graded-only loss (no z_0)
        has no presence at all."""
        outputs = self.config["outputs"]
        presence = "presence" in self.states or ("severity" in self.states and has_negative_class(outputs))
        severity = "severity" in self.states and has_severity(outputs)
        return tuple(task for task, able in zip(TASKS, (presence, severity)) if able)

    @functools.cached_property
    def shape(self) -> VolumeShape:
        """The input volumes' shape and how they are made (``VolumeShape.from_config``, read once)."""
        return VolumeShape.from_config(self.config)

    @property
    def size(self) -> tuple[int, int, int]:
        """The input volumes' (D, H, W)."""
        return self.shape.dims

    @property
    def warp(self) -> float:
        """The cubic coordinate warp the model was trained with (0: none)."""
        return self.shape.warp

    @property
    def window(self) -> Window:
        """The HU -> grey mapping the model expects for DICOM/NIfTI (``DEFAULT_WINDOW`` if not recorded)."""
        return self.shape.window

    def temperature(self, task: str) -> float | None:
        """The temperature fitted for ``task`` after training, or None (older runs: uncalibrated)."""
        return self.config.get(TEMPERATURES_KEY, {}).get(task)

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 (hex) of what the model predicts with: every task's tensors (names, dtypes, shapes,
        bytes), the network's architecture, its input (``shape``: size, decoding, warp, window) and how
        its views are pooled (``presence_decision``).
        Equal for a run folder, its copies and its exported file; provenance (paths, dates) is left out."""
        digest = hashlib.sha256(json.dumps(
            {"architecture": {key: self.config[key] for key in ARCHITECTURE_KEYS}, "input": repr(self.shape),
             "presence_decision": self.config.get("presence_decision")},
            sort_keys=True).encode())
        for task in sorted(self.states):
            for key, tensor in sorted(self.states[task].items()):
                digest.update(f"{task}/{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()

    @property
    def synthetic(self) -> bool:
        """Whether the model was trained on data of ``cov3d synthetic`` (config's ``training_data``;
        models made before it was recorded: unknown, ``False``)."""
        record = self.config.get("training_data")
        return isinstance(record, dict) and record.get("synthetic") is True

    @functools.cached_property
    def grey_reference(self) -> GreyReference | None:
        """The grey levels of the training scans (``cov3d.model.grey_reference``); ``None`` if not recorded."""
        return GreyReference.from_config(self.config.get("grey_reference"))

    def build(self, task: str) -> torch.nn.Module | None:
        """The model of ``task`` with its weights, in eval mode (None if the source lacks it)."""
        if task not in self.states:
            return None
        config = self.config
        model = build_model(
            outputs=config["outputs"], penultimate=config["penultimate"], dropout=float(config["dropout"]),
            pool=config["pool"], final_bias=config["final_bias"],
        )
        try:
            model.load_state_dict(self.states[task], strict=True)
        except RuntimeError as error:
            reason = one_line(error)[:300]
            raise Cov3dError(
                f"{self.path}: its config does not match its {task} weights ({reason}). Re-export the run."
            ) from None
        return model.eval()


def _refuse_pickle(path: Path) -> None:
    """Raise ``Cov3dError`` if ``path`` is (named like) a pickle; reads only its first bytes."""
    with open(path, "rb") as handle:
        start = handle.read(HEADER_SIZE_BYTES + 1)
    pickled = start.startswith(PICKLE_MAGIC) and not starts_like_safetensors(start, path.stat().st_size)
    if path.suffix.lower() in PICKLE_SUFFIXES or pickled:
        raise Cov3dError(
            f"{path} is a pickle file, which can run arbitrary code when loaded, so cov3d never opens it. "
            "Use a run folder or a file made by 'cov3d export'."
        )


def starts_like_safetensors(start: bytes, size: int) -> bool:
    """Whether a file of ``size`` bytes whose first 9 bytes are ``start`` begins as safetensors does: a
    header length that fits in the file, then the JSON header's ``{``. A header length whose lowest byte
    is 0x80 (one in 32 of them) starts like a pickle; only safetensors' own parser reads such a file."""
    if len(start) < HEADER_SIZE_BYTES + 1:
        return False
    (header_size,) = struct.unpack("<Q", start[:HEADER_SIZE_BYTES])
    return header_size <= size - HEADER_SIZE_BYTES and start[HEADER_SIZE_BYTES:] == b"{"


def check_config(config: object, where: Path) -> dict:
    """``config`` (with ``LEGACY_CONFIG`` for keys that older runs lack) if it has every field needed
    to rebuild the model and preprocess its input, else ``Cov3dError``."""
    if not isinstance(config, dict):
        raise Cov3dError(f"{where}: the model config is not a JSON object; re-export the run.")
    config = with_legacy_defaults(config)
    for key, kind in REQUIRED_CONFIG.items():
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise Cov3dError(f"{where}: the model config lacks a valid '{key}'; re-export the run.")
    if min(config["depth"], config["height"], config["width"], config["outputs"], config["penultimate"]) < 1:
        raise Cov3dError(f"{where}: the model config has non-positive sizes; re-export the run.")
    if config["pool"] not in POOLS or DROPOUT.problem(config["dropout"]):
        raise Cov3dError(f"{where}: the model config has an invalid pool or dropout; re-export the run.")
    if not isinstance(config["final_bias"], bool) or WARP.problem(config["warp"]):
        raise Cov3dError(f"{where}: the model config has an invalid final_bias or warp; re-export the run.")
    try:
        Window.parse(str(config["window"]))
    except Cov3dError as error:
        raise Cov3dError(f"{where}: the model config has an invalid window ({error}); re-export the run.") from None
    if not valid_temperatures(config.get(TEMPERATURES_KEY, {})):
        raise Cov3dError(f"{where}: the model config's '{TEMPERATURES_KEY}' are not positive numbers by task; "
                         "restore the file or re-train the run.")
    return config


def valid_temperatures(temperatures: object) -> bool:
    """Whether ``temperatures`` maps tasks (of ``WEIGHTS_FILES``) to finite numbers > 0."""
    return isinstance(temperatures, dict) and all(
        task in WEIGHTS_FILES and isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < math.inf
        for task, t in temperatures.items()
    )


def non_finite_tensor(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``state`` with a NaN or infinite value, or ``None``."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return key
    return None


def _refuse_non_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """``Cov3dError`` naming ``path`` if any of its weights is NaN or infinite (a diverged run)."""
    key = non_finite_tensor(state)
    if key is not None:
        raise Cov3dError(
            f"{path} holds non-finite weights (NaN or infinity, in {key}): the training diverged; "
            "cov3d never predicts with them. Re-train (e.g. with --precision fp32 or a lower --learning-rate)."
        )


def _load_run(run_dir: Path) -> ModelSource:
    """A run folder: config.json and the safetensors weights present."""
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise Cov3dError(f"{run_dir} is not a cov3d run: {CONFIG_FILE} is missing. Give a run folder written by 'cov3d train'.")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise Cov3dError(f"{config_path} is not valid JSON ({error}); re-create the run or restore the file.") from None
    states = {}
    for task, name in WEIGHTS_FILES.items():
        path = run_dir / name
        if path.is_file():
            _refuse_pickle(path)
            try:
                states[task] = load_file(str(path))
            except (SafetensorError, OSError) as error:
                raise Cov3dError(f"Cannot load weights {path}: {str(error).splitlines()[0]}. Restore or re-train the run.") from None
            _refuse_non_finite(states[task], path)
    if not states:
        raise Cov3dError(f"{run_dir} holds no weights ({', '.join(WEIGHTS_FILES.values())}); train it first.")
    return ModelSource(run_dir, check_config(config, config_path), states)


def _data_digest(handle: BinaryIO, config_text: str) -> str:
    """SHA-256 of the config text followed by the tensor bytes (everything after the header) of
    the safetensors data in ``handle`` (a file opened for reading, or ``io.BytesIO``)."""
    digest = hashlib.sha256(config_text.encode())
    (header_size,) = struct.unpack("<Q", handle.read(HEADER_SIZE_BYTES))
    handle.seek(HEADER_SIZE_BYTES + header_size)
    while chunk := handle.read(HASH_CHUNK_BYTES):
        digest.update(chunk)
    return digest.hexdigest()


def _load_export(path: Path) -> ModelSource:
    """An exported model file (see the module docstring)."""
    _refuse_pickle(path)
    refuse = f"{path} is not a valid cov3d model file"
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != EXPORT_FORMAT:
                raise Cov3dError(f"{refuse} (no '{EXPORT_FORMAT}' metadata): make one with 'cov3d export RUN_DIR OUT'.")
            if metadata.get("format_version") != EXPORT_VERSION:
                raise Cov3dError(f"{refuse}: format version {metadata.get('format_version')} is not {EXPORT_VERSION}; update cov3d.")
            with open(path, "rb") as data:
                digest = _data_digest(data, metadata.get("config", ""))
            if digest != metadata.get("sha256"):
                raise Cov3dError(f"{refuse}: its contents do not match its checksum (edited or damaged); get a fresh copy.")
            states: dict[str, dict[str, torch.Tensor]] = {}
            for name in handle.keys():
                task, _, key = name.partition("/")
                if task not in WEIGHTS_FILES or not key:
                    raise Cov3dError(f"{refuse}: unexpected tensor '{name}'; get a fresh copy.")
                states.setdefault(task, {})[key] = handle.get_tensor(name)
    except (SafetensorError, OSError, struct.error) as error:
        raise Cov3dError(f"{refuse} ({str(error).splitlines()[0]}): get a fresh copy or re-export the run.") from None
    try:
        config = json.loads(metadata["config"])
    except json.JSONDecodeError:
        raise Cov3dError(f"{refuse}: its config is not valid JSON; re-export the run.") from None
    if not states:
        raise Cov3dError(f"{refuse}: it holds no weights; re-export the run.")
    for state in states.values():
        _refuse_non_finite(state, path)
    return ModelSource(path, check_config(config, path), states)


def load_source(path: Path) -> ModelSource:
    """Load a run folder or an exported ``.safetensors`` model file (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        return _load_run(path)
    if not path.is_file():
        raise Cov3dError(f"Model {path} does not exist: give a run folder or a file made by 'cov3d export'.")
    return _load_export(path)


def is_model(path: Path) -> bool:
    """Whether ``path`` looks like a model: a run folder or a ``.safetensors`` file."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() if path.is_dir() else path.suffix.lower() == MODEL_SUFFIX


def expand_models(paths: list[Path]) -> list[Path]:
    """Models given directly, or the models (run folders, exported files) inside given folders,
    sorted by name. Raises ``Cov3dError`` for a folder that is neither a run nor holds one."""
    models = []
    for path in map(Path, paths):
        if path.is_dir() and not is_model(path):
            inside = sorted(child for child in path.iterdir() if not child.name.startswith(".") and is_model(child))
            if not inside:
                raise Cov3dError(f"{path} is neither a cov3d run ({CONFIG_FILE} is missing) nor a folder of runs or model files.")
            models.extend(inside)
        else:
            models.append(path)
    return models


def is_export_file(path: Path) -> bool:
    """Whether ``path`` is a model file written by ``cov3d export`` (its metadata names the
    format; only the header is read)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == EXPORT_FORMAT
    except Exception:  # noqa: BLE001 - anything that safetensors cannot open is not one
        return False


def export_model(source: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Write the run folder (or model file) ``source`` as one shareable model file.

    ``out``: a ``.safetensors`` path, or an existing folder (the file is then named after the run).
    It is never ``source`` or inside it, nor a run's file; an existing file is replaced only if it
    is an exported model file, or with ``overwrite``. Returns the path written.
    """
    from cov3d.outputs import check_output

    model = load_source(source)
    for task in model.states:
        model.build(task)  # refuses a config that does not match the weights
    out = Path(out)
    if out.is_dir():
        out = out / f"{model.path.name.removesuffix(MODEL_SUFFIX)}{MODEL_SUFFIX}"
    if out.suffix.lower() != MODEL_SUFFIX:
        raise Cov3dError(f"{out}: the exported model file must end with {MODEL_SUFFIX}.")
    check_output(out, kind="exported model", is_own=is_export_file, overwrite=overwrite, inputs=[model.path],
                 option="output file")
    config = {key: value for key, value in model.config.items() if key not in PRIVATE_CONFIG_KEYS}
    config_text = json.dumps(config, sort_keys=True)
    kept = {id(state): task for task, state in model.states.items()}  # one checkpoint predicting both tasks: once
    tensors = {f"{task}/{key}": tensor.contiguous() for task in kept.values() for key, tensor in model.states[task].items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "config": config_text, "sha256": ""}
    metadata["sha256"] = _data_digest(io.BytesIO(safetensors_bytes(tensors, metadata=metadata)), config_text)
    with writing(out, "output file", brief=True):
        write_bytes_atomically(out, safetensors_bytes(tensors, metadata=metadata), "Free some space or export to another folder.")
    return out
