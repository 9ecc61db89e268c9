"""examples/implicit_convergence.py and examples/imaml_sine.py run in quick mode and show
what they claim.

Oracles: for the convergence example, its own reference (the implicit hypergradient of the
converged training, J = 3000, where ‖∇ℓ‖ is at rounding; tests/test_implicit.py checks
that reference against reverse mode over 1,600 steps) and the truncated hypergradient's
bias, which does not shrink with J; for iMAML, the query error of new tasks after
adaptation with the real ``torch.optim.SGD``, before and after meta-training.
"""

from __future__ import annotations

import math
from pathlib import Path

from test_examples import load


def test_implicit_convergence_quick(tmp_path: Path) -> None:
    out = load("implicit_convergence").main(["--quick", "--out", str(tmp_path)])
    errors, norms = out["errors"], out["gradient_norms"]
    assert all(math.isfinite(e) for values in errors.values() for e in values)
    # the training converges, and the unrolled and implicit errors fall with it
    assert norms == sorted(norms, reverse=True)
    assert errors["unrolled"][-1] < errors["unrolled"][0] / 10
    assert errors["implicit"][-1] < errors["implicit"][0] / 10
    # the truncated hypergradient stays biased: far from the converged one at every J
    assert min(errors["truncated"]) > 10 * errors["unrolled"][-1]
    assert [Path(f).parent for f in out["figures"]] == [tmp_path]


def test_imaml_sine_quick(tmp_path: Path) -> None:
    out = load("imaml_sine").main(["--quick", "--out", str(tmp_path)])
    for method in ("MAML", "iMAML"):
        score = out["scores"][method]
        assert score["after"] < score["before"], method       # meta-training helped new tasks
    assert [J for J, _, _ in out["costs"]["iMAML"]] == [10, 40]
    assert [Path(f).parent for f in out["figures"]] == [tmp_path]
