"""combine: the arithmetic of ensembles: means, spread and agreement over models and Monte-Carlo samples."""

from pathlib import Path

import pytest
import torch

from cov3d.model.predictor import combine


def test_combine_by_hand():
    nan = float("nan")
    samples = torch.tensor([
        [[0.2, 0.7, 0.1, 0.1, 0.1]],
        [[0.4, 0.1, 0.6, 0.2, 0.1]],
        [[0.9, 0.6, 0.2, 0.1, 0.1]],
        [[0.5, nan, nan, nan, nan]],  # a member without severity weights
    ])
    (prediction,) = combine(samples)
    assert prediction.covid_probability == pytest.approx(0.5)
    assert prediction.covid_probability_std == pytest.approx((0.26 / 4) ** 0.5)  # deviations .3 .1 .4 0
    assert prediction.severity_probabilities == pytest.approx([1.4 / 3, 0.9 / 3, 0.4 / 3, 0.3 / 3])
    assert prediction.severity == "mild" and prediction.severity_agreement == pytest.approx(2 / 3)

    # a severity-only member (NaN presence) leaves P(covid) and its spread to the others
    (prediction,) = combine(torch.tensor([[[0.2, nan, nan, nan, nan]], [[0.6, nan, nan, nan, nan]],
                                          [[nan, 0.1, 0.2, 0.3, 0.4]]]))
    assert prediction.covid_probability == pytest.approx(0.4) and prediction.covid_probability_std == pytest.approx(0.2)
    assert prediction.severity_probabilities == pytest.approx([0.1, 0.2, 0.3, 0.4]) and prediction.severity == "critical"


class TwoViewModel(torch.nn.Module):
    """Logits ``first`` for a volume whose first column is 1, ``flipped`` for its reflection (first column 0)."""

    def __init__(self, first: list[float], flipped: list[float]):
        super().__init__()
        self.first, self.flipped = torch.tensor(first), torch.tensor(flipped)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        left = volumes[:, 0, 0, 0, :1]  # (B, 1)
        return left * self.first + (1 - left) * self.flipped


def two_view_prediction(config: dict, first: list[float], flipped: list[float]):
    from cov3d.model.files import ModelSource
    from cov3d.model.predictor import RunPredictor

    state = {}
    source = ModelSource(Path("run"), {"depth": 1, "height": 1, "width": 2, "outputs": len(first), **config},
                         {"presence": state})
    source.build = lambda task: TwoViewModel(first, flipped) if task in source.states else None
    volume = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 1, 2)
    return RunPredictor(source, torch.device("cpu"), None).predict(volume)[0]


def test_mean_logit_presence_and_mean_softmax_severity_by_hand():
    """Views x = 2 and x = -1, z_1..z_4 = (1, 0, 0, 0) and (0, 1, 0, 0): the paper averages the probabilities,
    (sigmoid(2) + sigmoid(-1)) / 2 = 0.574869; the original code averages the logits, sigmoid(0.5) = 0.622459.
    Severity is the mean softmax in both: (e + 1) / (2 (e + 3)) = 0.325122 for mild and moderate."""
    first, flipped = [2.0, 1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 1.0, 0.0, 0.0]
    one = {"kept_weights": "one"}
    paper = two_view_prediction({**one, "presence_decision": "mean-probability"}, first, flipped)
    original = two_view_prediction({**one, "presence_decision": "mean-logit"}, first, flipped)
    assert paper.covid_probability == pytest.approx(0.574869, abs=1e-6)
    assert original.covid_probability == pytest.approx(0.622459, abs=1e-6)
    for prediction in (paper, original):  # one checkpoint: the presence weights give the severity too
        assert prediction.severity_probabilities == pytest.approx([0.325122, 0.325122, 0.174878, 0.174878], abs=1e-6)


def test_one_checkpoint_predicts_every_task_of_its_outputs():
    from cov3d.model.files import ModelSource

    state = {"w": torch.zeros(1)}
    both = ModelSource(Path("run"), {"kept_weights": "one", "outputs": 5}, {"presence": state})
    assert both.states == {"presence": state, "severity": state}
    assert ModelSource(Path("run"), {"kept_weights": "one", "outputs": 1}, {"presence": state}).states == {"presence": state}
    assert ModelSource(Path("run"), {"outputs": 6}, {"presence": state}).states == {"presence": state}  # per task


def test_lambda_one_never_predicts_presence_from_its_untrained_output():
    """At lambda = 1 the loss never trains x: one kept checkpoint is severity weights only, presence comes
    from s_1 + .. + s_4 where the outputs have z_0, and a graded-only model (no z_0) refuses presence."""
    from cov3d.errors import Cov3dError
    from cov3d.model.files import ModelSource
    from cov3d.model.predictor import RunPredictor

    state = {"w": torch.zeros(1)}
    lambda_one = {"kept_weights": "one", "severity_factor": 1.0}
    paper_layout = ModelSource(Path("run"), {**lambda_one, "outputs": 6}, {"severity": state})
    assert paper_layout.states == {"severity": state} and paper_layout.tasks == ("presence", "severity")
    graded_only = ModelSource(Path("run"), {**lambda_one, "outputs": 5}, {"severity": state})
    assert graded_only.states == {"severity": state} and graded_only.tasks == ("severity",)
    with pytest.raises(Cov3dError, match="cannot predict COVID-19 presence.*--severity-model"):
        RunPredictor(graded_only, torch.device("cpu"), None)
    lambda_half = ModelSource(Path("run"), {"kept_weights": "one", "severity_factor": 0.5, "outputs": 5}, {"presence": state})
    assert lambda_half.tasks == ("presence", "severity")
