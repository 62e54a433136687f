"""Inference writes one valid row per scan, averages each scan with its reflection and the models of an
ensemble, samples Monte-Carlo dropout, and writes submissions."""

import csv
import errno
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cov3d.dataset.scans import find_scans, scan_number
from cov3d.errors import Cov3dError
from cov3d.inference.infer import infer, prediction_columns
from cov3d.model.files import load_source
from cov3d.model.network import build_model
from cov3d.model.predictor import RunPredictor
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.runfiles import WEIGHTS_FILES
from cov3d.settings import VolumeShape


def read_csv(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def predictions(tiny_run, tiny_dataset, module_dir):
    out = module_dir
    scans = find_scans([tiny_dataset / "test"])
    summary = infer(
        scans, tiny_run, out / "preds.csv", cache_dir=out / "cache", device="cpu", precision="fp32",
        submission_dir=out / "submission", progress=False, workers=0,
    )
    return out, scans, read_csv(out / "preds.csv"), summary.failed


def test_one_valid_row_per_scan(predictions):
    out, scans, rows, failed = predictions
    assert failed == []
    with (out / "preds.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == prediction_columns(uncertainty=False)
        written = list(reader)
    assert [row["path"] for row in written] == [str(scan) for scan in scans]
    for row in written:
        probability = float(row["covid_probability"])
        assert 0.0 <= probability <= 1.0
        assert row["covid"] == str(int(probability >= 0.5))
        severity = [float(row[f"{label}_probability"]) for label in ("mild", "moderate", "severe", "critical")]
        assert sum(severity) == pytest.approx(1.0, abs=1e-5)
        assert row["severity"] == ("mild", "moderate", "severe", "critical")[severity.index(max(severity))]


def test_probability_is_the_mean_over_the_scan_and_its_reflection(predictions, tiny_run):
    out, scans, rows, _ = predictions
    config = json.loads((tiny_run / "config.json").read_text())
    model = build_model(outputs=6, penultimate=config["penultimate"]).eval()
    model.load_state_dict(load_file(str(tiny_run / "best-presence.safetensors")))
    volume = VolumeCache(out / "cache", VolumeShape(8, 32, 32)).get(scans[0])[None]
    with torch.no_grad():
        both = [torch.sigmoid(model(view)[0, 0]) for view in (volume, volume.flip(-1))]
    mean = (both[0] + both[1]) / 2
    temperature = config["temperatures"]["presence"]  # infer reports it calibrated: sigmoid(logit(p) / T)
    assert float(rows[0]["covid_probability"]) == pytest.approx(float(torch.sigmoid(torch.logit(mean) / temperature)), abs=1e-5)


def test_submission_files_sorted_by_scan_number(predictions):
    out, scans, rows, _ = predictions
    covid = (out / "submission" / "covid.csv").read_text().split()
    non_covid = (out / "submission" / "non-covid.csv").read_text().split()
    assert sorted(covid + non_covid) == sorted(row["name"] for row in rows)
    assert covid == sorted(covid, key=scan_number)
    severity_files = [(out / "submission" / f"{s}.csv").read_text().split() for s in ("mild", "moderate", "severe", "critical")]
    assert sum(len(names) for names in severity_files) == len(rows)


def test_not_a_run_is_a_clear_error(tmp_path, tiny_dataset):
    with pytest.raises(Cov3dError, match="config.json"):
        infer(find_scans([tiny_dataset / "test"]), tmp_path, tmp_path / "p.csv", cache_dir=tmp_path)


def make_run(folder, size, *, seed, outputs=6, tasks=("presence", "severity")):
    """An untrained run folder: config.json and random weights for `tasks`, input `size` (D, H, W)."""
    folder.mkdir(parents=True)
    depth, height, width = size
    config = {"depth": depth, "height": height, "width": width, "outputs": outputs, "penultimate": 8, "dropout": 0.5,
              "pool": "max", "final_bias": False}
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    for task in tasks:
        state = build_model(outputs=outputs, penultimate=8).state_dict()
        save_file({key: value.contiguous() for key, value in state.items()}, str(folder / WEIGHTS_FILES[task]))
    return folder


def run_infer(scans, models, out, name, **options):
    infer(scans, models, out / name, cache_dir=out / "cache", device="cpu", precision="fp32", progress=False, workers=0, **options)
    return read_csv(out / name)


PROBABILITIES = ("covid_probability", "mild_probability", "moderate_probability", "severe_probability", "critical_probability")


@pytest.mark.slow
def test_ensemble_of_two_sizes_is_the_mean_of_its_members(tiny_dataset, tmp_path, monkeypatch):
    scans = find_scans([tiny_dataset / "test"])
    runs = [make_run(tmp_path / "a", (4, 16, 16), seed=1), make_run(tmp_path / "b", (2, 24, 24), seed=2, tasks=("severity",))]
    built = []
    monkeypatch.setattr(VolumeCache, "_fetch", lambda self, scan, sources=None, original=VolumeCache._fetch: built.append((self.shape.depth, scan)) or original(self, scan, sources))
    both = run_infer(scans, runs, tmp_path, "both.csv", batch_size=2)  # batches of 2 and 1
    assert sorted(built) == sorted((depth, scan) for depth in (4, 2) for scan in scans)  # each scan once per size
    alone = [run_infer(scans, model, tmp_path, f"{i}.csv", batch_size=3) for i, model in enumerate(runs)]
    assert [row["path"] for row in both] == [str(scan) for scan in scans]
    for i, row in enumerate(both):
        for column in PROBABILITIES:
            mean = (float(alone[0][i][column]) + float(alone[1][i][column])) / 2
            assert float(row[column]) == pytest.approx(mean, abs=2e-6)
        assert float(alone[0][i]["covid_probability"]) != pytest.approx(float(alone[1][i]["covid_probability"]), abs=1e-4)


@pytest.mark.slow
def test_separate_models_for_presence_and_severity(tiny_dataset, tmp_path):
    """The paper's submissions: P(covid) from the presence models, severity from the severity models."""
    scans = find_scans([tiny_dataset / "test"])[:3]
    a, b = make_run(tmp_path / "a", (4, 16, 16), seed=1), make_run(tmp_path / "b", (4, 16, 16), seed=2)
    c = make_run(tmp_path / "c", (2, 24, 24), seed=3, tasks=("severity",))  # a lambda = 1 run
    alone = {name: run_infer(scans, run, tmp_path, f"{name}.csv") for name, run in (("a", a), ("b", b), ("c", c))}
    severity = PROBABILITIES[1:]

    split = run_infer(scans, [], tmp_path, "split.csv", presence_models=[a], severity_models=[b, c],
                      submission_dir=tmp_path / "submission")
    two_presence = run_infer(scans, [], tmp_path, "two.csv", presence_models=[a, b], severity_models=[c])
    only_severity = run_infer(scans, [], tmp_path, "only-severity.csv", severity_models=[c])
    for i, row in enumerate(split):
        assert row["covid_probability"] == alone["a"][i]["covid_probability"]
        for column in severity:
            mean = (float(alone["b"][i][column]) + float(alone["c"][i][column])) / 2
            assert float(row[column]) == pytest.approx(mean, abs=2e-6)
        mean = (float(alone["a"][i]["covid_probability"]) + float(alone["b"][i]["covid_probability"])) / 2
        assert float(two_presence[i]["covid_probability"]) == pytest.approx(mean, abs=2e-6)
        assert [two_presence[i][column] for column in severity] == [alone["c"][i][column] for column in severity]
        assert only_severity[i] == alone["c"][i]  # P(covid) = s_1 + ... + s_4 of the severity model
    # by hand: P(covid) of the lambda = 1 run is s_1 + ... + s_4, averaged over the scan and its reflection
    model = load_source(c).build("severity")
    volume = VolumeCache(tmp_path / "cache", VolumeShape(2, 24, 24)).get(scans[0])[None]
    with torch.no_grad():
        expected = sum(torch.softmax(model(view)[0, 1:], dim=0)[1:].sum() for view in (volume, volume.flip(-1))) / 2
    assert float(only_severity[0]["covid_probability"]) == pytest.approx(float(expected), abs=1e-5)
    covid = (tmp_path / "submission" / "covid.csv").read_text().split()
    assert sorted(covid) == sorted(row["name"] for row in split if row["covid"] == "1")
    assert sum(len((tmp_path / "submission" / f"{s}.csv").read_text().split())
               for s in ("mild", "moderate", "severe", "critical")) == len(scans)

    presence_only = make_run(tmp_path / "d", (4, 16, 16), seed=4, outputs=1, tasks=("presence",))  # lambda = 0
    with pytest.raises(Cov3dError, match="severity"):
        run_infer(scans, [], tmp_path, "bad.csv", severity_models=[presence_only])
    with pytest.raises(Cov3dError, match="No model"):
        run_infer(scans, [], tmp_path, "none.csv")


@pytest.mark.slow
def test_mc_dropout_samples_differ_with_a_sensible_spread(tiny_dataset, tmp_path):
    scans = find_scans([tiny_dataset / "test"])[:2]
    run = make_run(tmp_path / "run", (4, 16, 16), seed=0, tasks=("severity",))
    predictor = RunPredictor(load_source(run), torch.device("cpu"), None, mc_samples=4)
    for model in (predictor.severity_model,):
        assert all(m.training == isinstance(m, torch.nn.Dropout) for m in model.modules() if m is not model)
    volumes = torch.stack([VolumeCache(tmp_path / "cache", VolumeShape(4, 16, 16)).get(scan) for scan in scans])
    samples = predictor.samples(volumes).raw
    assert samples.shape == (4, 2, 5)
    covid = samples[:, :, 0]
    assert all(len(set(covid[:, i].tolist())) == 4 for i in range(2))  # four different predictions
    assert torch.all(covid.std(dim=0) > 1e-4) and torch.all(covid.std(dim=0) < 0.5)

    rows = run_infer(scans, run, tmp_path, "mc.csv", mc_samples=4, seed=3)
    again = run_infer(scans, run, tmp_path, "mc-again.csv", mc_samples=4, seed=3)
    plain = run_infer(scans, run, tmp_path, "plain.csv")
    assert rows == again and "covid_probability_std" not in plain[0]
    for row, base in zip(rows, plain):
        assert 1e-4 < float(row["covid_probability_std"]) < 0.5
        assert 0 < float(row["severity_agreement"]) <= 1
        assert float(row["covid_probability"]) != float(base["covid_probability"])


def test_full_disk_while_writing_predictions_names_the_csv_and_resume_finishes(tiny_run, tiny_dataset, tmp_path,
                                                                                 monkeypatch):
    """Rows already flushed are kept; --resume predicts the rest once there is room again."""
    from cov3d.inference import streaming as streaming_module

    real_open_rows = streaming_module.open_rows

    def open_rows_on_a_nearly_full_disk(output, columns, resume):
        handle, writer = real_open_rows(output, columns, resume)
        real_flush, flushes = handle.flush, []

        def flush():
            flushes.append(1)
            if len(flushes) > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_flush()

        handle.flush = flush
        return handle, writer

    scans = find_scans([tiny_dataset / "test"])
    output = tmp_path / "preds.csv"
    options = dict(cache_dir=tmp_path / "cache", device="cpu", precision="fp32", progress=False, batch_size=1, workers=0)
    monkeypatch.setattr(streaming_module, "open_rows", open_rows_on_a_nearly_full_disk)
    with pytest.raises(Cov3dError) as error:
        infer(scans, tiny_run, output, **options)
    assert str(error.value).startswith(f"Cannot write {output}: No space left on device.") and "--resume" in str(error.value)
    monkeypatch.setattr(streaming_module, "open_rows", real_open_rows)
    summary = infer(scans, tiny_run, output, resume=True, **options)
    assert summary.resumed >= 2 and summary.resumed + summary.predicted == len(scans)
    assert [row["path"] for row in read_csv(output)] == [str(scan) for scan in scans]
