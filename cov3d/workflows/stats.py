"""`cov3d stats`' files: the tables of ``cov3d.dataset.stats`` and the depth histogram (paper Fig. 1)
of ``cov3d.viz``, written together into one output folder. Without torch."""

from __future__ import annotations

from pathlib import Path

from cov3d.dataset.stats import DatasetStats, check_stats_output, partition_depths, stats_paths, write_stats_tables
from cov3d.locks import writing
from cov3d.viz.figures import depth_histogram, save_figure


def write_stats(stats: DatasetStats, output_dir: Path, *, overwrite: bool = False, folder=None) -> dict[str, Path]:
    """Write the CSVs and the histogram to ``output_dir``; returns {what: path}.

    ``folder``: the result of ``check_stats_output``, if the caller checked already."""
    folder = folder if folder is not None else check_stats_output(stats, output_dir, overwrite=overwrite)
    output_dir = Path(output_dir)
    with writing(output_dir, brief=True):
        output_dir.mkdir(parents=True, exist_ok=True)
        paths = stats_paths(output_dir)
        write_stats_tables(stats, paths)
        save_figure(depth_histogram(partition_depths(stats)), paths["histogram"])
        folder.record(paths.values())
    return paths
