"""examples/reweighting.py runs in quick mode and its learned weights find the corrupted
labels.

Oracle: which training labels the example itself corrupted (known, not learned), the
weights' AUC as a detector of clean labels computed from them, and test accuracy with
plain torch; the figure is checked as a PNG file.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from test_examples import load

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_reweighting_quick(tmp_path: Path) -> None:
    example = load("reweighting")
    out = example.main(["--quick", "--out", str(tmp_path)])
    data = (tmp_path / "reweighting.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    weights, bad = out["weights"], out["corrupted"]
    assert weights.shape == bad.shape and 0.2 < bad.float().mean().item() < 0.6
    assert torch.isfinite(weights).all() and ((weights > 0) & (weights < 1)).all()
    scores = out["scores"]
    # after three epochs the corrupted examples already weigh less than the clean ones
    assert scores["mean weight, corrupted"] < scores["mean weight, clean"] - 0.1
    assert scores["AUC (clean vs corrupted)"] > 0.65
    # the AUC the example reports is the Mann–Whitney statistic of its own weights
    pos, neg = weights[~bad], weights[bad]
    direct = ((pos[:, None] > neg[None, :]).double().mean()
              + 0.5 * (pos[:, None] == neg[None, :]).double().mean()).item()
    assert math.isclose(scores["AUC (clean vs corrupted)"], direct, rel_tol=1e-12)
    assert all(0.5 < a <= 1.0 for a in out["accuracy"].values())
