"""combine: the arithmetic of ensembles: means, spread and agreement over models and Monte-Carlo samples."""

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
