"""What the examples share besides gimli: where their outputs go, one intra-op thread,
progress lines, and matplotlib when it is there.

An example needs only what ``pip install -e .`` installs (torch, opt_einsum, numpy), and
the digits examples scikit-learn too (``_digits.py``). tqdm and matplotlib are optional:
without tqdm, progress is printed as plain lines; without matplotlib, no figure is drawn
and one line says how to get it.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

import torch

# Where the examples write by default: git ignores it, so a run leaves the checkout clean.
# The committed figures (from the full runs) are in docs/figures/.
OUTPUT = Path(__file__).resolve().parent / "output"

T = TypeVar("T")


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread while an example runs. Their models are tiny, so
    more threads only wait on each other, and on a loaded machine a great deal: the
    main demo took 24 min with torch's default threads on a busy 2-core machine, 29 s
    with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pyplot() -> ModuleType | None:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (and a line saying how
    to get it) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print('no figure: matplotlib is not installed (pip install matplotlib, or '
              'pip install -e ".[examples]" for every example\'s extras)')
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def peak_mb_in_child(build: Callable[[], Callable[[], Any]]) -> float | None:
    """The peak memory of one call, in MB above the RSS just before it: ``build()`` makes
    the call (and warms it up) in a forked child, whose peak RSS (Linux's VmHWM, reset
    first, and freed heap pages returned to the system) is read around it, so no earlier
    run's freed memory hides it. None where there is no fork or no /proc (not Linux)."""
    if not hasattr(os, "fork") or not os.path.exists("/proc/self/clear_refs"):
        return None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                        # the child: measure, write, leave
        os.close(read)
        try:
            call = build()
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)    # freed heap pages back: reuse shows
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                            # VmHWM ← the current RSS
            before = _status_kb("VmRSS")
            call()
            os.write(write, str((_status_kb("VmHWM") - before) / 1024).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return float(text) if text else None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def save(fig: Any, out: Path, name: str) -> Path:
    """Lay ``fig`` out, write it to ``out/name`` as a PNG, and close it."""
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt     # (save is called where pyplot() found it)
    plt.close(fig)
    return path


class Progress(Generic[T]):
    """A loop's progress: a tqdm bar where tqdm is installed and stderr is a terminal,
    else a plain line every tenth of the way, ``desc: n/total (elapsed) postfix``.

    The subset of tqdm's interface the examples use: iterate over it, or ``update()``
    it; ``set_postfix``/``set_postfix_str`` for a note on the bar or the next line.
    """

    def __init__(self, iterable: Iterable[T] | None = None, *, total: int | None = None,
                 desc: str = "", disable: bool = False) -> None:
        if total is None:
            assert iterable is not None and hasattr(iterable, "__len__")
            total = len(iterable)
        self.iterable, self.total, self.desc, self.disable = iterable, total, desc, disable
        self.n = 0
        self.postfix = ""
        self.every = max(1, total // 10)
        self.start = time.perf_counter()
        self.bar: Any = None
        if not disable and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=desc)

    def __iter__(self) -> Iterator[T]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> Progress[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.disable and (self.n // self.every > before // self.every or self.n == self.total):
            note = f"  {self.postfix}" if self.postfix else ""
            print(f"{self.desc}: {self.n}/{self.total} ({time.perf_counter() - self.start:.0f} s){note}",
                  flush=True)

    def set_postfix_str(self, note: str) -> None:
        self.postfix = note
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)

    def set_postfix(self, notes: dict[str, Any]) -> None:
        self.set_postfix_str(", ".join(f"{k} {v}" for k, v in notes.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
