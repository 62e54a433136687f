"""Post-training evaluation in the run's precision (the sharded path runs in tests/training/test_ddp_validation.py)."""

import pytest
import torch

from cov3d.training.evaluation import kept_weights_predictions, validation_scores
from cov3d.training.run_figures import validation_logits


def test_validation_logits_run_in_the_given_precision():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 6)
    loader = [(torch.randn(2, 64), torch.zeros(2, 2)) for _ in range(3)]
    full, _ = validation_logits(model, loader, torch.device("cpu"))
    reduced, targets = validation_logits(model, loader, torch.device("cpu"), torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.cat([model(volumes).float() for volumes, _ in loader])
    assert torch.equal(reduced, expected) and not torch.equal(reduced, full)
    assert targets.shape == (6, 2)


class FixedPredictor:
    """Stands for RunPredictor: records the dtype it is given, predicts a fixed P(covid) per scan."""

    made: list = []
    predicted_tasks = ("presence",)

    def __init__(self, source, device, dtype, reflect=True, tasks=(), calibrated=True):
        FixedPredictor.made.append((dtype, calibrated))

    def task_logits(self, volumes: torch.Tensor) -> torch.Tensor:
        covid = torch.logit(volumes[:, 0])  # the test puts each scan's P(covid) in its first value
        return torch.stack([covid, *[torch.full_like(covid, float("nan"))] * 4], dim=1)


def test_kept_weights_are_scored_in_the_runs_precision(monkeypatch, tmp_path):
    import cov3d.model.files
    import cov3d.model.predictor

    monkeypatch.setattr(cov3d.model.files, "load_source", lambda run_dir: type("Source", (), {"states": {"presence": {}}, "tasks": ("presence",)})())
    monkeypatch.setattr(cov3d.model.predictor, "RunPredictor", FixedPredictor)
    FixedPredictor.made = []
    loader = [(torch.tensor([[0.9], [0.2]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])),
              (torch.tensor([[0.8], [0.6]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))]
    scores = validation_scores(kept_weights_predictions(tmp_path, loader, torch.device("cpu"), dtype=torch.bfloat16))
    assert FixedPredictor.made == [(torch.bfloat16, False)]  # one pass, uncalibrated logits
    # predicted [1, 0, 1, 1] for truth [1, 0, 1, 0]: F1 of covid 2·2/(2·2 + 1) = 0.8, of non-covid 2·1/(2·1 + 1) = 2/3
    assert scores == {"presence_f1": pytest.approx((0.8 + 2 / 3) / 2)}
