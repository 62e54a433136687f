"""Grad-CAM and the occlusion map: the formulas against closed forms, the aligned upsampling against
numpy, a tiny 3D ResNet trained to find a bright lesion is seen looking at it by both, and
`cov3d explain` writes their files."""

import numpy as np
import pytest
import torch
from figure_checks import assert_panels_differ, assert_size
from torch import nn
from torchvision.models.video.resnet import BasicBlock, Conv3DSimple
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.dataset.intensity import LEGACY_LUNG_WINDOW
from cov3d.inference.explain import (
    block_edges,
    grad_cam,
    interpolation_matrix,
    last_block,
    map_precision,
    occlusion_fill,
    occlusion_map,
    upsample_aligned,
)
from cov3d.model.network import build_model
from cov3d.viz.figures import peak_voxel
from cov3d.window import DEFAULT_WINDOW, Window

LESION_SHAPE = (12, 24, 24)  # (D, H, W) of the lesion scans
LESION_RADIUS = 2.5  # voxels
NOISE_MEAN, NOISE_SD, LESION_CONTRAST = 0.3, 0.1, 0.5
TRAIN_STEPS, BATCH = 100, 8  # about 15 s on one CPU thread
TEST_SCANS = 10
MIN_HIT_RATE = 0.7
FINE_GRID = (6, 12, 12)  # occlusion blocks of 2 x 2 x 2 voxels on the lesion scans


def block(inputs: int, outputs: int, stride: int = 1) -> BasicBlock:
    downsample = None
    if stride != 1 or inputs != outputs:
        downsample = nn.Sequential(nn.Conv3d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm3d(outputs))
    return BasicBlock(inputs, outputs, Conv3DSimple, stride=stride, downsample=downsample)


class TinyVideoResNet(nn.Module):
    """r3d_18's layout (stem, layer1..4 of torchvision BasicBlocks, dropout after layer4, average
    pooling, linear head) at width 8 and total stride 2, small enough to train in seconds on a CPU."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, width, 3, padding=1, bias=False), nn.BatchNorm3d(width), nn.ReLU())
        self.layer1 = nn.Sequential(block(width, width))
        self.layer2 = nn.Sequential(block(width, 2 * width, stride=2))
        self.layer3 = nn.Sequential(block(2 * width, 2 * width))
        self.layer4 = nn.Sequential(block(2 * width, 2 * width), nn.Dropout(0.0))
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(2 * width, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avgpool(self.features(x)).flatten(1))


GRID = np.stack(np.meshgrid(*[np.arange(n) for n in LESION_SHAPE], indexing="ij"), axis=-1)


def lesion_scans(rng: np.random.Generator, n: int, positive_every: int = 2):
    """n noise volumes (n, 1, D, H, W); every other one holds a bright sphere. Returns the volumes,
    the labels (n,) and the sphere centres (n, 3) (drawn for negatives too, unused)."""
    volumes = np.clip(rng.normal(NOISE_MEAN, NOISE_SD, (n, 1, *LESION_SHAPE)), 0, 1)
    centres = np.stack([rng.uniform(LESION_RADIUS, np.array(LESION_SHAPE) - 1 - LESION_RADIUS) for _ in range(n)])
    labels = np.zeros(n)
    for i in range(0, n, positive_every):
        inside = ((GRID - centres[i]) ** 2).sum(axis=-1) <= LESION_RADIUS**2
        volumes[i, 0][inside] += LESION_CONTRAST
        labels[i] = 1
    return torch.tensor(volumes, dtype=torch.float32).clamp(0, 1), torch.tensor(labels, dtype=torch.float32), centres


def test_interpolation_matches_numpy_with_cells_at_stride_multiples():
    values = np.array([0.0, 3.0, 1.0, 5.0])
    for size_out in (4, 8, 13, 64):
        position = np.arange(size_out) * len(values) / size_out
        expected = np.interp(position, np.arange(len(values)), values)  # clamps beyond the last cell
        got = interpolation_matrix(size_out, len(values)).numpy() @ values
        np.testing.assert_allclose(got, expected, atol=1e-12)
    cam = torch.zeros(4, 4, 4)
    cam[1, 2, 1] = 1.0
    upsampled = upsample_aligned(cam, (16, 64, 64))
    assert peak_voxel(upsampled.numpy()) == (4, 32, 16)  # cell j sits at stride * j (strides 4, 16, 16)
    assert float(upsampled[4, 32, 16]) == 1.0 and float(upsampled[6, 32, 16]) == pytest.approx(0.5)


def test_grad_cam_equals_the_closed_form_for_average_pooling():
    torch.manual_seed(0)
    model = TinyVideoResNet().eval()
    volume = torch.rand(1, 6, 8, 8)
    cam, score = grad_cam(model, volume)
    with torch.no_grad():
        activations = model.features(volume[None])[0]  # (C, d, h, w)
        # y = fc(mean A): dy/dA_c = w_c / (d h w), so Grad-CAM is ReLU(sum_c w_c A_c) up to a positive factor
        expected = torch.relu(torch.einsum("c,cdhw->dhw", model.fc.weight[0], activations))
        expected = upsample_aligned(expected, (6, 8, 8))
        assert score == pytest.approx(float(model(volume[None])[0, 0]), rel=1e-5)
    torch.testing.assert_close(cam, expected / expected.max(), rtol=1e-4, atol=1e-5)
    assert cam.shape == (6, 8, 8) and float(cam.max()) == pytest.approx(1.0)


def test_grad_cam_hooks_the_last_basic_block_of_r3d_18():
    model = build_model(outputs=6, penultimate=8)
    assert last_block(model) is model.layer4[1]
    cam, _ = grad_cam(model, torch.rand(1, 16, 32, 32), severity_only=True)
    assert cam.shape == (16, 32, 32) and 0.0 <= float(cam.min()) and float(cam.max()) <= 1.0
    assert all(p.grad is None for p in model.parameters())


@pytest.fixture(scope="module")
def lesion_model():
    """A TinyVideoResNet trained to tell noise volumes with a bright sphere from plain noise, and
    test volumes that all hold one (volumes (n, 1, D, H, W), sphere centres (n, 3))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions are faster on one thread than on a busy machine's two
    try:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        model = TinyVideoResNet()
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(TRAIN_STEPS):
            volumes, labels, _ = lesion_scans(rng, BATCH)
            model.train()
            optimiser.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(model(volumes)[:, 0], labels).backward()
            optimiser.step()
        volumes, labels, centres = lesion_scans(rng, TEST_SCANS, positive_every=1)
        model.eval()
        with torch.no_grad():
            assert (torch.sigmoid(model(volumes)[:, 0]) > 0.5).float().mean() >= 0.8  # it learned the task
        yield model, volumes, centres
    finally:
        torch.set_num_threads(threads)


def lesion_hit_rate(peaks: list[tuple[int, int, int]], centres: np.ndarray) -> float:
    """Share of peaks within a voxel of the lesion sphere; chance (a uniform peak) is under 5 %."""
    near = ((GRID - (np.array(LESION_SHAPE) - 1) / 2) ** 2).sum(axis=-1) <= (LESION_RADIUS + 1) ** 2
    assert near.mean() < 0.05
    return float(np.mean([np.linalg.norm(np.array(peak) - centre) <= LESION_RADIUS + 1
                          for peak, centre in zip(peaks, centres)]))


def test_grad_cam_finds_a_lesion_the_model_learned(lesion_model):
    model, volumes, centres = lesion_model
    peaks = [peak_voxel(grad_cam(model, volume)[0].numpy()) for volume in volumes]
    assert lesion_hit_rate(peaks, centres) >= MIN_HIT_RATE


def test_occlusion_finds_a_lesion_the_model_learned(lesion_model):
    model, volumes, centres = lesion_model
    peaks = [peak_voxel(occlusion_map(model, volume, fill=NOISE_MEAN, grid=FINE_GRID)[0].numpy()) for volume in volumes]
    assert lesion_hit_rate(peaks, centres) >= MIN_HIT_RATE


def test_occlusion_map_of_a_linear_model_is_its_blockwise_drop():
    """For y = w . x, occluding block b with f lowers y by sum over b of w (x - f): checked against
    a reshape into (2, 2, 2) blocks, with the ReLU and the scaling to a maximum of 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 1))
    volume, fill = torch.rand(1, 4, 6, 6), 0.25
    cam, score = occlusion_map(model, volume, fill=fill, grid=(2, 3, 3), batch_size=5)
    weights = model[1].weight.detach().reshape(4, 6, 6).double()
    falls = ((volume[0].double() - fill) * weights).reshape(2, 2, 3, 2, 3, 2).sum(dim=(1, 3, 5)).clamp(min=0)
    expected = falls.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
    torch.testing.assert_close(cam.double(), expected / expected.max(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert score == pytest.approx(float(model(volume[None])[0, 0]), rel=1e-5)
    assert (falls == 0).any() and (falls > 0).any()  # the ReLU was exercised both ways


def test_occlusion_of_a_severity_only_run_uses_the_log_odds_of_covid():
    """For lambda = 1 runs the score is logsumexp(z_1..z_4) - z_0 (eq. 3): a linear model whose
    severity logits follow the input changes its map only through that score."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 6))
    volume = torch.rand(1, 2, 4, 4)
    cam, score = occlusion_map(model, volume, fill=0.5, grid=(1, 2, 2), severity_only=True)
    with torch.no_grad():
        logits = model(volume[None])[0]
        assert score == pytest.approx(float(torch.logsumexp(logits[2:6], 0) - logits[1]), rel=1e-5)
        occluded = volume[None].repeat(4, 1, 1, 1, 1)
        for i, (y, x) in enumerate(((0, 0), (0, 2), (2, 0), (2, 2))):
            occluded[i, 0, :, y:y + 2, x:x + 2] = 0.5
        others = model(occluded)
        falls = torch.relu(score - (torch.logsumexp(others[:, 2:6], 1) - others[:, 1]))
    expected = falls.reshape(2, 2).repeat_interleave(2, 0).repeat_interleave(2, 1).expand(2, 4, 4)
    torch.testing.assert_close(cam, expected / expected.max(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_block_that_changes_nothing_gives_exactly_zero():
    """Every pass holds the unoccluded volume as well, so equal inputs give equal outputs: occluding
    with the values already there leaves the map zero, whatever the batch size."""
    torch.manual_seed(0)
    model = build_model(outputs=6, penultimate=8).eval()
    volume = torch.full((1, 8, 16, 16), 0.25)
    for batch_size in (1, 3, 4):
        cam, _ = occlusion_map(model, volume, fill=0.25, grid=(2, 2, 2), batch_size=batch_size)
        assert float(cam.abs().max()) == 0.0


def test_occlusion_blocks_tile_every_axis():
    for size, blocks in ((48, 6), (16, 4), (7, 3), (3, 6), (1, 4)):
        edges = block_edges(size, blocks)
        assert edges[0][0] == 0 and edges[-1][1] == size and len(edges) == min(size, blocks)
        assert all(stop == start for (_, stop), (start, _) in zip(edges, edges[1:]))
        assert max(stop - start for start, stop in edges) - min(stop - start for start, stop in edges) <= 1


def test_occlusion_maps_stay_fp32_unless_a_precision_is_asked_for():
    cpu = torch.device("cpu")
    assert map_precision("occlusion", "auto", cpu) is None
    assert map_precision("occlusion", "bf16", cpu) == torch.bfloat16
    assert map_precision("gradcam", "bf16", cpu) == torch.bfloat16
    assert map_precision("gradcam", "fp32", cpu) is None


def test_occlusion_fill_is_healthy_lung_under_the_window():
    # -850 HU: (-850 - (-470 - 705)) * 255 / 1410 = 58.8 grey levels; (-850 - (-600 - 750)) * 255 / 1500 = 85
    assert occlusion_fill(DEFAULT_WINDOW) == pytest.approx(325 * 255 / 1410 / 255)
    assert occlusion_fill(LEGACY_LUNG_WINDOW) == pytest.approx(85 / 255)
    assert occlusion_fill(Window(level=0.0, width=400.0)) == 0.0  # -850 HU lies below a soft-tissue window


def test_explain_command_writes_tensor_and_overlay(tmp_path, tiny_dataset, tiny_run):
    scan = sorted((tiny_dataset / "validation" / "covid").iterdir())[0]
    out = tmp_path / "explain"
    result = CliRunner().invoke(app, ["explain", str(scan), "--model", str(tiny_run), "--output", str(out),
                                      "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    cam = torch.load(out / f"{scan.name}-gradcam.pt", weights_only=True)
    assert isinstance(cam, torch.Tensor) and cam.shape == (8, 32, 32)
    assert 0.0 <= float(cam.min()) and float(cam.max()) == pytest.approx(1.0)
    pixels = assert_size(out / f"{scan.name}-gradcam.png", 720, 275)
    assert_panels_differ(pixels, rows=1, columns=3, right=0.9)  # the colour bar takes the right tenth


def test_explain_command_writes_the_occlusion_map(tmp_path, tiny_dataset, tiny_run):
    scan = sorted((tiny_dataset / "validation" / "covid").iterdir())[0]
    out = tmp_path / "explain"
    options = ["--model", str(tiny_run), "--output", str(out), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    result = CliRunner().invoke(app, ["explain", str(scan), *options, "--method", "occlusion"])
    assert result.exit_code == 0, result.output
    cam = torch.load(out / f"{scan.name}-occlusion.pt", weights_only=True)
    assert cam.shape == (8, 32, 32) and 0.0 <= float(cam.min()) and float(cam.max()) <= 1.0
    for z0, z1 in block_edges(8, 4):  # constant over each block
        for y0, y1 in block_edges(32, 6):
            for x0, x1 in block_edges(32, 6):
                assert torch.all(cam[z0:z1, y0:y1, x0:x1] == cam[z0, y0, x0])
    assert_size(out / f"{scan.name}-occlusion.png", 720, 275)
    assert not (out / f"{scan.name}-gradcam.pt").exists()
    result = CliRunner().invoke(app, ["explain", str(scan), *options, "--method", "lime"])
    assert result.exit_code == 1 and "gradcam, occlusion" in result.output and "Traceback" not in result.output


def test_grad_cam_records_a_graph_only_after_the_hooked_layer():
    """Up to the last block nothing keeps an autograd graph (the large size would need 10-20 GB for it);
    the head does, so the gradient still flows; the caller's grad mode is left as it was."""
    torch.manual_seed(0)
    model = build_model(outputs=6, penultimate=8)
    recorded: dict[str, bool] = {}

    def record(name: str):
        def hook(_module, _inputs, output) -> None:
            recorded.setdefault(name, output.requires_grad)
        return hook

    hooks = [module.register_forward_hook(record(name))
             for name, module in model.named_modules() if name in ("stem", "layer1", "layer3", "layer4.0", "fc")]
    with torch.no_grad():
        cam, _ = grad_cam(model, torch.rand(1, 16, 32, 32))
        assert not torch.is_grad_enabled()
    for hook in hooks:
        hook.remove()
    assert recorded == {"stem": False, "layer1": False, "layer3": False, "layer4.0": False, "fc": True}
    assert float(cam.max()) == pytest.approx(1.0)


def test_grad_cam_under_bf16_autocast_agrees_with_fp32():
    torch.manual_seed(0)
    model = TinyVideoResNet().eval()
    volume = torch.rand(1, 6, 8, 8)
    reference, score = grad_cam(model, volume)
    reduced, reduced_score = grad_cam(model, volume, dtype=torch.bfloat16)
    assert float((reduced - reference).abs().max()) < 0.05
    assert reduced_score == pytest.approx(score, abs=0.05)
