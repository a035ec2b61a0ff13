"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper of fn(x, s, y)."""

import pytest
import torch

from ddpm.conditioning import classifier_free

NULL = 5


class Affine:
    """fn(x, s, y) = (y + 1) x + s, recording the batch size of every call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x, s, y=None):
        self.batches.append(len(x))
        y = torch.full((len(x),), NULL) if y is None else y
        return (y + 1).to(x.dtype).reshape(-1, 1) * x + s.reshape(-1, 1)


X = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
S = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
Y = torch.tensor([0, 1, 2])


def test_scale_one_is_the_conditional_model_in_one_call():
    fn = Affine()
    out = classifier_free(fn, Y, 1.0, NULL)(X, S)
    assert torch.equal(out, fn(X, S, Y))
    assert fn.batches == [3, 3]


def test_scale_zero_is_the_unconditional_model():
    fn = Affine()
    assert torch.equal(classifier_free(fn, Y, 0.0, NULL)(X, S), fn(X, S, torch.full_like(Y, NULL)))
    assert torch.equal(classifier_free(fn, Y, 0.0, NULL)(X, S), fn(X, S))  # the null class is the label-free call


@pytest.mark.parametrize("w", [0.5, 2.0, 7.5])
def test_other_scales_extrapolate_in_one_doubled_batch(w):
    fn = Affine()
    out = classifier_free(fn, Y, w, NULL)(X, S)
    assert fn.batches == [6]
    uncond, cond = fn(X, S, torch.full_like(Y, NULL)), fn(X, S, Y)
    torch.testing.assert_close(out, uncond + w * (cond - uncond))


def test_without_labels_the_model_is_called_unconditionally():
    seen = []
    out = classifier_free(lambda x, s: seen.append(len(x)) or x + s.reshape(-1, 1), None, 3.0, NULL)(X, S)
    torch.testing.assert_close(out, X + 0.5)
    assert seen == [3]
