"""What every `cov3d` command shares: the Typer app, the options of several commands, and the
turning of user mistakes into one-line errors."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

from cov3d.cli.streams import guard_console_streams
from cov3d.demo_settings import DemoSettings
from cov3d.errors import Cov3dError
from cov3d.limits import command_parameter
from cov3d.recipes import ORIGINAL_WARP
from cov3d.settings import (
    PRESET_NAMES,
    SMALL,
    TRAIN_DEFAULTS,
)
from cov3d.window import ModelWindow, Window

# Libraries that cov3d imports (fastai, via torch.jit) warn about their own internals on every run.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

MATPLOTLIB_BACKEND_ENV, HEADLESS_BACKEND = "MPLBACKEND", "Agg"
"""The command line draws its figures without a display."""

app = typer.Typer(
    help="Cov3d: detect COVID-19 and grade its severity from chest CT scans with a 3D ResNet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def show_progress_messages() -> None:
    """Show the library's progress messages (the ``cov3d`` logger, INFO and up) as plain lines on stderr,
    and draw figures headless (matplotlib's Agg backend, unless ``MPLBACKEND`` says otherwise). Output
    survives a closed pipe and a console without Unicode (``cov3d.cli.streams``)."""
    guard_console_streams()
    os.environ.setdefault(MATPLOTLIB_BACKEND_ENV, HEADLESS_BACKEND)
    logger = logging.getLogger("cov3d")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


DEMO_DEFAULTS = DemoSettings()
"""The demo's defaults, which its options show and pass on."""
CacheDirOption = typer.Option(None, "--cache-dir", help="Where preprocessed tensors are kept. Default: $COV3D_CACHE_DIR or ~/.cache/cov3d.")
WorkersOption = typer.Option(None, "--workers", help="Parallel preprocessing processes. Default: all CPU cores.")
DeviceOption = typer.Option("auto", "--device", help="auto, cpu or cuda.")
WARP_HELP = (
    "Cubic coordinate warp factor f (u -> f u^3 + (1 - f) u along width, height and depth) that the original code "
    f"applied by default with {ORIGINAL_WARP}; not in the paper. 0: off; 0 <= f < 1. Warped volumes are cached under their own key.")
WarpOption = typer.Option(TRAIN_DEFAULTS.shape.warp, "--warp", help=WARP_HELP)
WindowHelp = (
    "LEVEL,WIDTH in HU: how DICOM and NIfTI scans are mapped to grey levels (e.g. -470,1410). "
    "Default: {default}.")
WindowOption = typer.Option(None, "--window", help=WindowHelp.format(default="the mapping calibrated to COV19-CT-DB"))
ModelWindowOption = typer.Option(None, "--window", help=WindowHelp.format(
    default="the model's own (recorded in its config), else the mapping calibrated to COV19-CT-DB"))
PrecisionOption = typer.Option("auto", "--precision", help=(
    "auto, fp32, bf16 or fp16 (CUDA only). auto: on a CPU, bf16 when it has AMX-BF16 or AVX-512 BF16, else fp32 "
    "(emulated bf16 is slower); on a GPU, bf16 from compute capability 8.0 (A100, H100, RTX 30xx on), else fp16 "
    "with a gradient scaler (V100, T4), where bf16 is refused (no cuDNN bf16 convolutions). The choice is printed "
    "and kept in the run's config.json."))
OverwriteOption = typer.Option(False, "--overwrite", help="Replace existing files that are not cov3d's earlier outputs of the same kind (never an input).")


def parse_window(text: Optional[str], default: Window | ModelWindow) -> Window | ModelWindow:
    """``--window LEVEL,WIDTH`` as a ``Window`` (the one place it is parsed), or ``default`` when not given."""
    return default if text is None else Window.parse(text)


def fail(message: str) -> None:
    """Print a one-line error and exit with status 1."""
    typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


SETTING = re.compile(r"`([A-Za-z_]\w*)(?:=([^`]*))?`")
"""A setting named in a library message: `name` or `name=value` (``cov3d.errors``)."""


def spellings(command: Callable) -> dict[str, tuple[str, str]]:
    """Parameter name -> (option, its negative or the option again) of a command function;
    an argument is spelt as its metavar (``OUTPUT``)."""
    spelt = {}
    for name, parameter in inspect.signature(command).parameters.items():
        info = parameter.default
        if isinstance(info, typer.models.ArgumentInfo):
            spelt[name] = (name.upper(), name.upper())
        elif isinstance(info, typer.models.OptionInfo):
            flag = next(declared for declared in info.param_decls if declared.startswith("--"))
            positive, _, negative = flag.partition("/")
            spelt[name] = (positive, negative or positive)
    return spelt


def phrase(message: str, command: Callable) -> str:
    """A library message with the settings it names spelt as ``command``'s options:
    `learning_rate` -> --learning-rate, `precision=fp32` -> --precision fp32, `pretrained=False`
    -> --no-pretrained. A setting the command has no option for keeps its Python name."""
    options = spellings(command)

    def spelt(match: re.Match) -> str:
        name, value = match.groups()
        option = options.get(name) or options.get(command_parameter(name))
        if option is None:
            return match.group(0).strip("`")
        if value == "False":
            return option[1]
        return option[0] if value in (None, "True") else f"{option[0]} {value.strip(chr(34) + chr(39))}"

    return SETTING.sub(spelt, message)


def user_errors(command: Callable) -> Callable:
    """Show Cov3dError (its settings spelt as this command's options), and any OSError (a folder
    that cannot be made, a full disk), as a single line (no traceback) and exit non-zero."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Cov3dError as error:
            fail(phrase(str(error), command))
        except OSError as error:
            from cov3d.errors import one_line

            where = f"{error.filename}: " if error.filename else ""
            fail(f"{where}{one_line(error.strerror or error)}. Check the path, its permissions and the free disk space.")

    return wrapper


def size_option(default: str) -> typer.Option:
    return typer.Option(None, "--size", help=f"{PRESET_NAMES}. Default: {default}, or what --depth/--height/--width give.")


DepthOption = typer.Option(None, "--depth", help="Slices per scan after interpolation. Default: width / 2 (paper: 64, 128 or 160).")
HeightOption = typer.Option(None, "--height", help="Slice height in pixels. Default: the width.")
WidthOption = typer.Option(None, "--width", help=f"Slice width in pixels. Default: {SMALL.width} (paper: 128, 256 or 320).")
FastDecodeOption = typer.Option(False, "--fast-decode", help="Decode JPEGs at reduced scale (faster, slightly different values; cached apart).")


def cache_directory(cache_dir: Optional[Path]) -> Path:
    from cov3d.preprocessing.preprocess import default_cache_dir

    return cache_dir if cache_dir is not None else default_cache_dir()


def parse_shard(shard: Optional[str]) -> Optional[tuple[int, int]]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    if shard is None:
        return None
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        raise Cov3dError(f"--shard must look like I/N (e.g. 0/4), got '{shard}'.") from None
    if not 0 <= index < count:
        raise Cov3dError(f"--shard {shard}: I must be between 0 and N-1.")
    return index, count

