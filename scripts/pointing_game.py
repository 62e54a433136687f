"""Check Grad-CAM against the truth the phantoms know: the pointing game on a demo run.

For every covid scan of the validation split of a ``cov3d demo`` output folder (``--output``, made
with lesion masks, as the demo does), the Grad-CAM of the run's presence model (``cov3d explain``:
the last block of ``--layer``, default ``layer4``) is computed on the scan's cached model input and
its peak voxel is looked up in the scan's lesion mask, resampled to the model's input grid like the
scan itself and dilated by one voxel (a 3x3x3 cube). The score is the fraction of scans whose peak
falls inside; chance is what a point drawn uniformly in the lungs would score: lesion volume / lung
volume (the mean over the scans), printed with and without the dilation. The phantoms' severity is
their share of involved lung (mild < 25 % ... critical > 75 %), so over all severities chance is
about one half and a score of twice chance is out of reach; the script also prints each severity
(from the full-resolution masks) on its own.

    python3 scripts/pointing_game.py demo-output
    python3 scripts/pointing_game.py demo-output --layer layer3 --per-scan
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from cov3d.dataset.layout import SEVERITY_LABELS
from cov3d.inference.explain import grad_cam
from cov3d.model.files import load_source
from cov3d.preprocessing.preprocess import VolumeCache, depth_interpolation_matrix
from cov3d.viz.figures import peak_voxel

LAYERS = ("layer1", "layer2", "layer3", "layer4")
MASK_THRESHOLD = 0.5
"""A model voxel belongs to a mask when at least half of it does (after resampling)."""


def resample_mask(mask: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """A (n, S, S) bool mask on the model's (D, H, W) grid: bilinear in-plane, the preprocessing's
    cubic spline along depth, thresholded at ``MASK_THRESHOLD``."""
    depth, height, width = size
    planes = np.stack([
        np.asarray(Image.fromarray(plane.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR))
        for plane in mask
    ])
    stacked = depth_interpolation_matrix(len(planes), depth) @ planes.reshape(len(planes), -1)
    return stacked.reshape(depth, height, width) >= MASK_THRESHOLD


def pointing_game(demo_dir: Path, layer: str = "layer4", partition: str = "validation",
                  per_scan: bool = False) -> dict[str, float]:
    """The pointing-game score and chance rates of a demo output folder (see the module docstring)."""
    from cov3d.synthetic.generator import mask_path, read_masks
    from cov3d.synthetic.phantom import SEVERITY_BANDS

    data, run, cache_dir = demo_dir / "data", demo_dir / "run", demo_dir / "cache"
    source = load_source(run)
    model = source.build("presence")
    block = _block(model, layer)
    cache = VolumeCache.for_shape(cache_dir, source.shape)
    hits, chances, dilated_chances, severities, skipped = [], [], [], [], []
    for scan in sorted((data / partition / "covid").iterdir()):
        lesion, lung = read_masks(mask_path(data, scan))
        involved = lesion.sum() / max(int(lung.sum()), 1)
        severity = next(code for code, (low, high) in SEVERITY_BANDS.items() if involved <= high or code == 4)
        lesion, lung = resample_mask(lesion, source.size), resample_mask(lung, source.size)
        if not lesion.any() or not lung.any():
            skipped.append(scan.name)
            continue
        dilated = ndimage.binary_dilation(lesion, structure=np.ones((3, 3, 3), dtype=bool))
        cam, score = grad_cam(model, cache.get(scan), layer=block)
        peak = peak_voxel(cam.numpy())
        hits.append(bool(dilated[peak]))
        chances.append(lesion.sum() / lung.sum())
        dilated_chances.append((dilated & lung).sum() / lung.sum())
        severities.append(severity)
        if per_scan:
            print(f"{scan.name}: peak {peak} {'inside' if hits[-1] else 'outside'}, lesion/lung {chances[-1]:.2f}, "
                  f"P(covid) {float(torch.sigmoid(torch.tensor(score))):.2f}")
    if skipped:
        print(f"skipped (no lesion voxel on the {source.size} grid): {', '.join(skipped)}")
    result = {
        "scans": len(hits), "score": float(np.mean(hits)), "chance": float(np.mean(chances)),
        "chance_dilated": float(np.mean(dilated_chances)), "by_severity": {},
    }
    for code, label in enumerate(SEVERITY_LABELS, start=1):
        mine = [i for i, severity in enumerate(severities) if severity == code]
        if mine:
            result["by_severity"][label] = {
                "scans": len(mine), "score": float(np.mean([hits[i] for i in mine])),
                "chance": float(np.mean([chances[i] for i in mine])),
            }
    return result


def _block(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    """The last residual block of ``layer`` (``layer1`` .. ``layer4``; layer4's is ``cov3d explain``'s)."""
    from torchvision.models.video.resnet import BasicBlock

    return [module for module in getattr(model, layer).children() if isinstance(module, BasicBlock)][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_dir", type=Path, help="The --output folder of 'cov3d demo' (data/, cache/, run/).")
    parser.add_argument("--layer", choices=LAYERS, default="layer4", help="Grad-CAM layer (default: %(default)s, as cov3d explain).")
    parser.add_argument("--partition", default="validation", help="Labelled split to score (default: %(default)s).")
    parser.add_argument("--per-scan", action="store_true", help="Print every scan's peak.")
    args = parser.parse_args()
    result = pointing_game(args.demo_dir, args.layer, args.partition, args.per_scan)
    print(f"pointing game, {args.partition} covid scans, Grad-CAM of {args.layer}: {result['score']:.3f} "
          f"over {result['scans']} scans; chance (lesion / lung volume) {result['chance']:.3f}, "
          f"{result['score'] / result['chance']:.1f}x chance; with the dilated lesion {result['chance_dilated']:.3f}")
    for label, part in result["by_severity"].items():
        print(f"  {label}: {part['score']:.3f} over {part['scans']} scans, chance {part['chance']:.3f} "
              f"({part['score'] / part['chance']:.1f}x)")


if __name__ == "__main__":
    main()
