"""Forward parity (rung 1): J steps of each differentiable optimizer equal J steps
of the real ``torch.optim`` optimizer, parameters and state, for every flag.

Oracle: ``torch.optim`` itself, stepping on the same gradients.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gimli.optim import bind
from optim_db import IDS, OPTIM_DB, OptimRow

RTOL = 1e-12


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal up to rounding: relative 1e-12, or a few ulps of the tensor's own scale
    for an entry that is itself a cancellation (a moment near 0)."""
    scale = theirs.abs().max().item() if theirs.numel() else 0.0
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-14 * scale)


def _grads(g: torch.Generator, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


@pytest.mark.parametrize("row", OPTIM_DB, ids=IDS)
@given(data=st.data(), pre_steps=st.integers(0, 3), steps=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_forward_parity(row: OptimRow, data: st.DataObject, pre_steps: int, steps: int,
                        seed: int) -> None:
    kwargs = data.draw(row.kwargs)
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in row.shapes()]
    opt = row.cls([{"params": params[:2]}, {"params": params[2:], "lr": kwargs["lr"] / 2}], **kwargs)

    def real_step(grads: list[torch.Tensor | None]) -> None:
        for p, grad in zip(params, grads):
            p.grad = None if grad is None else grad.clone()
        opt.step()

    for _ in range(pre_steps):                  # an optimizer that has already stepped
        real_step(list(_grads(g, params)))
    inner = bind(opt)
    theta, state = [p.detach().clone() for p in params], inner.read_state()
    hp = inner.constant_hypers()
    for j in range(steps):
        grads: list[torch.Tensor | None] = list(_grads(g, params))
        if j == 1:
            grads[1] = None                     # a tensor with no gradient does not step
        real_step(grads)
        theta, state = inner.step(theta, state, grads, hp)

    for i, p in enumerate(params):
        assert_close(theta[i], p.detach())
        ours = inner.write_state(state, i)
        theirs = opt.state.get(p, {})
        assert set(ours) == set(theirs)
        for key, value in theirs.items():
            assert_close(torch.as_tensor(ours[key], dtype=torch.float64),
                         torch.as_tensor(value, dtype=torch.float64))


def test_implementation_flags_are_accepted() -> None:
    p = torch.zeros(2, requires_grad=True)
    for cls, kw in [(torch.optim.SGD, {"foreach": True}), (torch.optim.Adam, {"foreach": False}),
                    (torch.optim.AdamW, {"capturable": False}), (torch.optim.Adagrad, {"foreach": True})]:
        assert bind(cls([p], lr=0.1, **kw)).name == cls.__name__
