"""Regenerate the example figures of docs/figures.md from synthetic data (``docs/figures/``).

1. ``cov3d.synthetic.generator.generate_dataset``: a small COV19-CT-DB-style dataset;
2. ``cov3d stats``: depth histogram (paper Fig. 1) and Tables 1-2;
3. ``cov3d train`` from scratch at a tiny size: training curves and confusion matrices;
4. ``cov3d show``: one non-covid and one scan per severity with the run's predictions (Fig. 2);
5. ``cov3d explain``: Grad-CAM of a covid validation scan.

Run from the repository root: ``python3 scripts/make_figures.py`` (minutes on a CPU). The run is
far too small to be accurate: the figures show what the outputs look like, not results.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
from pathlib import Path

from PIL import Image
from rich.console import Console

from cov3d.dataset.layout import SEVERITY_CATEGORIES, SEVERITY_CSVS, read_severity_csv
from cov3d.dataset.stats import dataset_stats, stats_report, write_stats
from cov3d.inference.explain import explain
from cov3d.inference.views import show_scans
from cov3d.training.run_figures import CONFUSION_STEM, CURVES_FILE
from cov3d.training.train import TrainSettings, train

FIGURES = Path("docs/figures")
MAX_FIGURE_BYTES = 300_000
"""The documentation's figures stay small."""
PALETTE_COLOURS = 256
"""The documentation's figures are stored as 8-bit palette PNGs (about a third of the RGBA size)."""


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=48, help="Synthetic scans (test split included).")
    parser.add_argument("--epochs", type=int, default=8, help="Training epochs of the tiny run.")
    parser.add_argument("--seed", type=int, default=3, help="Seed of the synthetic dataset.")
    parser.add_argument("--output", type=Path, default=FIGURES, help="Folder for the PNG files.")
    args = parser.parse_args()

    from cov3d.synthetic.generator import generate_dataset

    work = Path(tempfile.mkdtemp(prefix="cov3d-figures-"))
    try:
        data, run, cache = work / "data", work / "run", work / "cache"
        generate_dataset(data, scans=args.scans, seed=args.seed, slice_size=128, depth_scale=0.2)
        stats = dataset_stats(data)
        console = Console()
        for item in stats_report(stats):
            console.print(item)
        paths = write_stats(stats, work / "stats")

        settings = TrainSettings(depth=16, height=32, width=32, epochs=args.epochs, penultimate=32,
                                 learning_rate=2e-3, dropout=0.1, severity_factor=0.5)
        train(data, run, settings, cache_dir=cache, pretrained=False, device="cpu", precision="fp32")

        args.output.mkdir(parents=True, exist_ok=True)
        show_scans(example_scans(data), args.output / "scans.png", run_dir=run, cache_dir=cache, device="cpu",
                   overwrite=True)  # its own figure, re-saved below without cov3d's metadata
        shutil.copy(paths["histogram"], args.output / "depth-histogram.png")
        shutil.copy(run / CURVES_FILE, args.output / CURVES_FILE)
        for stem in CONFUSION_STEM.values():
            shutil.copy(run / f"{stem}.png", args.output / f"{stem}.png")
        covid = sorted((data / "validation" / "covid").iterdir(), key=lambda p: -len(list(p.iterdir())))[0]
        result = explain(covid, run, work / "explain", cache_dir=cache, device="cpu")
        shutil.copy(result["image"], args.output / "gradcam.png")
        with (run / "metrics.csv").open() as handle:
            print("metrics.csv:", *csv.reader(handle), sep="\n  ")
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
