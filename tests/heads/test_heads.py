"""Heads: every registered head's output shape, the registry, user heads in a module, argument errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_mtl import MultiTaskModule, Task, list_heads, register_head
from lightning_mtl.backbones import MLPBackbone
from lightning_mtl.heads import DenseHead, LinearHead, MLPHead, TokenHead, create_head

IN, OUT = 8, 3

# The features each head reads; a head registered later without an entry gets pooled features.
HEAD_INPUTS = {
    "linear": (4, IN),
    "mlp": (4, IN),
    "token": (4, 7, IN),
    "dense": (4, IN, 5, 6),
}
HEAD_OUTPUTS = {
    "linear": (4, OUT),
    "mlp": (4, OUT),
    "token": (4, 7, OUT),
    "dense": (4, OUT, 5, 6),
}
_counter = itertools.count()


def unique(prefix: str) -> str:
    return f"test_{prefix}_{next(_counter)}"


def test_builtin_heads_are_registered_and_covered():
    assert {"linear", "mlp", "token", "dense"} <= set(list_heads())
    assert list_heads("lin*") == ["linear"]
    classes = {"linear": LinearHead, "mlp": MLPHead, "token": TokenHead, "dense": DenseHead}
    for name, cls in classes.items():
        assert cls.registry_name == name
        assert type(create_head(name, IN, OUT)) is cls


@pytest.mark.parametrize("name", list_heads())
def test_head_output_shape(name):
    torch.manual_seed(0)
    head = create_head(name, IN, OUT)
    assert isinstance(head, nn.Module)
    x = torch.randn(*HEAD_INPUTS.get(name, (4, IN)), requires_grad=True)
    out = head(x)
    assert tuple(out.shape) == HEAD_OUTPUTS.get(name, (4, OUT))
    assert torch.isfinite(out).all()
    out.sum().backward()  # differentiable all the way to the features
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())


@pytest.mark.parametrize("name", list_heads())
def test_head_is_deterministic_in_eval_mode(name):
    torch.manual_seed(0)
    head = create_head(name, IN, OUT).eval()
    x = torch.randn(*HEAD_INPUTS.get(name, (4, IN)))
    assert torch.equal(head(x), head(x))


def test_head_kwargs_are_applied():
    mlp = create_head("mlp", IN, OUT, hidden=16, num_layers=2, dropout=0.0)
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(IN, 16), (16, 16), (16, OUT)]
    dense = create_head("dense", IN, OUT, hidden=5)
    assert dense.net[0].out_channels == 5
    assert isinstance(create_head("linear", IN, OUT, dropout=0.3).dropout, nn.Dropout)
    assert create_head("linear", IN, OUT).dropout is None  # no dropout module (and no call) at 0
    with pytest.raises(ValueError, match="num_layers >= 1"):
        create_head("mlp", IN, OUT, num_layers=0)


def test_linear_head_accepts_leading_dims():
    assert LinearHead(IN, OUT)(torch.zeros(2, 5, IN)).shape == (2, 5, OUT)


def test_token_and_dense_heads_reject_wrong_rank():
    with pytest.raises(
        ValueError, match=r"TokenHead expects token features \[batch, seq, hidden\], got \(4, 8\)"
    ):
        create_head("token", IN, OUT)(torch.zeros(4, IN))
    with pytest.raises(
        ValueError, match=r"DenseHead expects feature maps \[batch, channels, h, w\], got \(4, 7, 8\)"
    ):
        create_head("dense", IN, OUT)(torch.zeros(4, 7, IN))


@pytest.mark.parametrize("name", list_heads())
def test_register_head_duplicate_raises(name):
    original = type(create_head(name, IN, OUT))
    with pytest.raises(ValueError, match=rf"A head named '{name}' is already registered"):

        @register_head(name)
        class Other(nn.Linear):
            pass

    assert type(create_head(name, IN, OUT)) is original


def test_unknown_head():
    with pytest.raises(KeyError, match=r"Unknown head 'nope'\. Registered heads: \[.*'linear'"):
        create_head("nope", IN, OUT)


def test_create_head_bad_kwarg_names_the_head():
    with pytest.raises(
        TypeError, match=r"Head 'linear' \(LinearHead\) rejected its arguments \{'hidden': 4\}"
    ):
        create_head("linear", IN, OUT, hidden=4)
    with pytest.raises(TypeError, match=r"Head 'mlp' \(MLPHead\) rejected its arguments \{'width': 4\}"):
        create_head("mlp", IN, OUT, width=4)


def test_module_with_bad_head_kwargs_names_the_head():
    with pytest.raises(TypeError, match=r"Head 'token' \(TokenHead\)"):
        MultiTaskModule(
            MLPBackbone(IN), [Task("t", kind="token", labels=["a", "b"], head_kwargs={"hidden": 2})]
        )


def test_user_registered_head_is_used_by_the_module():
    name = unique("scaled")

    @register_head(name)
    class ScaledHead(nn.Module):
        def __init__(self, in_features: int, out_features: int, scale: float = 1.0) -> None:
            super().__init__()
            self.proj = nn.Linear(in_features, out_features)
            self.scale = scale

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.scale * self.proj(features)

    assert name in list_heads()
    assert ScaledHead.registry_name == name
    tasks = [
        Task("topic", kind="multiclass", labels=["a", "b", "c"], head=name, head_kwargs={"scale": 2.0}),
        Task("risk", kind="binary"),
    ]
    torch.manual_seed(0)
    module = MultiTaskModule(MLPBackbone(IN, hidden=(16,), dropout=0.0), tasks)
    head = module.heads["topic"]
    assert isinstance(head, ScaledHead) and head.scale == 2.0
    assert (head.proj.in_features, head.proj.out_features) == (16, 3)
    assert isinstance(module.heads["risk"], LinearHead)
    x = torch.randn(5, IN)
    module.eval()
    with torch.no_grad():
        out = module(x)["topic"]
        assert torch.allclose(out, 2.0 * head.proj(module.backbone(x)))
    # it also survives a round trip through the task dicts (checkpoint hyper-parameters)
    again = MultiTaskModule(MLPBackbone(IN, hidden=(16,), dropout=0.0), [t.to_dict() for t in tasks])
    assert isinstance(again.heads["topic"], ScaledHead)
