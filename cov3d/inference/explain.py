"""`cov3d explain`: where the model sees COVID-19, as a 3D Grad-CAM (Selvaraju et al., 2017) or an
occlusion map (Zeiler & Fergus, 2014) of the presence score (``presence_score``), shown through the
map's peak. Grad-CAM (``grad_cam``) weighs the last residual block's activations by their gradients,
one forward and backward pass, and is coarse (layer4 downsamples by 8 along the slices and 16
in-plane); the occlusion map (``occlusion_map``) makes each block of ``OCCLUSION_GRID`` healthy lung
in turn, one forward pass per block. At the demo's size the occlusion map's peaks fall on the
phantoms' lesions and Grad-CAM's do not (docs/figures.md, ``scripts/pointing_game.py``).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.video.resnet import BasicBlock

from cov3d.dataset.intensity import HEALTHY_LUNG_HU
from cov3d.errors import Cov3dError
from cov3d.logits import grade_outputs, presence_output, severity_outputs
from cov3d.runtime import autocast
from cov3d.settings import DEFAULT_EXPLAIN_METHOD, EXPLAIN_METHODS, OCCLUSION_GRID
from cov3d.window import MAX_GREY, MODEL_WINDOW, ModelWindow, Window

LABELS = {"gradcam": "Grad-CAM", "occlusion": "occlusion"}
"""The colour bar's label of each of ``EXPLAIN_METHODS``; outputs are ``<scan name>-<method>.pt``
(tensor (D, H, W) in [0, 1]) and ``.png``."""
OCCLUSION_BATCH = 4
"""Occluded volumes per forward pass."""


def last_block(model: nn.Module) -> nn.Module:
    """The last ``BasicBlock`` of ``model.layer4`` (the dropout appended after it is skipped)."""
    layer = getattr(model, "layer4", None)
    blocks = [module for module in layer.children() if isinstance(module, BasicBlock)] if layer is not None else []
    if not blocks:
        raise ValueError("Grad-CAM needs a model with a layer4 of BasicBlocks (torchvision's r3d_18).")
    return blocks[-1]


def presence_score(logits: torch.Tensor, severity_only: bool) -> torch.Tensor:
    """(B, outputs) logits -> (B,) presence log-odds: the presence logit x (eq. 1); for runs trained
    with lambda = 1, which have no presence head, the log-odds of P(covid) = sum_{c=1..4} s_c
    (eq. 3): ``logsumexp(z_1..z_4) - z_0``."""
    if not severity_only:
        return presence_output(logits)
    return torch.logsumexp(grade_outputs(logits), dim=1) - severity_outputs(logits)[:, 0]


def interpolation_matrix(size_out: int, size_in: int) -> torch.Tensor:
    """(size_out, size_in) weights of linear interpolation that put input cell j at output
    position j * size_out / size_in (cell centres of a strided convolution), clamped at the ends."""
    position = (torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)).clamp(max=size_in - 1)
    low = position.floor().long()
    high = (low + 1).clamp(max=size_in - 1)
    fraction = position - low
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    weights.index_put_((rows, low), 1 - fraction, accumulate=True)
    weights.index_put_((rows, high), fraction, accumulate=True)
    return weights


def upsample_aligned(cam: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear upsampling of a (d, h, w) map to ``size`` (D, H, W); separable, so memory stays at a
    few copies of the output. Cell j of an axis downsampled by s lands at input voxel s * j, where
    the strided convolutions of r3d_18 (odd kernels, padding (k - 1) / 2) centre it, not at
    s * j + (s - 1) / 2 as ``F.interpolate(align_corners=False)`` would (for layer4, s = 16
    in-plane, a shift of 7.5 voxels). Beyond the last cell the map is held constant."""
    result = cam.double()
    for axis, size_out in enumerate(size):
        matrix = interpolation_matrix(size_out, result.shape[axis]).to(result.device)
        result = torch.tensordot(matrix, result.movedim(axis, 0), dims=1).movedim(0, axis)
    return result.float()


def grad_cam(model: nn.Module, volume: torch.Tensor, *, severity_only: bool = False,
             layer: nn.Module | None = None, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, float]:
    """Grad-CAM of one volume (1, D, H, W) -> (map (D, H, W) float32 in [0, 1], presence score).

    For activations A (C, d, h, w) of ``layer`` and the presence score y: alpha_c = the mean over
    (d, h, w) of dy / dA_c, cam = ReLU(sum_c alpha_c A_c), upsampled (``upsample_aligned``) and
    divided by its maximum (an all-zero map stays zero).

    ``layer`` defaults to ``last_block(model)``; ``dtype`` is the autocast dtype of the forward pass
    (None: fp32). The model is put in eval mode; its parameters are left untouched (gradients are
    taken with respect to the activations only).

    Only the part of the forward pass after ``layer`` records an autograd graph: everything up to
    it runs without one (its activations are freed as it goes), and a hook on ``layer`` turns its
    output into the leaf the gradient is taken for and switches recording on for the rest (the head).
    At the large size (160 x 320 x 320) a full graph of r3d_18 would hold every activation of the
    backbone; this way the peak is that of inference (docs/gpu.md has the measurements).
    """
    model.eval()
    layer = layer if layer is not None else last_block(model)
    captured: list[torch.Tensor] = []

    def start_graph(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        torch.set_grad_enabled(True)  # until the surrounding no_grad block ends: the head records its graph
        return leaf

    handle = layer.register_forward_hook(start_graph)
    try:
        with torch.no_grad(), autocast(volume.device, dtype):
            logits = model(volume[None].float())
            if not captured:
                raise ValueError("Grad-CAM: the chosen layer did not run in the forward pass.")
            score = presence_score(logits.float(), severity_only)[0]
        (gradients,) = torch.autograd.grad(score, captured[0])
    finally:
        handle.remove()
    activations = captured[0].detach()[0].float()  # (C, d, h, w)
    weights = gradients[0].float().mean(dim=(1, 2, 3))  # (C,)
    cam = torch.relu(torch.einsum("c,cdhw->dhw", weights, activations))
    cam = upsample_aligned(cam, tuple(volume.shape[-3:]))
    peak = cam.max()
    return (cam / peak if peak > 0 else cam).cpu(), float(score.detach())


def block_edges(size: int, blocks: int) -> list[tuple[int, int]]:
    """(start, stop) of ``blocks`` near-equal blocks tiling ``range(size)`` (fewer when ``size`` is smaller)."""
    edges = np.linspace(0, size, min(blocks, size) + 1).round().astype(int)
    return [(int(start), int(stop)) for start, stop in zip(edges[:-1], edges[1:])]


def occlusion_fill(window: Window) -> float:
    """The model-input value (grey level / 255) of healthy lung under ``window``."""
    return min(max(window.grey(HEALTHY_LUNG_HU), 0.0), MAX_GREY) / MAX_GREY


def occlusion_map(model: nn.Module, volume: torch.Tensor, *, fill: float, severity_only: bool = False,
                  grid: tuple[int, int, int] = OCCLUSION_GRID, batch_size: int = OCCLUSION_BATCH,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, float]:
    """Occlusion map of one volume (1, D, H, W) -> (map (D, H, W) float32 in [0, 1], presence score):
    would the model still see COVID-19 if this block were healthy lung?

    Each of the ``grid`` blocks (``block_edges`` along each axis) is set to ``fill`` (``occlusion_fill``:
    ``HEALTHY_LUNG_HU`` under the window of the scan's HU, or the model's) in turn; the map
    is ReLU(score - occluded score) over the block, divided by its maximum (all zero stays zero).
    Every pass holds ``batch_size`` volumes, the unoccluded one first and as padding at the end, so
    that a block which changes nothing gives exactly zero. ``dtype`` is the autocast dtype of the
    forward passes (None: fp32); the model is put in eval mode.
    """
    model.eval()
    slices = [[slice(start, stop) for start, stop in block_edges(size, count)] for size, count in zip(volume.shape[-3:], grid)]
    blocks = [None, *itertools.product(*slices)]
    blocks += [None] * (-len(blocks) % batch_size)
    unoccluded = volume[None].float()
    scores = []
    with torch.no_grad(), autocast(volume.device, dtype):
        for first in range(0, len(blocks), batch_size):
            batch = unoccluded.repeat(batch_size, 1, 1, 1, 1)
            for copy, block in zip(batch, blocks[first:first + batch_size]):
                if block is not None:
                    copy[(slice(None), *block)] = fill
            scores.append(presence_score(model(batch).float(), severity_only).cpu())
    scores = torch.cat(scores)
    drops = torch.zeros(volume.shape[-3:])
    for block, occluded in zip(blocks, scores):
        if block is not None:
            drops[block] = torch.relu(scores[0] - occluded)
    peak = drops.max()
    return drops / peak if peak > 0 else drops, float(scores[0])


def check_method(method: str) -> None:
    """Refuse a method that is not one of ``EXPLAIN_METHODS``, in one line."""
    if method not in EXPLAIN_METHODS:
        raise Cov3dError(f"The explanation method must be one of {', '.join(EXPLAIN_METHODS)}, got '{method}'.")


def attribution_map(model: nn.Module, volume: torch.Tensor, method: str, *, fill: float,
                    severity_only: bool = False, dtype: torch.dtype | None = None,
                    layer: nn.Module | None = None) -> tuple[torch.Tensor, float]:
    """The ``method`` map of one volume (1, D, H, W) -> (map (D, H, W) in [0, 1], presence score):
    ``grad_cam`` (of ``layer``, by default layer4's last block) or ``occlusion_map`` (with ``fill``)."""
    check_method(method)
    if method == "occlusion":
        return occlusion_map(model, volume, fill=fill, severity_only=severity_only, dtype=dtype)
    return grad_cam(model, volume, severity_only=severity_only, layer=layer, dtype=dtype)


def map_precision(method: str, precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32) of a ``method`` map: that of ``precision``
    (``cov3d.runtime.resolve_precision``), except that ``auto`` keeps occlusion maps in fp32. An
    occlusion map is a difference of two logits; bf16 rounds each to about 1/256 of its size, more
    than one block changes the logit of a scan with lesions everywhere (on the demo's critical
    validation scans, 5 of 8 peaks fell on lesions in bf16, 8 of 8 in fp32)."""
    from cov3d.runtime import resolve_precision

    if method == "occlusion" and precision == "auto":
        return None
    return resolve_precision(precision, device)


def explain(
    scan: Path,
    run_dir: Path,
    output_dir: Path,
    *,
    cache_dir: Path | None = None,
    device: str = "auto",
    overwrite: bool = False,
    precision: str = "auto",
    window: Window | ModelWindow = MODEL_WINDOW,
    method: str = DEFAULT_EXPLAIN_METHOD,
) -> dict[str, Path | float | tuple[int, int, int] | dict[str, str]]:
    """Grad-CAM (``method="occlusion"``: the occlusion map) of a scan (JPEG or DICOM folder, NIfTI
    file) or tensor file with a run's best-presence weights (best-severity for lambda = 1 runs);
    writes ``<name>-gradcam.pt`` and ``.png`` (``-occlusion``) to ``output_dir``. DICOM/NIfTI HU go
    through ``window``, by default (``MODEL_WINDOW``) the model's. The forward passes run under the
    autocast dtype of ``map_precision``.

    Returns the two paths, P(covid) from the score (at the model's presence temperature, if it records
    one: ``cov3d.model.calibration``), the peak voxel (z, y, x) and the scan's flags ``{flag: reason}``
    (``cov3d.inference.flags``, also in the figure's title). The outputs are
    checked first: never inside the scan or the run, and existing files only if unchanged since
    cov3d wrote them (``cov3d.outputs.OutputFolder``), or with ``overwrite``.
    """
    from cov3d.atomic import replaced_atomically
    from cov3d.dataset.scans import is_dicom_dir, is_nifti_file
    from cov3d.inference.flags import DomainChecks, flags_title
    from cov3d.inference.views import as_levels, is_tensor_file, load_tensor_file, model_volume
    from cov3d.locks import writing
    from cov3d.model.files import load_source
    from cov3d.outputs import OutputFolder
    from cov3d.preprocessing.preprocess import VolumeCache, default_cache_dir
    from cov3d.runtime import resolve_device
    from cov3d.viz.figures import attribution_overlay, peak_voxel, save_figure

    check_method(method)  # before any work
    source = load_source(run_dir)
    config = source.config
    severity_only = config.get("severity_factor", 0.5) >= 1
    model = source.build("severity" if severity_only else "presence")
    if model is None:
        raise Cov3dError(f"{run_dir} holds no {'severity' if severity_only else 'presence'} weights: train the run first.")
    torch_device = resolve_device(device)
    model = model.to(torch_device)

    scan = Path(scan)
    if is_tensor_file(scan):
        volume, recorded = load_tensor_file(scan)
        name = recorded.name if recorded is not None else scan.stem
    else:
        volume, name = None, scan.name.removesuffix(".gz").removesuffix(".nii")
    folder = OutputFolder(output_dir, kind=f"{LABELS[method]} map file", overwrite=overwrite, inputs=[scan, run_dir])
    stem = f"{name}-{method}"
    folder.claim([f"{stem}.pt", f"{stem}.png"])
    shape = source.shape.with_window(window)
    cache_dir = cache_dir or default_cache_dir()
    volume = model_volume(scan, shape, cache_dir, volume)
    domain = None if is_tensor_file(scan) else VolumeCache(cache_dir, shape).levels_and_domain(scan)[1]
    flags = DomainChecks([(source, shape)]).flags(domain, {shape: as_levels(volume)})
    volume = volume.to(torch_device)
    holds_hu = is_dicom_dir(scan) or is_nifti_file(scan)  # else grey levels, which no window maps
    fill = occlusion_fill(shape.window if holds_hu else source.shape.window)
    cam, score = attribution_map(model, volume, method, fill=fill, severity_only=severity_only,
                                 dtype=map_precision(method, precision, torch_device))
    probability = float(torch.sigmoid(torch.tensor(score) / (source.temperature("presence") or 1.0)))  # calibrated
    peak = peak_voxel(cam.numpy())

    output_dir = Path(output_dir)
    title = f"{name}: P(covid) = {probability:.2f}" + (f"  |  {flags_title(flags)}" if flags else "")
    overlay = attribution_overlay(volume[0].cpu().numpy(), cam.numpy(), title, label=LABELS[method])
    with writing(output_dir, brief=True):
        output_dir.mkdir(parents=True, exist_ok=True)
        tensor_path = output_dir / f"{stem}.pt"
        with replaced_atomically(tensor_path, "Free some space or choose another `output_dir`.") as temp:
            torch.save(cam.contiguous(), temp)
        image_path = save_figure(overlay, output_dir / f"{stem}.png")
        folder.record([tensor_path, image_path])
    return {"tensor": tensor_path, "image": image_path, "probability": probability, "peak": peak, "flags": flags}
