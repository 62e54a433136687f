"""Figures: slice views of scans (paper Fig. 2), the depth histogram (Fig. 1), training curves,
confusion matrices, reliability diagrams and attribution maps (Grad-CAM, occlusion) over scans, at fixed pixel sizes.

Figures are made with matplotlib's object API (``Figure``), never through pyplot, so drawing one
needs no display and leaves the process's backend and style settings alone: a notebook keeps its
own. The command line makes matplotlib headless for itself (``cov3d.cli.common``).

Volumes are ``(D, H, W)`` arrays in [0, 1]: D slices from the first file (apex) to the last,
rows H anterior to posterior, columns W across the patient. The three mid-planes are

- axial: ``volume[D // 2]``, shape (H, W);
- sagittal: ``volume[:, :, W // 2]``, shape (D, H), slice axis vertical (first slice on top);
- coronal: ``volume[:, H // 2, :]``, shape (D, W), slice axis vertical.

JPEG slices carry no voxel spacing, so every plane is drawn in a square panel: a chest scan covers
about as much length along the slice axis as across its field of view (roughly 300 mm and 350 mm),
and the preprocessed sizes fix D = W / 2 whatever the spacing, so squares keep the anatomy's
proportions roughly right for any depth.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from cov3d.atomic import replaced_atomically
from cov3d.errors import Cov3dError
from cov3d.outputs import figure_metadata

DPI = 100
"""Pixels per inch of every saved figure (sizes below are in inches)."""
PANEL_INCHES = 2.4
"""Side of one square image panel: 240 px."""
TITLE_INCHES = 0.35
"""Height of the text strip above each row of panels (scan name and label)."""
FONT_SIZE = 9
"""Base font size in points; readable at the panel size."""
PLANES = ("axial", "sagittal", "coronal")
CURVES_SIZE = (8.0, 3.2)
"""Inches of the training-curve figure (two panels: losses, F1)."""
CONFUSION_INCHES = 3.6
"""Side of a confusion-matrix figure."""
RELIABILITY_INCHES = 3.8
"""Side of one task's reliability diagram."""
RELIABILITY_LEGEND_INCHES = 0.8
"""Height under each reliability diagram for its legend."""
RELIABILITY_MARKER_AREA = 400.0
"""Area in points^2 of the marker of a bin that holds every scan (smaller bins: in proportion)."""
HISTOGRAM_SIZE = (6.4, 3.6)
"""Inches of the depth histogram."""
HISTOGRAM_BINS = 60
"""Most bars of the depth histogram (bins widen to whole multiples of one slice)."""
PLATEAU_TOLERANCE = 1e-6
"""Values within this of the maximum of a map in [0, 1] count as its peak (see ``peak_voxel``)."""
COLORBAR_SHARE = 0.1
"""Share of an attribution figure's width kept at the right for the colour bar."""
OVERLAY_ALPHA = 0.45
"""Opacity of an attribution map (Grad-CAM, occlusion) over the grey scan."""
OUTLINE_COLOUR = "lime"
"""Contours of a known region (a phantom's lesions) over an attribution map."""
PEAK_COLOUR = "white"
"""The cross on an attribution map's peak."""

STYLE = {"font.size": FONT_SIZE, "axes.titlesize": FONT_SIZE, "axes.labelsize": FONT_SIZE}
"""matplotlib settings of cov3d's figures, in force only while one is drawn."""


def styled(draw: Callable[..., Figure]) -> Callable[..., Figure]:
    """``draw`` run with ``STYLE`` (the process's own settings are restored afterwards)."""

    @functools.wraps(draw)
    def drawn(*args, **kwargs) -> Figure:
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    return drawn


def mid_planes(volume: np.ndarray, point: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The axial (H, W), sagittal (D, H) and coronal (D, W) planes of a (D, H, W) volume through
    ``point`` = (z, y, x), by default the centre voxel (D // 2, H // 2, W // 2)."""
    z, y, x = point if point is not None else tuple(n // 2 for n in volume.shape)
    return {"axial": volume[z], "sagittal": volume[:, :, x], "coronal": volume[:, y, :]}


def _show_plane(ax, image: np.ndarray, *, cmap: str = "gray", vmin: float = 0.0, vmax: float = 1.0, alpha: float = 1.0):
    """Draw a 2D plane filling a square panel (aspect stretched, see the module docstring)."""
    rows, cols = image.shape
    handle = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha, interpolation="nearest",
                       aspect=cols / rows)
    ax.set_xticks([])
    ax.set_yticks([])
    return handle


def _panel_grid(rows: int, cols: int) -> tuple[Figure, np.ndarray]:
    """A figure of ``rows`` x ``cols`` square panels with a title strip above each row."""
    height = rows * (PANEL_INCHES + TITLE_INCHES)
    fig = Figure(figsize=(cols * PANEL_INCHES, height), dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - TITLE_INCHES / height,
                        wspace=0.04, hspace=TITLE_INCHES / PANEL_INCHES)
    return fig, axes


def save_figure(fig: Figure, output: Path) -> Path:
    """Write ``fig`` to ``output`` (at ``DPI``, exact figure size, all or nothing; PNG unless the
    suffix names another format matplotlib writes). PNG, PDF, SVG and PostScript
    figures carry cov3d's marker in their metadata (``cov3d.outputs.figure_metadata``)."""
    output = Path(output)
    image_format = output.suffix.lstrip(".").lower() or "png"
    formats = fig.canvas.get_supported_filetypes()
    if image_format not in formats:
        raise Cov3dError(f"{output}: cannot write .{image_format} images; end the name with .png (or {', '.join('.' + name for name in sorted(formats))}).")
    output.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(output, "Free some space or choose another output folder.") as temp:
        fig.savefig(temp, dpi=DPI, format=image_format, metadata=figure_metadata(image_format))
    return output


@styled
def slice_views(volumes: Sequence[np.ndarray], titles: Sequence[str]) -> Figure:
    """One row per scan: axial, sagittal and coronal mid-planes of each (D, H, W) volume."""
    fig, axes = _panel_grid(len(volumes), len(PLANES))
    for row, (volume, title) in enumerate(zip(volumes, titles)):
        planes = mid_planes(volume)
        for col, plane in enumerate(PLANES):
            _show_plane(axes[row, col], planes[plane])
            axes[row, col].set_title(plane, fontsize=FONT_SIZE - 1, pad=2)
        axes[row, 0].annotate(title, xy=(0, 1), xycoords="axes fraction", xytext=(2, FONT_SIZE + 6),
                              textcoords="offset points", fontsize=FONT_SIZE + 1, fontweight="bold")
    return fig


def peak_voxel(attribution: np.ndarray) -> tuple[int, int, int]:
    """The (z, y, x) of the highest value of a (D, H, W) map; where the maximum is a plateau (as
    after trilinear upsampling of a coarse map near the borders), the plateau voxel nearest to the
    plateau's centroid rather than its first voxel."""
    top = np.argwhere(attribution >= attribution.max() - PLATEAU_TOLERANCE)
    nearest = np.argmin(((top - top.mean(axis=0)) ** 2).sum(axis=1))
    return tuple(int(i) for i in top[nearest])


@styled
def attribution_overlay(volume: np.ndarray, attribution: np.ndarray, title: str, label: str = "Grad-CAM",
                        outline: np.ndarray | None = None) -> Figure:
    """The three planes through the voxel of highest attribution, the (D, H, W) attribution in
    [0, 1] drawn over the (D, H, W) scan, the peak marked with a cross; ``label`` names the colour
    bar, and a (D, H, W) bool ``outline`` (e.g. the lesions a phantom knows) is drawn as contours."""
    peak = peak_voxel(attribution)
    fig, axes = _panel_grid(1, len(PLANES))
    fig.subplots_adjust(right=1 - COLORBAR_SHARE)
    scans, maps = mid_planes(volume, peak), mid_planes(attribution, peak)
    outlines = mid_planes(outline.astype(np.float32), peak) if outline is not None else {}
    z, y, x = (int(i) for i in peak)
    marks = {"axial": (x, y), "sagittal": (y, z), "coronal": (x, z)}
    for ax, plane in zip(axes[0], PLANES):
        _show_plane(ax, scans[plane])
        handle = _show_plane(ax, maps[plane], cmap="inferno", alpha=OVERLAY_ALPHA)
        if plane in outlines and 0 < outlines[plane].max():
            ax.contour(outlines[plane], levels=[0.5], colors=OUTLINE_COLOUR, linewidths=1.0)
        ax.plot(*marks[plane], marker="+", color=PEAK_COLOUR, markersize=12, markeredgewidth=1.5)
        ax.set_title(plane, fontsize=FONT_SIZE - 1, pad=2)
    axes[0, 0].annotate(f"{title}   peak (z, y, x) = ({z}, {y}, {x})", xy=(0, 1), xycoords="axes fraction",
                        xytext=(2, FONT_SIZE + 6), textcoords="offset points", fontsize=FONT_SIZE + 1,
                        fontweight="bold")
    bottom, top = fig.subplotpars.bottom, fig.subplotpars.top
    colorbar = fig.colorbar(handle, cax=fig.add_axes((1 - 0.9 * COLORBAR_SHARE, bottom + 0.05, 0.2 * COLORBAR_SHARE, top - bottom - 0.1)))
    colorbar.solids.set_alpha(1.0)
    colorbar.set_label(label, fontsize=FONT_SIZE - 1)
    return fig


@styled
def training_curves(history: Mapping[str, Sequence[float]]) -> Figure:
    """Losses (left) and F1 scores (right) per epoch from ``history`` (column name -> values per
    epoch, e.g. fastai's ``train_loss``, ``valid_loss``, ``presence_f1``, ``severity_f1``)."""
    fig = Figure(figsize=CURVES_SIZE, dpi=DPI)
    loss_ax, f1_ax = fig.subplots(1, 2)
    for ax, suffix, title in ((loss_ax, "_loss", "loss"), (f1_ax, "_f1", "validation macro F1")):
        for name, values in history.items():
            if not name.endswith(suffix):
                continue
            epochs = np.arange(len(values))  # 0-based, as in metrics.csv and summary.json
            series = np.asarray(values, dtype=float)
            (line,) = ax.plot(epochs, series, marker="o", markersize=3, label=name.removesuffix(suffix))
            if suffix == "_f1" and np.isfinite(series).any():
                best = int(np.nanargmax(series))
                ax.plot(epochs[best], series[best], marker="*", markersize=11, color=line.get_color())
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
        ax.xaxis.get_major_locator().set_params(integer=True)
    f1_ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    return fig


@styled
def confusion_figure(matrix: np.ndarray, labels: Sequence[str], title: str) -> Figure:
    """A confusion matrix (rows: truth, columns: prediction) with counts in the cells, coloured by
    the share of each true class (row-normalised) so that rare classes stay visible."""
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=float), where=totals > 0)
    fig = Figure(figsize=(CONFUSION_INCHES, CONFUSION_INCHES), dpi=DPI)
    ax = fig.subplots()
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center",
                color="white" if shares[row, col] > 0.5 else "black", fontsize=FONT_SIZE + 1)
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=30, ha="right")
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


@styled
def reliability_diagram(calibrations: Sequence) -> Figure:
    """One panel per task (``cov3d.model.calibration.TaskCalibration``: task, temperature, scans,
    scores, bins): the accuracy of each confidence bin against its mean confidence, before (T = 1) and
    after calibration, marker areas in proportion to the bin's scans; the diagonal is perfect
    calibration, and the grid lines are the bins' edges. Confidence is that of the predicted class, so
    it starts at 1 / classes (0.5 for presence, 0.25 for severity)."""
    from cov3d.model.calibration import TASK_CLASSES

    fig = Figure(figsize=(RELIABILITY_INCHES * len(calibrations), RELIABILITY_INCHES + RELIABILITY_LEGEND_INCHES), dpi=DPI)
    axes = fig.subplots(1, len(calibrations), squeeze=False)[0]
    for ax, result in zip(axes, calibrations):
        bins = len(result.bins["before"][0])
        low = 1.0 / TASK_CLASSES[result.task]
        ax.plot([low, 1.0], [low, 1.0], linestyle="--", color="0.5", linewidth=1.0, label="perfectly calibrated")
        styles = {"before": ("tab:orange", "o", 1.0), "after": ("tab:blue", "s", result.temperature)}
        for when, (colour, marker, temperature) in styles.items():
            counts, confidence, accuracy = result.bins[when]
            filled = counts > 0
            ax.plot(confidence[filled], accuracy[filled], color=colour, marker=marker, markersize=3, linewidth=1.0,
                    alpha=0.7, label=f"{when}, T = {temperature:.2f}: ECE {result.scores[f'ece_{when}']:.3f}")
            ax.scatter(confidence[filled], accuracy[filled], s=RELIABILITY_MARKER_AREA * counts[filled] / counts.sum(),
                       color=colour, marker=marker, alpha=0.5, zorder=3)
        ax.set_xticks(np.linspace(0.0, 1.0, bins + 1), minor=True)
        ax.grid(which="minor", axis="x", alpha=0.3)
        ax.grid(which="major", axis="y", alpha=0.3)
        ax.set_xlim(low - 0.04, 1.03)
        ax.set_ylim(-0.04, 1.04)
        ax.set_xlabel("confidence (probability of the predicted class)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{result.task}, validation scans: {result.scans}\n"
                     f"Brier {result.scores['brier_before']:.3f} -> {result.scores['brier_after']:.3f}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=FONT_SIZE - 1, frameon=False)
    fig.tight_layout()
    return fig


@styled
def depth_histogram(depths: Mapping[str, Sequence[int]]) -> Figure:
    """Histogram of slices per scan (paper Fig. 1) over all partitions, logarithmic count axis; each
    partition is outlined on top. Bins are whole numbers of slices, at most ``HISTOGRAM_BINS``."""
    named = [(name, np.asarray(d, dtype=int)) for name, d in depths.items() if len(d)]
    everything = np.concatenate([d for _, d in named]) if named else np.zeros(0, dtype=int)
    top = int(everything.max()) if everything.size else 1
    width = -(-top // HISTOGRAM_BINS)
    bins = np.arange(0.5, top + width + 0.5, width)
    fig = Figure(figsize=HISTOGRAM_SIZE, dpi=DPI)
    ax = fig.subplots()
    counts, _, _ = ax.hist(everything, bins=bins, color="0.75", label=f"all ({everything.size})")
    for name, d in named:
        ax.hist(d, bins=bins, histtype="step", linewidth=1.2, label=f"{name} ({len(d)})")
    ax.set_yscale("log")
    ax.set_ylim(0.7, max(10.0, 1.5 * float(counts.max(initial=1))))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("number of slices (depth)")
    ax.set_ylabel("scans (log scale)")
    ax.set_title(f"Depth of {everything.size} scans")
    ax.legend(loc="best")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
