"""scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes), as tensors.

The data set ships inside scikit-learn (no download): ``pip install -e ".[examples]"``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor


class Digits(NamedTuple):
    x: Tensor       # (N, 1, 8, 8), pixel values scaled to [0, 1]
    y: Tensor       # (N,), class labels 0…9


def load(dtype: torch.dtype = torch.float32) -> Digits:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("this example needs scikit-learn's digits: pip install -e '.[examples]'") from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=dtype).unsqueeze(1) / 16.0
    return Digits(x, torch.tensor(data.target, dtype=torch.long))


def split(data: Digits, fractions: tuple[float, ...], seed: int = 0) -> list[Digits]:
    """A seeded random partition into parts of the given fractions (the last takes the rest)."""
    order = torch.randperm(len(data.y), generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for k, f in enumerate(fractions):
        end = len(order) if k == len(fractions) - 1 else start + round(f * len(order))
        idx = order[start:end]
        parts.append(Digits(data.x[idx], data.y[idx]))
        start = end
    return parts


def batches(data: Digits, size: int, gen: torch.Generator, *, indices: bool = False) -> list[Any]:
    """One epoch of shuffled minibatches (the last, short one dropped): ``(x, y)``, or with
    ``indices`` ``(x, y, idx)``, idx the examples' positions in ``data``."""
    order = torch.randperm(len(data.y), generator=gen)
    out = []
    for i in range(0, len(order) - size + 1, size):
        idx = order[i:i + size]
        out.append((data.x[idx], data.y[idx], idx) if indices else (data.x[idx], data.y[idx]))
    return out
