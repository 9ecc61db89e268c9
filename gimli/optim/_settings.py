"""Typical settings of every built-in optimizer: the one table of them.

torch.optim class name (and ``LearnedOptimizer``) → constructor keyword arguments
with every option that keeps a hyperparameter in play switched on (momentum,
dampening, weight decay, AMSGrad, centring, ...) and every clamp and floor in force
somewhere (Rprop's step-size bounds, Adafactor's ε₁, ε₂ and d, Muon's ε). The
``gimli check`` zoo (``gimli/_check.py``) runs each optimizer at these settings, and
the tests' one-problem-per-optimizer set-ups (``tests/setups.py``,
``tests/test_capabilities.py``) use them.

Adding an optimizer: its rule file in ``gimli/optim/``, its proof, one row below and
its row of random settings in ``tests/optim_db.py`` (a test fails while either row is
missing). A row for an optimizer this torch lacks is used only where the class exists.
"""

from __future__ import annotations

from typing import Any

TYPICAL: dict[str, dict[str, Any]] = {
    "SGD": dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "Adam": dict(lr=0.02, eps=1e-3, weight_decay=0.01, amsgrad=True),
    "AdamW": dict(lr=0.02, eps=1e-3, weight_decay=0.01),
    "Adagrad": dict(lr=0.05, lr_decay=0.1, weight_decay=0.01, eps=1e-3),
    "RMSprop": dict(lr=0.01, alpha=0.9, eps=1e-3, weight_decay=0.01, momentum=0.5, centered=True),
    "Adadelta": dict(lr=0.5, rho=0.8, eps=1e-3, weight_decay=0.01),
    "Adamax": dict(lr=0.02, eps=1e-3, weight_decay=0.01),
    "NAdam": dict(lr=0.02, eps=1e-3, weight_decay=0.01, momentum_decay=5e-3),
    # β₂ = 0.9: the rectification (ρ_t > 5) is on from step 6 (with β₂ ≤ 2/3 it never is)
    "RAdam": dict(lr=0.02, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.01),
    "Rprop": dict(lr=0.01, step_sizes=(0.004, 0.011)),
    "ASGD": dict(lr=0.02, lambd=1e-3, t0=1.5, weight_decay=0.01),     # averaging within a few steps
    "Adafactor": dict(lr=0.02, eps=(0.3, 1.0), d=1.0, weight_decay=0.01),
    # momentum on (0.95 by default); eps = 1 clamps the norm: in force
    "Muon": dict(lr=0.02, weight_decay=0.01, eps=1.0),
    "LearnedOptimizer": dict(lr=0.05, beta=0.9),
}
