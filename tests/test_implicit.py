"""Implicit hypergradients (``GimliSolver(mode="implicit")``): the implicit function
theorem's hypergradient at the end of an inner loop run to convergence.

Oracles, float64: closed forms where the inner problem is quadratic (ridge regression
with per-feature L2 coefficients: θ* and dL^val/dφ solve linear systems, written here
with ``torch.linalg.solve``; iMAML's proximal term on a quadratic: dθ*/dθ₀ = λ(A + λI)⁻¹);
on a smooth non-convex problem, reverse mode over a long unroll, which converges to the
implicit hypergradient as the inner loop converges, and a hand-written autograd unroll of
iMAML's regularised inner loop.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gimli
from strategies import mlp

N, M, D = 40, 30, 6
_gen = torch.Generator().manual_seed(0)
X = torch.randn(N, D, generator=_gen, dtype=torch.float64)
Y = X @ torch.randn(D, 1, generator=_gen, dtype=torch.float64) + 0.5 * torch.randn(N, 1, generator=_gen, dtype=torch.float64)
XV = torch.randn(M, D, generator=_gen, dtype=torch.float64)
YV = XV @ torch.randn(D, 1, generator=_gen, dtype=torch.float64)
LOG_C = torch.linspace(-2.0, 0.0, D, dtype=torch.float64)


def ridge_loss(model: Any, batch: Any, meta: Any) -> torch.Tensor:
    x, y = batch
    w = model.weight.reshape(-1)
    return 0.5 * ((model(x) - y) ** 2).mean() + 0.5 * (meta["log_c"].exp() * w ** 2).sum()


def squared_error(model: Any, batch: Any, meta: Any = None) -> torch.Tensor:
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).mean()


def ridge_solver(implicit: gimli.Implicit, log_c: torch.Tensor = LOG_C) -> tuple[gimli.GimliSolver, float]:
    """Per-feature L2 coefficients exp(φ) as φ^loss; the inner loop: gradient descent at
    1/L, which contracts the error by 1 − μ/L ≤ 0.9 a step."""
    with torch.random.fork_rng():
        torch.manual_seed(1)                # the same start whatever ran before
        model = nn.Linear(D, 1, bias=False).double()
    A = X.T @ X / N + torch.diag(log_c.exp())
    lr = 1.0 / float(torch.linalg.eigvalsh(A).max())
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    meta = gimli.MetaParams(loss={"log_c": log_c.clone()})
    return gimli.GimliSolver(model, ridge_loss, opt, meta, val_loss_fn=squared_error, mode="implicit",
                             implicit=implicit), lr


def ridge_closed_form(log_c: torch.Tensor = LOG_C) -> torch.Tensor:
    """dL^val/dφ_i = −e^{φ_i} θ*_i (A⁻¹ ∇L^val(θ*))_i, A = XᵀX/N + diag(e^φ)."""
    c = log_c.exp()
    A = X.T @ X / N + torch.diag(c)
    theta = torch.linalg.solve(A, X.T @ Y / N)
    v = torch.linalg.solve(A, XV.T @ (XV @ theta - YV) / M)
    return -(c * theta.reshape(-1) * v.reshape(-1))


TRAIN = [(X, Y)] * 600                      # the full batch at every step: 0.9^600 ≈ 1e-27


@pytest.mark.parametrize("method", ["dense", "cg", "minres", "neumann"])
def test_ridge_equals_the_closed_form(method: str) -> None:
    solver, _ = ridge_solver(gimli.Implicit(method=method, iterations=600))
    got = solver.hypergradient(TRAIN, (XV, YV))["loss.log_c"]
    want = ridge_closed_form()
    assert float(want.abs().min()) > 1e-3                          # every coefficient matters
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    report = solver.last_implicit
    assert report is not None and report.method == method
    assert report.residual < 1e-12 and report.gradient_norm < 1e-12


def test_cg_stops_at_its_tolerance() -> None:
    """A loose tolerance stops CG early; the residual it reports is the true one and
    bounds the error (‖A⁻¹‖·residual·‖b‖)."""
    solver, _ = ridge_solver(gimli.Implicit(method="cg", tol=1e-3))
    got = solver.hypergradient(TRAIN, (XV, YV))["loss.log_c"]
    report = solver.last_implicit
    assert report is not None and report.residual < 1e-3 and report.products < D + 1
    error = float((got - ridge_closed_form()).abs().max())
    assert 0 < error < 1e-2 * float(ridge_closed_form().abs().max())


def test_an_unconverged_solve_warns_once() -> None:
    solver, _ = ridge_solver(gimli.Implicit(method="cg", iterations=2))
    with pytest.warns(gimli.GimliWarning, match="residual") as said:
        solver.hypergradient(TRAIN, (XV, YV))
        solver.hypergradient(TRAIN, (XV, YV))
    assert len(said) == 1
    assert solver.last_implicit is not None and solver.last_implicit.residual > 1e-3


def test_an_unconverged_inner_loop_is_reported_and_converges() -> None:
    """Few inner steps: the end point is not stationary (reported), and the hypergradient is
    off; more steps bring both down."""
    errors, norms = [], []
    for steps in (3, 10, 30):
        solver, _ = ridge_solver(gimli.Implicit(method="dense"))
        got = solver.hypergradient(TRAIN[:steps], (XV, YV))["loss.log_c"]
        assert solver.last_implicit is not None
        norms.append(solver.last_implicit.gradient_norm)
        errors.append(float((got - ridge_closed_form()).abs().max()))
    assert norms[0] > 1e-2 and errors[0] > 1e-2
    assert norms[0] > norms[1] > norms[2] and errors[0] > errors[1] > errors[2]


# --- a smooth non-convex problem: implicit = the limit of the unrolled hypergradient ------------
with torch.random.fork_rng():
    torch.manual_seed(7)
    NET = mlp([2, 8, 1], "tanh").double()
_g2 = torch.Generator().manual_seed(3)
XS = torch.randn(24, 2, generator=_g2, dtype=torch.float64)
YS = torch.sin(2 * XS[:, :1]) + XS[:, 1:] ** 2
XSV = torch.randn(16, 2, generator=_g2, dtype=torch.float64)
YSV = torch.sin(2 * XSV[:, :1]) + XSV[:, 1:] ** 2


def l2_loss(model: Any, batch: Any, meta: Any) -> torch.Tensor:
    x, y = batch
    weights = sum((p ** 2).sum() for p in model.parameters())
    return F.mse_loss(model(x), y) + meta["log_l2"].exp() * weights


def nonconvex(mode: str, steps: int, **kwargs: Any) -> gimli.Hypergradients:
    model = copy.deepcopy(NET)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    meta = gimli.MetaParams(loss={"log_l2": torch.tensor(-3.0, dtype=torch.float64)})
    solver = gimli.GimliSolver(model, l2_loss, opt, meta, val_loss_fn=lambda m, b, meta: F.mse_loss(m(b[0]), b[1]),
                               mode=mode, **kwargs)
    return solver.hypergradient([(XS, YS)] * steps, (XSV, YSV))


def test_nonconvex_implicit_is_the_long_unrolls_limit() -> None:
    implicit = nonconvex("implicit", 3000, implicit=gimli.Implicit(method="dense"))["loss.log_l2"]
    errors = [abs(float(nonconvex("reverse", J, memory="recompute")["loss.log_l2"] - implicit))
              for J in (100, 400, 1600)]
    assert abs(float(implicit)) > 1e-3
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6 * abs(float(implicit)) + 1e-9
    cg = nonconvex("implicit", 3000, implicit=gimli.Implicit(method="cg"))["loss.log_l2"]
    assert float(cg) == pytest.approx(float(implicit), rel=1e-8)


# --- iMAML: θ₀ through the proximal term ---------------------------------------------------------
def test_imaml_on_a_quadratic_equals_the_closed_form() -> None:
    """ℓ = ½‖Xθ − y‖²/N + λ/2‖θ − θ₀‖²: θ* = (A + λI)⁻¹(Xᵀy/N + λθ₀), dθ*/dθ₀ = λ(A + λI)⁻¹."""
    lam = 0.5
    model = nn.Linear(D, 1, bias=False).double()
    A = X.T @ X / N
    lr = 1.0 / float(torch.linalg.eigvalsh(A).max() + lam)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    meta = gimli.MetaParams(init=model)
    solver = gimli.GimliSolver(model, squared_error, opt, meta, mode="implicit",
                               implicit=gimli.Implicit(method="cg", proximal=lam))
    theta0 = model.weight.detach().reshape(-1, 1).clone()
    got = solver.hypergradient(TRAIN, (XV, YV))["init.weight"]
    K = A + lam * torch.eye(D, dtype=torch.float64)
    theta = torch.linalg.solve(K, X.T @ Y / N + lam * theta0)
    want = lam * torch.linalg.solve(K, XV.T @ (XV @ theta - YV) / M)
    torch.testing.assert_close(got.reshape(-1, 1), want, rtol=1e-10, atol=1e-12)
    assert torch.equal(model.weight.detach().reshape(-1, 1), theta0)     # nothing of the user's moved


def test_imaml_against_a_hand_written_unroll() -> None:
    """The same regularised inner loop as plain autograd, create_graph through every step
    from θ₀ (a leaf): its derivative tends to the implicit one as the loop converges."""
    lam, lr, steps = 1.0, 0.2, 600
    model = copy.deepcopy(NET)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    meta = gimli.MetaParams(init=model)
    loss = lambda m, b, meta: F.mse_loss(m(b[0]), b[1])     # noqa: E731
    solver = gimli.GimliSolver(model, loss, opt, meta, mode="implicit",
                               implicit=gimli.Implicit(method="dense", proximal=lam))
    got = solver.hypergradient([(XS, YS)] * steps, (XSV, YSV))
    assert solver.last_implicit is not None and solver.last_implicit.gradient_norm < 1e-10

    names = [n for n, _ in NET.named_parameters()]
    theta0 = [p.detach().clone().requires_grad_(True) for p in NET.parameters()]
    theta = list(theta0)
    for _ in range(steps):
        params = dict(zip(names, theta))
        inner = loss(lambda x: torch.func.functional_call(NET, params, (x,)), (XS, YS), None) \
            + lam / 2 * sum(((t - t0) ** 2).sum() for t, t0 in zip(theta, theta0))
        grads = torch.autograd.grad(inner, theta, create_graph=True)
        theta = [t - lr * g for t, g in zip(theta, grads)]
    val = F.mse_loss(torch.func.functional_call(NET, dict(zip(names, theta)), (XSV,)), YSV)
    want = torch.autograd.grad(val, theta0)
    for name, w in zip(names, want):
        torch.testing.assert_close(got[f"init.{name}"], w, rtol=1e-8, atol=1e-10)


def test_meta_batch_and_step() -> None:
    solver, _ = ridge_solver(gimli.Implicit(method="dense"))
    tasks = [(TRAIN, (XV[:15], YV[:15])), (TRAIN, (XV[15:], YV[15:]))]
    got = solver.hypergradient(tasks=tasks)["loss.log_c"]
    each = [solver.hypergradient(t, v)["loss.log_c"] for t, v in tasks]
    torch.testing.assert_close(got, (each[0] + each[1]) / 2, rtol=1e-12, atol=1e-14)
    solver.meta_opt = torch.optim.SGD(solver.meta.parameters(), lr=0.1)
    solver._check_meta_opt()
    before = solver.meta.loss.log_c.detach().clone()
    solver.step(TRAIN, (XV, YV))
    torch.testing.assert_close(solver.meta.loss.log_c.detach(), before - 0.1 * ridge_closed_form(before))


def test_refusals() -> None:
    model = nn.Linear(D, 1, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no implicit hypergradient"):
        gimli.GimliSolver(model, ridge_loss, opt, gimli.MetaParams(opt, {"lr": "scalar"}), mode="implicit")
    with pytest.raises(ValueError, match="proximal"):
        gimli.GimliSolver(model, squared_error, opt, gimli.MetaParams(init=model), mode="implicit")
    meta = gimli.MetaParams(loss={"log_c": LOG_C.clone()})
    with pytest.raises(ValueError, match="needs MetaParams.init=model"):
        gimli.GimliSolver(model, ridge_loss, opt, meta, mode="implicit", implicit=gimli.Implicit(proximal=1.0))
    with pytest.raises(ValueError, match="give mode='implicit'"):
        gimli.GimliSolver(model, ridge_loss, opt, meta, implicit=gimli.Implicit())
    with pytest.raises(ValueError, match="do not apply"):
        gimli.GimliSolver(model, ridge_loss, opt, meta, mode="implicit", memory="recompute")
    with pytest.raises(ValueError, match="method must be one of"):
        gimli.Implicit(method="lbfgs")
    with pytest.raises(ValueError, match="needs method='neumann'"):
        gimli.Implicit(step=0.1)
    solver, _ = ridge_solver(gimli.Implicit())
    with pytest.raises(ValueError, match="check the same setup with mode='reverse'"):
        gimli.check(solver, TRAIN[:3], (XV, YV))


def test_cg_on_an_indefinite_hessian_says_what_to_do() -> None:
    """A concave direction: ℓ = −½‖Xθ‖²/N + ... run for few steps (no minimum): CG's
    curvature test fails with the remedy."""
    model = nn.Linear(D, 1, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    meta = gimli.MetaParams(loss={"log_c": torch.full((D,), -6.0, dtype=torch.float64)})

    def concave(m: Any, batch: Any, meta: Any) -> torch.Tensor:
        return -ridge_loss(m, batch, meta) + 0.5 * (m.weight ** 4).sum()

    solver = gimli.GimliSolver(model, concave, opt, meta, val_loss_fn=squared_error, mode="implicit")
    with pytest.raises(ValueError, match="not positive definite.*damping"):
        solver.hypergradient(TRAIN[:3], (XV, YV))


def test_minres_solves_an_indefinite_symmetric_system() -> None:
    """MINRES against torch.linalg.solve on a random symmetric matrix with eigenvalues of
    both signs (CG's assumption fails there)."""
    from gimli._implicit import _minres
    gen = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    eigen = torch.cat([torch.linspace(-3.0, -0.5, 10), torch.linspace(0.5, 4.0, 20)]).double()
    A = Q @ torch.diag(eigen) @ Q.T
    b = torch.randn(30, generator=gen, dtype=torch.float64)
    x, products = _minres(lambda v: A @ v, b, gimli.Implicit(method="minres", iterations=200, tol=1e-13),
                          float(b.norm()))
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-11)
    assert products <= 60


def test_commit_writes_the_inner_loops_end() -> None:
    """commit=True after an implicit hypergradient leaves the model where the real
    training loop leaves it (the unroll ran the optimizer's J steps)."""
    solver, lr = ridge_solver(gimli.Implicit(method="dense"))
    model = solver.problem.module
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=lr)
    for _ in range(50):
        opt.zero_grad()
        ridge_loss(reference, (X, Y), {"log_c": LOG_C}).backward()
        opt.step()
    solver.hypergradient(TRAIN[:50], (XV, YV), commit=True)
    torch.testing.assert_close(model.weight, reference.weight, rtol=1e-12, atol=1e-14)
    assert not torch.equal(model.weight, copy.deepcopy(START_WEIGHT))


START_WEIGHT = ridge_solver(gimli.Implicit())[0].problem.module.weight.detach().clone()
