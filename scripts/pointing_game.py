"""Check ``cov3d explain`` against the truth the phantoms know: the pointing game on a demo run.

For every covid scan of the validation split of a ``cov3d demo`` output folder (``--output``, made
with lesion masks, as the demo does), the map of ``--method`` is computed with the run's presence
model on the scan's cached model input: Grad-CAM (``cov3d explain``: the last block of ``--layer``,
default ``layer4``) or the occlusion map (``cov3d explain --method occlusion``). Its peak voxel is
looked up in the scan's lesion mask, resampled to the model's input grid like the scan itself and
dilated by one voxel (a 3x3x3 cube). The forward passes run in the precision ``cov3d explain``
chooses on this CPU (``--precision auto``). The score is the fraction of scans whose peak falls inside;
chance is what a point drawn uniformly in the lungs would score: lesion volume / lung volume (the
mean over the scans), printed with and without the dilation (the stricter baseline, since the hit
uses the dilated mask). A second measure needs no peak: the share of the map's energy inside the
lungs that lies on lesions, whose chance is the same lesion / lung volume. The phantoms' severity is their share of involved lung (mild < 25 % ...
critical > 75 %), so over all severities chance is about one half and twice chance asks for a hit
on nearly every scan; the script prints each severity (from the full-resolution masks) on its own:
twice chance can only be asked of the severities whose chance is under one half.

    python3 scripts/pointing_game.py demo-output                       # Grad-CAM of layer4
    python3 scripts/pointing_game.py demo-output --method occlusion    # 5-10 s a scan at 16x48x48
    python3 scripts/pointing_game.py demo-output --layer layer3 --per-scan
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from cov3d.dataset.layout import SEVERITY_LABELS
from cov3d.inference.explain import attribution_map, map_precision, occlusion_fill
from cov3d.model.files import load_source
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.settings import DEFAULT_EXPLAIN_METHOD, EXPLAIN_METHODS
from cov3d.synthetic.masks import resample_mask
from cov3d.viz.figures import peak_voxel

LAYERS = ("layer1", "layer2", "layer3", "layer4")
def pointing_game(demo_dir: Path, method: str = DEFAULT_EXPLAIN_METHOD, layer: str = "layer4",
                  partition: str = "validation", per_scan: bool = False) -> dict:
    """The pointing-game score and chance rates of a demo output folder (see the module docstring)."""
    from cov3d.synthetic.generator import mask_path, read_masks
    from cov3d.synthetic.phantom import SEVERITY_BANDS

    data, run, cache_dir = demo_dir / "data", demo_dir / "run", demo_dir / "cache"
    source = load_source(run)
    severity_only = source.config.get("severity_factor", 0.5) >= 1  # as `cov3d explain`
    model = source.build("severity" if severity_only else "presence")
    dtype = map_precision(method, "auto", torch.device("cpu"))  # as `cov3d explain` on this CPU
    block = _block(model, layer)
    fill = occlusion_fill(source.shape.window)
    cache = VolumeCache(cache_dir, source.shape)
    records, skipped, seconds = [], [], []
    for scan in sorted((data / partition / "covid").iterdir()):
        lesion, lung = read_masks(mask_path(data, scan))
        involved = lesion.sum() / max(int(lung.sum()), 1)
        severity = next(code for code, (low, high) in SEVERITY_BANDS.items() if involved <= high or code == 4)
        lung = resample_mask(lung, source.size)
        lesion = resample_mask(lesion, source.size) & lung  # resampled edges may stray out of the lungs
        if not lesion.any() or not lung.any():
            skipped.append(scan.name)
            continue
        dilated = ndimage.binary_dilation(lesion, structure=np.ones((3, 3, 3), dtype=bool))
        volume = cache.get(scan)
        start = time.perf_counter()
        cam, score = attribution_map(model, volume, method, fill=fill, severity_only=severity_only, dtype=dtype, layer=block)
        seconds.append(time.perf_counter() - start)
        cam = cam.numpy()
        peak = peak_voxel(cam)
        records.append({
            "severity": severity, "score": float(dilated[peak]), "chance": lesion.sum() / lung.sum(),
            "chance_dilated": (dilated & lung).sum() / lung.sum(),
            "energy": float((cam * lesion).sum() / lung_energy) if (lung_energy := float((cam * lung).sum())) > 0 else np.nan,
        })
        if per_scan:
            print(f"{scan.name}: peak {peak} {'inside' if dilated[peak] else 'outside'}, lesion/lung "
                  f"{records[-1]['chance']:.2f}, P(covid) {float(torch.sigmoid(torch.tensor(score))):.2f}")
    if skipped:
        print(f"skipped (no lesion voxel on the {source.size} grid): {', '.join(skipped)}")
    result = {**_means(records), "seconds_per_map": float(np.mean(seconds)) if seconds else float("nan")}
    result["by_severity"] = {label: _means([r for r in records if r["severity"] == code])
                             for code, label in enumerate(SEVERITY_LABELS, start=1)
                             if any(r["severity"] == code for r in records)}
    return result


def _means(records: list[dict]) -> dict[str, float]:
    """The number of scans, of maps that are zero in the lungs (no energy share: left out of its
    mean) and the mean of each measure over ``records``."""
    energies = [r["energy"] for r in records if not np.isnan(r["energy"])]
    return {"scans": len(records), "zero_maps": len(records) - len(energies),
            "energy": float(np.mean(energies)) if energies else float("nan"),
            **{key: float(np.mean([r[key] for r in records])) for key in ("score", "chance", "chance_dilated")}}


def _block(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    """The last residual block of ``layer`` (``layer1`` .. ``layer4``; layer4's is ``cov3d explain``'s)."""
    from torchvision.models.video.resnet import BasicBlock

    return [module for module in getattr(model, layer).children() if isinstance(module, BasicBlock)][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_dir", type=Path, help="The --output folder of 'cov3d demo' (data/, cache/, run/).")
    parser.add_argument("--method", choices=EXPLAIN_METHODS, default=DEFAULT_EXPLAIN_METHOD, help="Map to score (default: %(default)s).")
    parser.add_argument("--layer", choices=LAYERS, default="layer4", help="Grad-CAM's layer (default: %(default)s, as cov3d explain; no effect on occlusion).")
    parser.add_argument("--partition", default="validation", help="Labelled split to score (default: %(default)s).")
    parser.add_argument("--per-scan", action="store_true", help="Print every scan's peak.")
    args = parser.parse_args()
    result = pointing_game(args.demo_dir, args.method, args.layer, args.partition, args.per_scan)
    name = f"Grad-CAM of {args.layer}" if args.method == "gradcam" else "the occlusion map"
    print(f"pointing game, {args.partition} covid scans, {name} ({result['seconds_per_map']:.1f} s a map)")
    print("  severity  scans  peak on lesion  chance (peak / chance)  dilated (peak / it)  "
          "energy on lesions (/ chance)  zero maps")
    for label, part in {"all": result, **result["by_severity"]}.items():
        print(f"  {label:8s}  {part['scans']:5d}  {part['score']:14.3f}  {part['chance']:6.3f} ({part['score'] / part['chance']:4.1f}x)"
              f"        {part['chance_dilated']:6.3f} ({part['score'] / part['chance_dilated']:4.1f}x)     "
              f"{part['energy']:6.3f} ({part['energy'] / part['chance']:4.1f}x)             {part['zero_maps']:3d}")


if __name__ == "__main__":
    main()
