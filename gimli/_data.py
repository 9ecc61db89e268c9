"""Batches the solver draws itself (``train_data=``, ``val_data=``): where a run is,
how a failed step gives its batches back, and how a resumed run finds its place.

A :class:`Stream` starts the iterable over when a pass runs out. Its position is
(passes started, batches drawn in this pass) plus the random-number state each pass
started from: a shuffling ``DataLoader`` draws its permutation (and its workers'
seeds) from torch's global generator, or from its own ``generator=``, when a pass
starts, so replaying that state on resume draws the same permutation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor


class Mark(NamedTuple):
    """Where a stream was before a step drew from it (see :meth:`Stream.rewind`)."""

    epoch: int
    drawn_in_pass: int
    drawn: int


_END = object()     # what _draw returns when a pass has run out


class Stream:
    """Batches drawn from an iterable, starting it over when it runs out."""

    def __init__(self, data: Iterable[Any], name: str):
        if not isinstance(data, Iterable):
            raise TypeError(f"{name} must be an iterable of batches (a list, a DataLoader), "
                            f"not {type(data).__name__}")
        self.data, self.name = data, name
        self.one_shot = isinstance(data, Iterator)     # a generator: cannot start over
        self.epoch, self.index = 0, 0
        self._it: Iterator[Any] | None = None
        self._given_back: deque[tuple[Any, int, int]] = deque()    # (batch, epoch, index after)
        self._log: list[tuple[Any, int, int]] = []
        self._started: dict[int, dict[str, Tensor]] = {}     # pass → the random state it began with
        self._queued: deque[dict[str, Tensor]] = deque()     # states the next passes start from

    @property
    def pass_rng(self) -> dict[str, Tensor] | None:
        """The random state the current pass began with (None before the first)."""
        return self._started.get(self.epoch)

    # --- drawing ---------------------------------------------------------------------------
    def take(self, k: int) -> list[Any]:
        out = []
        for _ in range(k):
            if self._given_back:
                item = self._given_back.popleft()
                _, self.epoch, self.index = item
            else:
                item = (self._next(), self.epoch, self.index)
            self._log.append(item)
            out.append(item[0])
        return out

    def _next(self) -> Any:
        while True:
            if self._it is None:                # a pass starts: iter() and its first draw
                live = None
                if self._queued:                # (a resumed run: the state it first started from)
                    live = torch.get_rng_state()
                    _set_rng_states(self.data, self._queued[0])
                    self._started[self.epoch] = self._queued.popleft()
                else:
                    self._started[self.epoch] = _rng_states(self.data)
                try:
                    self._it, self.index = iter(self.data), 0
                    item = self._draw(self._it)
                finally:
                    if live is not None:
                        torch.set_rng_state(live)
            else:
                item = self._draw(self._it)
            if item is not _END:
                self.index += 1
                return item
            self._it = None
            if self.one_shot:
                raise ValueError(f"{self.name} is an iterator (a generator?) that has run out "
                                 f"after {self.index} batches; it cannot be started over: pass "
                                 f"a re-iterable (a list, a DataLoader) or an endless generator")
            if self.index == 0:
                raise ValueError(f"{self.name} yields no batches")
            self.epoch += 1

    @staticmethod
    def _draw(it: Iterator[Any]) -> Any:
        try:
            return next(it)
        except StopIteration:
            return _END

    # --- transactions ----------------------------------------------------------------------
    def mark(self) -> Mark:
        return Mark(self.epoch, self.index, len(self._log))

    def rewind(self, mark: Mark) -> None:
        """Give back the batches drawn since ``mark``: the next draws return them again, so
        a failed step consumes nothing."""
        taken = self._log[mark.drawn:]
        del self._log[mark.drawn:]
        self._given_back.extendleft(reversed(taken))
        self.epoch, self.index = mark.epoch, mark.drawn_in_pass

    def settle(self) -> None:
        """The step went through: forget what it drew."""
        self._log.clear()
        for epoch in [e for e in self._started if e < self.epoch]:
            del self._started[epoch]

    # --- resuming --------------------------------------------------------------------------
    def position(self) -> dict[str, Any]:
        """(passes started, batches drawn in this one), the random state this pass started
        from, and that of any later pass the iterator has already started (batches a
        failed step gave back may come from it)."""
        later = sorted(e for e in self._started if e > self.epoch)
        return {"epoch": self.epoch, "index": self.index,
                "rng": None if self.pass_rng is None else dict(self.pass_rng),
                "next_rngs": [dict(self._started[e]) for e in later] + [dict(s) for s in self._queued]}

    def check(self, position: Any) -> None:
        """Raise ``ValueError`` if ``position`` is not one :meth:`position` could give."""
        if not (isinstance(position, dict) and isinstance(position.get("epoch"), int)
                and isinstance(position.get("index"), int) and position["index"] >= 0):
            raise ValueError(f"{self.name}'s saved position is not a position: {position!r}")
        states = [position.get("rng")] + list(position.get("next_rngs") or [])
        if not all(s is None or (isinstance(s, dict) and "torch" in s and
                                 all(isinstance(v, Tensor) for v in s.values())) for s in states):
            raise ValueError(f"{self.name}'s saved random states are not dicts of tensors")

    def moved_to(self, position: dict[str, Any]) -> Stream:
        """A new stream over the same data, at ``position`` (see :meth:`seek`)."""
        stream = Stream(self.data, self.name)
        stream.seek(position)
        return stream

    def seek(self, position: dict[str, Any]) -> None:
        """Start a pass afresh and skip to ``position``. The pass is started from the random
        state it first started from, so a shuffling DataLoader deals the same permutation;
        torch's global random state is left as it was. Exact for data that draw random
        numbers only when a pass starts (lists, DataLoaders with or without shuffling)."""
        self.check(position)
        self._given_back.clear()
        self._log.clear()
        self._it, self.epoch, self.index = None, position["epoch"], 0
        rng = position.get("rng")
        self._queued = deque(position.get("next_rngs") or [])
        self._started = {} if rng is None else {self.epoch: rng}
        if not position["index"]:
            if rng is not None:
                self._queued.appendleft(rng)
            return
        now = torch.get_rng_state()
        try:
            if rng is not None:
                _set_rng_states(self.data, rng)
            it = iter(self.data)
            for drawn in range(position["index"]):
                try:
                    next(it)
                except StopIteration:
                    raise ValueError(f"{self.name} has {drawn} batches per pass, fewer than the "
                                     f"saved position ({position['index']}): is it the same "
                                     f"data?") from None
        finally:
            torch.set_rng_state(now)
        self._it, self.index = it, position["index"]


def _generators(data: Any) -> dict[str, torch.Generator]:
    """The torch generators a DataLoader draws its order from, by where they sit."""
    found: dict[str, torch.Generator] = {}
    for where in ("generator", "sampler.generator", "batch_sampler.sampler.generator"):
        obj = data
        for attr in where.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, torch.Generator) and all(obj is not g for g in found.values()):
            found[where] = obj
    return found


def _rng_states(data: Any) -> dict[str, Tensor]:
    states = {"torch": torch.get_rng_state()}
    states.update({name: g.get_state() for name, g in _generators(data).items()})
    return states


def _set_rng_states(data: Any, states: dict[str, Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    for name, g in _generators(data).items():
        if name in states:
            g.set_state(states[name])
