"""Flags through ``cov3d infer``, ``export``, ``show`` and ``explain``: the CSV column, the summary line,
``--skip-flagged``, resuming a CSV of an earlier cov3d, models trained on synthetic data, and the
out-of-distribution flag on a model's held-apart test scans."""

import csv
import json

import nibabel
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.dataset.domain import flags_cell
from cov3d.dataset.scans import find_scans
from cov3d.errors import Cov3dError
from cov3d.inference.flags import DomainChecks
from cov3d.inference.infer import CSV_COLUMNS, infer, prediction_columns
from cov3d.inference.views import show_scans
from cov3d.model.files import export_model, load_source
from cov3d.model.grey_reference import GreyReference, grey_histogram
from cov3d.model.network import build_model
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.runfiles import WEIGHTS_FILES
from cov3d.settings import VolumeShape
from cov3d.synthetic.phantom import HU_SOFT_TISSUE, MM_PER_UNIT, Z_EXTENT, render_phantom
from cov3d.window import DEFAULT_WINDOW

SHAPE = VolumeShape(4, 16, 16)


def make_run(folder, **recorded):
    """An untrained presence-only run (the fewest bytes to write) at SHAPE with ``recorded`` config
    entries (training_data, grey_reference)."""
    folder.mkdir(parents=True)
    config = {"depth": 4, "height": 16, "width": 16, "outputs": 1, "penultimate": 8, "dropout": 0.5, "pool": "max",
              "final_bias": False, **recorded}
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    state = build_model(outputs=1, penultimate=8).state_dict()
    save_file({key: value.contiguous() for key, value in state.items()}, str(folder / WEIGHTS_FILES["presence"]))
    return folder


def write_nifti(path, hu):
    ras = np.ascontiguousarray(np.flip(hu.transpose(2, 1, 0), axis=(0, 1, 2))).astype(np.int16)
    spacing = (2 * MM_PER_UNIT / hu.shape[1], 2 * MM_PER_UNIT / hu.shape[2], Z_EXTENT * MM_PER_UNIT / hu.shape[0])
    nibabel.save(nibabel.Nifti1Image(ras, np.diag([*spacing, 1.0])), path)
    return path


@pytest.fixture(scope="module")
def world(module_dir):
    """Scans: a chest phantom, the same with its lungs filled, an MR-like volume (NIfTI), and a JPEG
    stack of the chest with inverted grey levels; runs: trained on real data with the grey reference of
    chest phantoms, and one with the same reference marked as trained on synthetic data."""
    rng = np.random.default_rng(5)
    phantoms = [render_phantom(rng, depth=12, slice_size=64, has_covid=False, severity=0) for _ in range(8)]
    scans = module_dir / "scans"
    scans.mkdir()
    chest = write_nifti(scans / "chest.nii.gz", phantoms[0].hu)
    filled = phantoms[0].hu.copy()
    filled[phantoms[0].lung] = HU_SOFT_TISSUE
    no_lungs = write_nifti(scans / "abdomen.nii.gz", filled)
    mr = write_nifti(scans / "mr.nii.gz", np.clip(phantoms[0].hu + 1000, 0, None) * 2)
    inverted = scans / "ct_scan_7"
    inverted.mkdir()
    for index, grey in enumerate(DEFAULT_WINDOW.to_uint8(phantoms[0].hu)):
        Image.fromarray(255 - grey).save(inverted / f"{index}.jpg", quality=95)
    references = []
    for index, phantom in enumerate(phantoms[1:]):
        path = write_nifti(module_dir / f"train-{index}.nii.gz", phantom.hu)
        references.append(grey_histogram(VolumeCache(module_dir / "cache", SHAPE).levels(path)))
    reference = GreyReference.fit(references).to_config()
    real = make_run(module_dir / "real-run", training_data={"synthetic": False}, grey_reference=reference)
    synthetic = make_run(module_dir / "synthetic-run", training_data={"synthetic": True, "generator": "cov3d synthetic"},
                         grey_reference=reference)
    return module_dir, [chest, no_lungs, mr, inverted], real, synthetic


def run(world, models, name, **options):
    root, scans, *_ = world
    summary = infer(scans, models, root / name, cache_dir=root / "cache", device="cpu", precision="fp32",
                    progress=False, workers=0, **options)
    with (root / name).open() as handle:
        return summary, list(csv.DictReader(handle))


def test_each_row_carries_its_flags(world):
    root, scans, real, synthetic = world
    summary, rows = run(world, [real], "real.csv")
    assert [row["flags"] for row in rows] == ["", "no-lungs;out-of-distribution", "not-ct;out-of-distribution",
                                              "out-of-distribution"]
    assert list(rows[0]) == list(prediction_columns(uncertainty=False)) and list(rows[0])[-1] == "flags"
    assert summary.flagged_line == "3 of 4 scans flagged: not-ct 1, no-lungs 1, out-of-distribution 3"
    # An ensemble with one member trained on synthetic data: every scan gets synthetic-model.
    checks = DomainChecks([(load_source(real), SHAPE), (load_source(synthetic), SHAPE)])
    cache = VolumeCache(root / "cache", SHAPE)
    flags = [checks.flags(domain, {SHAPE: levels}) for levels, domain in map(cache.levels_and_domain, scans[:2])]
    assert [flags_cell(list(found)) for found in flags] == ["synthetic-model", "no-lungs;synthetic-model;out-of-distribution"]
    assert str(synthetic) in flags[0]["synthetic-model"]


def test_skip_flagged_leaves_them_out_and_lists_them(world):
    root, scans, real, _ = world
    result = CliRunner().invoke(app, ["infer", *map(str, scans), "-m", str(real), "-o", str(root / "kept.csv"),
                                      "--skip-flagged", "--submission-dir", str(root / "submission"), "--workers", "0",
                                      "--device", "cpu", "--cache-dir", str(root / "cache")])
    assert result.exit_code == 0, result.output
    with (root / "kept.csv").open() as handle:
        assert [row["path"] for row in csv.DictReader(handle)] == [str(scans[0])]
    listed = (root / "submission" / "covid.csv").read_text().split() + (root / "submission" / "non-covid.csv").read_text().split()
    assert listed == ["chest"]
    for scan in scans[1:]:
        assert f"Left out {scan}: " in result.output
    assert f"Left out {scans[2]}: not-ct: its values run from 0 to " in result.output
    assert "3 of 4 scans flagged: not-ct 1, no-lungs 1, out-of-distribution 3 (left out of the CSV" in result.output
    assert "4 scans predicted (" in result.output and "), 3 of them flagged and left out of the CSV -> " in result.output


def test_resuming_a_csv_without_the_flags_column_says_what_to_do(world):
    root, scans, real, _ = world
    old = root / "old.csv"
    old.write_text(",".join(CSV_COLUMNS) + "\n")
    with pytest.raises(Cov3dError, match="earlier cov3d, without the 'flags' column.*run without --resume"):
        run(world, [real], "old.csv", resume=True)
    _, rows = run(world, [real], "old.csv")  # without --resume the earlier CSV is replaced
    assert len(rows) == 4 and "flags" in rows[0]


def test_export_carries_where_the_training_data_came_from(world, tmp_path):
    _, _, real, synthetic = world
    exported = load_source(export_model(synthetic, tmp_path / "synthetic.safetensors"))
    assert exported.synthetic and exported.config["training_data"]["generator"] == "cov3d synthetic"
    assert exported.grey_reference == load_source(synthetic).grey_reference and exported.grey_reference.scans == 7
    assert not load_source(real).synthetic


def test_show_puts_the_flags_in_the_title(world, tmp_path):
    _, scans, real, synthetic = world
    titles = show_scans(scans[:3], tmp_path / "show.png", run_dir=synthetic, device="cpu", precision="fp32",
                        cache_dir=tmp_path / "cache")
    assert "FLAGGED" not in titles[0].replace("FLAGGED: synthetic-model", "")
    assert "FLAGGED: no-lungs, synthetic-model" in titles[1] and "FLAGGED: not-ct, synthetic-model" in titles[2]
    titles = show_scans(scans[1:2], tmp_path / "plain.png", cache_dir=tmp_path / "cache")
    assert "FLAGGED: no-lungs" in titles[0]


def test_explain_puts_the_flags_in_the_title(world, tmp_path):
    from cov3d.inference.explain import explain

    _, scans, real, _ = world
    result = explain(scans[2], real, tmp_path / "explain", cache_dir=tmp_path / "cache", device="cpu", precision="fp32")
    assert set(result["flags"]) == {"not-ct", "out-of-distribution"}


def test_a_model_trained_on_synthetic_data_flags_every_scan_but_not_its_own_test_scans_as_shifted(tiny_run, tiny_dataset, tmp_path):
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["training_data"]["synthetic"] is True and config["grey_reference"]["scans"] > 0
    scans = find_scans([tiny_dataset / "test"])
    summary = infer(scans, tiny_run, tmp_path / "p.csv", cache_dir=tmp_path / "cache", device="cpu", precision="fp32",
                    progress=False, workers=0)
    with (tmp_path / "p.csv").open() as handle:
        flags = [row["flags"] for row in csv.DictReader(handle)]
    assert flags == ["synthetic-model"] * len(scans)  # held apart from training, yet in its distribution
    assert summary.flagged_line.startswith(f"{len(scans)} of {len(scans)} scans flagged: synthetic-model {len(scans)}")
