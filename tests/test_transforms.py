"""`OneHot` and `one_hot`: the tutorial's one-hot `Lambda`, picklable and with clear errors."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import Lambda as TorchvisionLambda

from trainkit.transforms import OneHot, one_hot


def tutorial_one_hot(y: int) -> Tensor:
    """The target transform of the Quickstart's "Transforms" page, verbatim."""
    return torch.zeros(10, dtype=torch.float).scatter_(0, torch.tensor(y), value=1)


@pytest.mark.parametrize("label", range(10))
def test_one_hot_matches_the_tutorials_lambda(label: int) -> None:
    expected = tutorial_one_hot(label)
    for got in (OneHot(10)(label), OneHot(10)(torch.tensor(label)), one_hot(label, 10)):
        assert got.dtype == torch.float32
        assert torch.equal(got, expected)


def test_one_hot_of_a_batch_and_of_any_shape() -> None:
    labels = torch.tensor([[0, 3], [2, 2]])
    got = one_hot(labels, 4)
    assert got.shape == (2, 2, 4)
    assert torch.equal(got, F.one_hot(labels, 4).float())
    assert torch.equal(one_hot([1, 0], 2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert one_hot(torch.zeros(0, dtype=torch.long), 3).shape == (0, 3)


def test_dtype_and_device_follow_the_arguments() -> None:
    assert one_hot(torch.tensor([1]), 3, dtype=torch.long).dtype == torch.long
    assert OneHot(3, dtype=torch.float16)(2).dtype == torch.float16
    assert OneHot(3, torch.bfloat16)(torch.tensor(2)).dtype == torch.bfloat16
    assert one_hot(torch.tensor([1, 2], dtype=torch.uint8), 3).tolist() == [
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
    ]


@pytest.mark.parametrize("label", [10, -1, 99])
def test_a_label_out_of_range_is_named(label: int) -> None:
    with pytest.raises(ValueError, match=rf"OneHot\(10\): label {label} is outside \[0, 10\)"):
        OneHot(10)(label)
    with pytest.raises(ValueError, match=rf"label {label} is outside \[0, 10\) \(num_classes=10\)"):
        OneHot(10)(torch.tensor(label))
    with pytest.raises(ValueError, match=rf"one_hot: label {label} is outside"):
        one_hot(torch.tensor([0, label, 3]), 10)


@pytest.mark.parametrize("labels", [torch.tensor([0.0, 1.0]), torch.tensor([True]), 1.0, True])
def test_labels_that_are_not_integers_are_refused(labels: object) -> None:
    with pytest.raises(TypeError, match="labels must be integer class indices, got torch"):
        one_hot(labels, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be integer class indices"):
        OneHot(3)(labels)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True, "10"])
def test_a_bad_number_of_classes_is_refused(num_classes: object) -> None:
    with pytest.raises(ValueError, match=r"OneHot\(num_classes=...\): must be a positive integer"):
        OneHot(num_classes)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"one_hot\(num_classes=...\)"):
        one_hot(0, num_classes)  # type: ignore[arg-type]


def test_a_dtype_that_is_not_a_torch_dtype_is_refused() -> None:
    with pytest.raises(
        TypeError, match=r"OneHot\(dtype=...\): expected a torch.dtype, got 'float'"
    ):
        OneHot(10, "float")  # type: ignore[arg-type]


def test_one_hot_targets_train_with_cross_entropy_as_class_indices_do() -> None:
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 3, 1])
    loss = torch.nn.CrossEntropyLoss()
    assert torch.allclose(loss(logits, one_hot(labels, 4)), loss(logits, labels))


def test_one_hot_is_picklable_where_the_tutorials_lambda_is_not() -> None:
    # DataLoader workers started by spawn or forkserver receive the dataset, transforms
    # included, through pickle (spawn is the default on macOS and Windows).
    transform = OneHot(10, dtype=torch.float64)
    copy = pickle.loads(pickle.dumps(transform))
    assert repr(copy) == "OneHot(num_classes=10, dtype=torch.float64)"
    assert torch.equal(copy(4), transform(4))
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(TorchvisionLambda(lambda y: tutorial_one_hot(y)))
