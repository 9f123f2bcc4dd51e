from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import Tensor, nn

from trainkit import Lambda


def preprocess(x: Tensor) -> Tensor:
    return x.view(-1, 1, 28, 28)


def test_forward_applies_the_function() -> None:
    layer = Lambda(preprocess)
    assert layer(torch.zeros(3, 784)).shape == (3, 1, 28, 28)


def test_repr_names_the_function_or_where_the_lambda_is() -> None:
    assert repr(Lambda(preprocess)) == "Lambda(preprocess)"
    text = repr(Lambda(lambda x: x))
    assert text.startswith("Lambda(<lambda> at test_layers.py:")


def test_model_with_module_level_function_pickles() -> None:
    model = nn.Sequential(Lambda(preprocess), nn.Flatten())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded(torch.ones(2, 784)).shape == (2, 784)
    assert pickle.loads(pickle.dumps(model))[0].func is preprocess


def test_pickling_a_lambda_says_what_to_use_instead() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Lambda(lambda x: x.view(x.size(0), -1)))
    with pytest.raises(pickle.PicklingError, match=r"state_dict\(\).*module level"):
        torch.save(model, io.BytesIO())
    with pytest.raises(pickle.PicklingError, match=r"<lambda> at test_layers\.py"):
        pickle.dumps(model)


def test_pickling_a_nested_function_is_refused_too() -> None:
    def inner(x: Tensor) -> Tensor:
        return x

    with pytest.raises(pickle.PicklingError, match="inner"):
        pickle.dumps(Lambda(inner))


def test_copies_of_a_lambda_layer_still_work() -> None:
    layer = Lambda(lambda x: x * 2)
    for clone in (copy.deepcopy(layer), copy.copy(layer)):
        assert torch.equal(clone(torch.ones(2)), torch.full((2,), 2.0))
    # the original is untouched by the copies
    assert torch.equal(layer(torch.ones(2)), torch.full((2,), 2.0))


def test_func_must_be_callable() -> None:
    with pytest.raises(TypeError, match="func must be callable"):
        Lambda(3)  # type: ignore[arg-type]
