"""Macro F1 and accuracy for both tasks, against counts worked out by hand."""

import math

import pytest
import torch

from cov3d.model.metrics import presence_scores, severity_predictions, severity_scores, task_metrics


def test_presence_scores_by_hand():
    # truth 1,1,0,0; sigmoid(x) >= 0.5  <=>  x >= 0 -> predictions 1,0,0,1
    logits = torch.tensor([[2.0], [-1.0], [-3.0], [0.5]])
    target = torch.tensor([[1, 0], [1, 2], [0, 0], [0, 0]])
    scores = presence_scores(logits, target)
    # class 1: tp=1 fp=1 fn=1 -> F1 = 2/(2+1+1) = 0.5; class 0 likewise -> macro 0.5
    assert scores["presence_f1"] == pytest.approx(0.5)
    assert scores["presence_accuracy"] == pytest.approx(0.5)


def test_presence_threshold_is_inclusive():
    logits = torch.tensor([[0.0], [-1e-3]])
    target = torch.tensor([[1, 0], [0, 0]])
    assert presence_scores(logits, target)["presence_accuracy"] == 1.0


def test_severity_uses_argmax_over_mild_to_critical_and_only_annotated_rows():
    # z_0 is huge everywhere: it must be ignored for the severity prediction
    logits = torch.tensor([
        [0.0, 9.0, 1.0, 0.0, 0.0, 0.0],  # -> mild
        [0.0, 9.0, 0.0, 2.0, 0.0, 0.0],  # -> moderate
        [0.0, 9.0, 0.0, 0.0, 0.0, 3.0],  # -> critical
        [0.0, 9.0, 0.0, 0.0, 5.0, 0.0],  # -> severe, but the row is unannotated
    ])
    assert severity_predictions(logits).tolist() == [1, 2, 4, 3]
    target = torch.tensor([[1, 1], [1, 2], [1, 3], [1, 0]])
    scores = severity_scores(logits, target)
    # annotated truth 1,2,3 vs predicted 1,2,4: F1 per label 1:1, 2:1, 3:0, 4:0 -> macro 0.5
    assert scores["severity_f1"] == pytest.approx(0.5)
    assert scores["severity_accuracy"] == pytest.approx(2 / 3)


def test_severity_without_annotated_rows_is_nan():
    logits = torch.zeros(2, 6)
    target = torch.tensor([[0, 0], [1, 0]])
    assert math.isnan(severity_scores(logits, target)["severity_f1"])


@pytest.mark.parametrize("factor, names", [
    (0.0, ["presence_f1", "presence_accuracy"]),
    (0.5, ["presence_f1", "presence_accuracy", "severity_f1", "severity_accuracy"]),
    (1.0, ["severity_f1", "severity_accuracy"]),
])
def test_task_metrics_follow_lambda(factor, names):
    assert [metric.name for metric in task_metrics(factor)] == names
