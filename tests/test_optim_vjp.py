"""Local parity (rung 2): each closed-form VJP equals autograd's VJP of the same
pure step, at random points, for every flag and every hyperparameter shape.

Oracle: ``torch.autograd.grad`` through ``step`` (proofs/<optimizer>.md name the
equations this checks).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gimli.optim import bind
from optim_db import IDS, OPTIM_DB, OptimRow, granularities, learnable_now

RTOL = 1e-10


def _tensors(state: Any) -> list[tuple[int, int]]:
    """(field, index) of every tensor entry of an optimizer State."""
    return [(f, i) for f, field in enumerate(state) for i, x in enumerate(field)
            if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("row", OPTIM_DB, ids=IDS)
@given(data=st.data(), pre_steps=st.integers(0, 8), seed=st.integers(0, 2**16))
def test_vjp_matches_autograd(row: OptimRow, data: st.DataObject, pre_steps: int, seed: int) -> None:
    kwargs = data.draw(row.kwargs)
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_()
              for s in row.shapes()[:2]]
    opt = row.cls([{"params": params[:1]}, {"params": params[1:], "lr": kwargs["lr"] * 0.7}], **kwargs)
    for _ in range(pre_steps):                  # non-trivial state; RAdam rectified after ~6
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    inner = bind(opt)
    need = frozenset(learnable_now(row, opt, meta=False))
    # inputs of the pure step, as leaves: θ, state tensors, G, and each hyperparameter
    # per tensor, 0-dim for one tensor and element-shaped for the other (where allowed)
    theta = [p.detach().clone().requires_grad_() for p in params]
    state = inner.read_state()
    for f, i in _tensors(state):
        state[f][i].requires_grad_()
    grads = [torch.randn(p.shape, generator=g, dtype=p.dtype).requires_grad_() for p in params]
    hp = inner.constant_hypers()
    hp = {name: [v.expand(params[i].shape).clone() if i == 1 and "element" in granularities(opt, name)
                 else v.clone() for i, v in enumerate(vals)]   # (independent leaves)
          for name, vals in hp.items()}
    for vals in hp.values():
        for v in vals:
            v.requires_grad_()

    new_theta, new_state = inner.step(theta, state, grads, hp)
    cot_theta = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    cot_state = type(new_state)(*([torch.randn(x.shape, generator=g, dtype=x.dtype)
                                   if isinstance(x, torch.Tensor) else None for x in field]
                                  for field in new_state))
    outputs = new_theta + [new_state[f][i] for f, i in _tensors(new_state)]
    cots = cot_theta + [cot_state[f][i] for f, i in _tensors(new_state)]
    in_state = [state[f][i] for f, i in _tensors(state)]
    hyper_leaves = [v for name in sorted(need) for v in hp[name]]
    expected = torch.autograd.grad(outputs, theta + in_state + grads + hyper_leaves, cots,
                                   allow_unused=True)

    out = inner.vjp([t.detach() for t in theta], inner.read_state(), [x.detach() for x in grads],
                    {k: [v.detach() for v in vs] for k, vs in hp.items()}, cot_theta, cot_state, need)
    got = (out.params + [out.state[f][i] for f, i in _tensors(state)] + out.grads
           + [a for name in sorted(need) for a in out.hypers[name]])
    assert len(got) == len(expected)
    for ours, ref in zip(got, expected):
        ref = torch.zeros_like(ours) if ref is None else ref
        torch.testing.assert_close(ours, ref, rtol=RTOL, atol=1e-12 * (1 + ref.abs().max().item()))
