"""Regenerate the README's figures (``docs/figures/``) from a trained ``cov3d demo`` run.

    cov3d demo --output demo-output                 # the run the README's demo numbers describe
    python3 scripts/make_figures.py demo-output     # its figures -> docs/figures/

From the demo's output folder (``data/``, ``cache/``, ``run/``):

1. ``cov3d stats`` of its data: the depth histogram (paper Fig. 1);
2. the run's training curves and validation confusion matrices;
3. ``cov3d show``: one non-covid and one scan per severity with the run's predictions (Fig. 2);
4. ``cov3d explain``: Grad-CAM and the occlusion map of one covid validation scan, the moderate one
   with the most slices (lesions over a quarter to a half of the lungs: plain to see, yet not
   everywhere), drawn with the scan's lesions outlined (the demo writes a mask per scan); the script
   prints whether each map's peak lies on a lesion.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from PIL import Image
from rich.console import Console

from cov3d.dataset.layout import SEVERITY_CATEGORIES, SEVERITY_CSVS, read_severity_csv
from cov3d.dataset.stats import dataset_stats, stats_report
from cov3d.inference.explain import explain
from cov3d.inference.views import show_scans
from cov3d.runfiles import CONFUSION_STEMS, CURVES_FILE
from cov3d.settings import EXPLAIN_METHODS
from cov3d.workflows.stats import write_stats

FIGURES = Path("docs/figures")
MAX_FIGURE_BYTES = 300_000
"""The documentation's figures stay small."""
PALETTE_COLOURS = 256
"""The documentation's figures are stored as 8-bit palette PNGs (about a third of the RGBA size)."""
EXPLAINED_SEVERITY = next(code for code, label in SEVERITY_CATEGORIES.items() if label == "moderate")
"""The severity of the scan whose maps are shown (see the module docstring)."""


def example_scans(data: Path) -> list[Path]:
    """A non-covid validation scan and, for each severity 1..4, an annotated covid scan (the
    validation partition first, then train), as in the paper's Figure 2."""
    chosen = [sorted((data / "validation" / "non-covid").iterdir())[0]]
    for category in SEVERITY_CATEGORIES:
        for partition in ("validation", "train"):
            names = sorted(n for n, c in read_severity_csv(data / SEVERITY_CSVS[partition]).items() if c == category)
            folders = [data / partition / "covid" / n for n in names if (data / partition / "covid" / n).is_dir()]
            if folders:
                chosen.append(folders[0])
                break
    return chosen


def explained_scan(data: Path) -> Path:
    """The covid validation scan whose Grad-CAM and occlusion map are shown (see the module
    docstring); without a moderate one, the annotated scan of the nearest severity (the milder on a tie)."""
    severities = read_severity_csv(data / SEVERITY_CSVS["validation"])
    covid = [path for path in sorted((data / "validation" / "covid").iterdir()) if path.is_dir()]

    def rank(path: Path) -> tuple:
        severity = severities.get(path.name)
        distance = abs(severity - EXPLAINED_SEVERITY) if severity is not None else len(SEVERITY_CATEGORIES)
        return distance, severity or 0, -len(list(path.iterdir())), path.name

    return min(covid, key=rank)


def lesion_figure(data: Path, scan: Path, result: dict, run: Path, cache: Path, method: str, output: Path) -> str:
    """Draw ``cov3d explain``'s map of ``scan`` (its ``result``) again with the scan's lesions outlined,
    to ``output``; returns where the map's peak lies: on a lesion, within a voxel of one, or off them."""
    import numpy as np
    import torch
    from scipy import ndimage

    from cov3d.inference.explain import LABELS
    from cov3d.model.files import load_source
    from cov3d.preprocessing.preprocess import VolumeCache
    from cov3d.synthetic.generator import mask_path, read_masks
    from cov3d.synthetic.masks import resample_mask
    from cov3d.viz.figures import attribution_overlay, peak_voxel, save_figure

    cam = torch.load(result["tensor"], weights_only=True).numpy()
    lesion = resample_mask(read_masks(mask_path(data, scan))[0], cam.shape)
    volume = VolumeCache(cache, load_source(run).shape).get(scan)[0].numpy()
    title = f"{scan.name}: P(covid) = {result['probability']:.2f}, lesions outlined"
    save_figure(attribution_overlay(volume, cam, title, label=LABELS[method], outline=lesion), output)
    dilated = ndimage.binary_dilation(lesion, structure=np.ones((3, 3, 3), dtype=bool))
    peak = peak_voxel(cam)
    where = "on a lesion" if lesion[peak] else "within a voxel of a lesion" if dilated[peak] else "off the lesions"
    return f"peak {peak} {where} (lesions: {lesion.mean():.1%} of the volume)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="The --output folder of a finished 'cov3d demo' (data/, cache/, run/).")
    parser.add_argument("--output", type=Path, default=FIGURES, help="Folder for the PNG files (default: %(default)s).")
    args = parser.parse_args()
    data, run, cache = args.demo / "data", args.demo / "run", args.demo / "cache"
    if not (run / "best-presence.safetensors").is_file():
        raise SystemExit(f"{args.demo} holds no trained demo run: run 'cov3d demo --output {args.demo}' first.")

    work = Path(tempfile.mkdtemp(prefix="cov3d-figures-"))
    try:
        stats = dataset_stats(data)
        console = Console()
        for item in stats_report(stats):
            console.print(item)
        paths = write_stats(stats, work / "stats")
        args.output.mkdir(parents=True, exist_ok=True)
        show_scans(example_scans(data), args.output / "scans.png", run_dir=run, cache_dir=cache, device="cpu",
                   overwrite=True)  # its own figure, re-saved below without cov3d's metadata
        shutil.copy(paths["histogram"], args.output / "depth-histogram.png")
        shutil.copy(run / CURVES_FILE, args.output / CURVES_FILE)
        for stem in CONFUSION_STEMS.values():
            shutil.copy(run / f"{stem}.png", args.output / f"{stem}.png")
        scan = explained_scan(data)
        for method in EXPLAIN_METHODS:
            result = explain(scan, run, work / "explain", cache_dir=cache, device="cpu", method=method)
            hit = lesion_figure(data, scan, result, run, cache, method, args.output / f"{method}.png")
            print(f"{method} of {scan.relative_to(data)}: P(covid) = {result['probability']:.2f}, {hit}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for figure in sorted(args.output.glob("*.png")):
        with Image.open(figure) as image:
            small = image.convert("RGB").quantize(PALETTE_COLOURS)
        small.save(figure, optimize=True)
        size = figure.stat().st_size
        print(f"{figure}: {size / 1000:.0f} kB")
        if size > MAX_FIGURE_BYTES:
            raise SystemExit(f"{figure} is over {MAX_FIGURE_BYTES / 1000:.0f} kB: make it smaller.")


if __name__ == "__main__":
    main()
