r"""Does ``torch.compile`` of an optimizer rule's step and VJP pay off on CPU?

    python benchmarks/compiled.py                      # ~5 min on 2 CPU cores
    python benchmarks/compiled.py --quick              # fewer timed calls, no float64 check at N = 10⁶
    python benchmarks/compiled.py --rules sgd --sizes 1,22000 --no-autotune

For Adam (amsgrad=False, maximize=False, decoupled=False, coupled weight decay 0.01)
and SGD (momentum 0.9, dampening 0.1, weight decay 0.01, no Nesterov), the rule's
``step`` and ``vjp`` (need = {"lr"}) run as the engine runs an elementwise rule: one
flat 1-D tensor per argument, N elements (1 761: a 1-40-40-1 MLP; 22 000: a
32-128-128-10 MLP; 10⁶; and the size-1 twin N = 1, which is nothing but per-op
overhead: Python, dispatch and, compiled, dynamo's guards). lr is a per-element
vector of size N (one lr per tensor, spread), the other hyperparameters shared 0-dim
tensors. float32, ``torch.set_num_threads(1)``, under ``torch.no_grad()``.

* **eager / compiled µs**: median over many single calls (each timed alone) of the
  rule function, and of ``torch.compile(fn, dynamic=False)`` of the same function
  after its first call.
* **compile s**: the first call of the compiled step plus that of the compiled vjp,
  with inductor's on-disk cache in a fresh directory (cold: what a first run pays),
  and, in brackets, the same after ``torch._dynamo.reset()`` with that cache filled
  (warm: what a later run with a persistent cache pays). The process's first
  compile also pays a one-time start-up (imports, compiler checks, worker pool);
  it is measured apart on a trivial function and *not* included.
* **break-even**: cold compile s / (eager − compiled) for one step + one vjp: the
  number of (step, vjp) pairs, i.e. unroll steps of one hypergradient's forward and
  backward pass, after which compiling has paid for itself ("never" if compiled is
  not faster).
* **max rel diff**: in float64 (compiled anew for float64), the largest
  max|compiled − eager| / max|eager| over θ', every State tensor, and every VJP output.

Timings: each function is timed in several rounds, the functions of one row in rotated
order within a round, and the smallest round median kept, so that other processes on the
same cores inflate the numbers as little as possible; the load average at the start is
printed. Compare within a row.

Adam's ``State.step`` is a Python int: dynamo specializes on it, so a step count that
changes every call recompiles every call, until ``recompile_limit`` (8), after which the
frame runs eagerly (``dynamic=False`` ignores ``automatic_dynamic_shapes``). The second
table calls each variant with State.step = 0, 1, …, 11 (N = 1 761) and counts the graphs
dynamo made: ``dynamic=False`` with the int; ``dynamic=None`` (automatic dynamic: static
at first, the int becomes a SymInt at its first change, one recompile); the step count as
a 0-dim int64 tensor passed through the *unchanged* library functions (``t = s.step + 1``
and ``1 - beta ** t`` accept a tensor); and an inline ``step_t`` with flat arguments and
the same math as adam.py's step. "steady µs" is a later call at a fixed step count, next
to the eager reference's time measured in the same rounds (the library function with an
int step count, as the engine calls it; for step_t, step_t itself); the float64 check
compares with that reference at step counts 0, 1, 7 and 1000. Last, Adam at N = 22 000 in the
default mode next to ``mode="max-autotune-no-cudagraphs"`` (each compiled with an empty
cache).

The tables above time the rule function alone, on arguments already joined. What
``GimliSolver(compile=True)`` compiles is that rule function, called on the call's
tensors laid end to end; the joining and splitting around it stay eager (θ'_j, σ_j and
the cotangents arrive laid out from the previous call, so only G_j is copied). The last
table times the whole call, ``InnerOptimizer.step`` + ``.vjp``, that way, eager and
compiled, on two six-tensor models with one learned lr per tensor, its inputs laid out
as the unroll and the sweep pass them on, and the unroll steps after which the (cold)
compile has paid for itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch._dynamo.utils import counters
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gimli.optim import adam, sgd  # noqa: E402

SIZES = (1, 1_761, 22_000, 1_000_000)
NEED = frozenset({"lr"})


# --- inputs ---------------------------------------------------------------------------------
def adam_inputs(n: int, dtype: torch.dtype, gen: torch.Generator, step: int = 5) -> dict[str, Any]:
    def r(scale: float = 1.0) -> Tensor:
        return torch.randn(n, generator=gen, dtype=dtype) * scale

    p, g = r(), r(0.1)
    state = adam.State(step, r(0.01), torch.rand(n, generator=gen, dtype=dtype) * 1e-4 + 1e-8, None)
    hp = {"lr": 1e-3 * (1 + 0.1 * torch.rand(n, generator=gen, dtype=dtype)),
          "beta1": torch.tensor(0.9, dtype=dtype), "beta2": torch.tensor(0.999, dtype=dtype),
          "eps": torch.tensor(1e-8, dtype=dtype), "weight_decay": torch.tensor(1e-2, dtype=dtype)}
    cot = adam.State(0, r(), r(), None)
    return {"p": p, "s": state, "g": g, "hp": hp, "P": r(), "S": cot}


def sgd_inputs(n: int, dtype: torch.dtype, gen: torch.Generator) -> dict[str, Any]:
    def r(scale: float = 1.0) -> Tensor:
        return torch.randn(n, generator=gen, dtype=dtype) * scale

    hp = {"lr": 1e-2 * (1 + 0.1 * torch.rand(n, generator=gen, dtype=dtype)),
          "momentum": torch.tensor(0.9, dtype=dtype), "dampening": torch.tensor(0.1, dtype=dtype),
          "weight_decay": torch.tensor(1e-2, dtype=dtype)}
    return {"p": r(), "s": sgd.State(r(0.1)), "g": r(0.1), "hp": hp, "P": r(), "S": sgd.State(r())}


RULES: dict[str, tuple[Any, Any, Callable[..., dict[str, Any]]]] = {
    "adam": (adam, adam.Flags(amsgrad=False, maximize=False, decoupled=False), adam_inputs),
    "sgd": (sgd, sgd.Flags(momentum=True, nesterov=False, maximize=False), sgd_inputs),
}


def rule_fns(mod: Any, flags: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The rule's step and vjp with the flags and need closed over (constants to dynamo).
    New function objects on every call, so that each torch.compile is its own."""
    def step(p: Tensor, s: Any, g: Tensor, hp: dict[str, Tensor]) -> Any:
        return mod.step(flags, p, s, g, hp)

    def vjp(p: Tensor, s: Any, g: Tensor, hp: dict[str, Tensor], P: Tensor, S: Any) -> Any:
        return mod.vjp(flags, p, s, g, hp, P, S, NEED)

    return step, vjp


def step_args(x: dict[str, Any]) -> tuple[Any, ...]:
    return x["p"], x["s"], x["g"], x["hp"]


def vjp_args(x: dict[str, Any]) -> tuple[Any, ...]:
    return x["p"], x["s"], x["g"], x["hp"], x["P"], x["S"]


# --- measuring ------------------------------------------------------------------------------
def per_call_us(fns: list[tuple[Callable[..., Any], tuple[Any, ...]]], budget_s: float,
                rounds: int, max_calls: int = 3000) -> list[float]:
    """µs per call of each (fn, args): in each of ``rounds`` rounds every fn (in rotated
    order) is called alone, repeatedly, for about ``budget_s / rounds`` seconds and the
    median single call kept; the result is each fn's smallest round median, so that
    other processes on the same cores (a test run) inflate it as little as possible."""
    best = [float("inf")] * len(fns)
    guesses = []
    for fn, args in fns:
        for _ in range(3):
            fn(*args)
        t0 = time.perf_counter()
        fn(*args)
        guesses.append(max(time.perf_counter() - t0, 1e-7))
    for r in range(rounds):
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            fn, args = fns[i]
            n = int(min(max(budget_s / rounds / guesses[i], 10), max_calls))
            times = []
            for _ in range(n):
                t = time.perf_counter_ns()
                fn(*args)
                times.append(time.perf_counter_ns() - t)
            best[i] = min(best[i], statistics.median(times) / 1e3)
    return best


def first_call_s(fn: Callable[..., Any], args: tuple[Any, ...]) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def tensors(x: Any) -> list[Tensor]:
    """Every tensor inside nested tuples / NamedTuples / dicts, in a fixed order."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in tensors(x[k])]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tensors(v)]
    return []


def rel_diff(a: Any, b: Any) -> float:
    ta = [t for t in tensors(a) if t.is_floating_point()]
    tb = [t for t in tensors(b) if t.is_floating_point()]
    assert len(ta) == len(tb) and ta, (len(ta), len(tb))
    worst = 0.0
    for x, y in zip(ta, tb):
        scale = y.abs().max().item()
        d = (x - y).abs().max().item()
        worst = max(worst, d / scale if scale > 0 else d)
    return worst


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def fmt_us(x: float) -> str:
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


# --- part 1: the table ----------------------------------------------------------------------
def table(name: str, sizes: tuple[int, ...], args: argparse.Namespace) -> None:
    mod, flags, make = RULES[name]
    rows = []
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        x = make(n, torch.float32, gen)
        eager_step, eager_vjp = rule_fns(mod, flags)
        c_step = torch.compile(rule_fns(mod, flags)[0], dynamic=False)
        c_vjp = torch.compile(rule_fns(mod, flags)[1], dynamic=False)
        g0 = graphs()
        cold = first_call_s(c_step, step_args(x)) + first_call_s(c_vjp, vjp_args(x))
        assert graphs() - g0 == 2, "expected one graph each for step and vjp"
        e_s, c_s, e_v, c_v = per_call_us(
            [(eager_step, step_args(x)), (c_step, step_args(x)),
             (eager_vjp, vjp_args(x)), (c_vjp, vjp_args(x))], 4 * args.budget, args.rounds)
        assert graphs() - g0 == 2, "a steady-state call recompiled"
        # warm: the same graphs again with inductor's cache filled
        torch._dynamo.reset()
        w_step = torch.compile(rule_fns(mod, flags)[0], dynamic=False)
        w_vjp = torch.compile(rule_fns(mod, flags)[1], dynamic=False)
        warm = first_call_s(w_step, step_args(x)) + first_call_s(w_vjp, vjp_args(x))
        # exactness, float64
        if args.quick and n > 100_000:
            diff = float("nan")
        else:
            x64 = make(n, torch.float64, torch.Generator().manual_seed(n))
            d_step, d_vjp = rule_fns(mod, flags)
            k_step = torch.compile(rule_fns(mod, flags)[0], dynamic=False)
            k_vjp = torch.compile(rule_fns(mod, flags)[1], dynamic=False)
            diff = max(rel_diff(k_step(*step_args(x64)), d_step(*step_args(x64))),
                       rel_diff(k_vjp(*vjp_args(x64)), d_vjp(*vjp_args(x64))))
        saved = (e_s + e_v - c_s - c_v) * 1e-6
        even = f"{cold / saved:,.0f}" if saved > 0 else "never"
        rows.append((f"{n:,}", fmt_us(e_s), fmt_us(c_s), fmt_us(e_v), fmt_us(c_v),
                     f"{cold:.2f} [{warm:.2f}]", even, f"{diff:.1e}"))
        torch._dynamo.reset()
    head = ("N", "eager step µs", "compiled step µs", "eager vjp µs", "compiled vjp µs",
            "compile s cold [warm]", "break-even (step+vjp)", "max rel diff f64")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    title = {"adam": "Adam (amsgrad=False, maximize=False, decoupled=False), State.step = 5",
             "sgd": "SGD (momentum 0.9, dampening 0.1, no Nesterov)"}[name]
    print(f"\n{title}")
    print("| " + " | ".join(h.rjust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
    sys.stdout.flush()


# --- last: the whole call, as GimliSolver(compile=True) runs it ------------------------------
def whole_call(args: argparse.Namespace) -> None:
    """InnerOptimizer.step and .vjp over a model's six tensors (join, the rule, split), eager
    and with compile=True (the rule compiled), θ, σ and the cotangents laid out as the
    unroll and the sweep pass them on."""
    from torch import nn

    from gimli.optim import bind
    rows = []
    for label, widths, act, opt_class, kw in [
            ("Adam, 32-128-128-10 MLP", (32, 128, 128, 10), nn.Tanh, torch.optim.Adam, dict(lr=1e-3)),
            ("SGD, 1-40-40-1 MLP", (1, 40, 40, 1), nn.ReLU, torch.optim.SGD, dict(lr=0.01))]:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), act()]
        params = list(nn.Sequential(*layers[:-1]).parameters())
        opt = opt_class([{"params": [p]} for p in params], **kw)       # one lr per tensor
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        inner = bind(opt)
        state = inner.read_state()
        hp = inner.constant_hypers()
        hp["lr"] = [torch.tensor(1e-3) for _ in params]                 # learned: one per tensor
        theta = [p.detach().clone() for p in params]
        grads = [torch.randn_like(p) for p in params]
        P = [torch.randn_like(p) for p in params]
        S = type(state)(*([torch.randn_like(x) if isinstance(x, Tensor) else x for x in field]
                          for field in state))
        theta, state = inner.step(theta, state, grads, hp)         # laid out, as passed on
        out = inner.vjp(theta, state, grads, hp, P, S, NEED)
        P, S = out.params, out.state

        def pair() -> None:
            inner.step(theta, state, grads, hp)
            inner.vjp(theta, state, grads, hp, P, S, NEED)

        inner.compile = False
        eager = per_call_us([(pair, ())], 2 * args.budget, args.rounds)[0]
        inner.compile = True
        t = time.perf_counter()
        pair()
        cold = time.perf_counter() - t
        fast = per_call_us([(pair, ())], 2 * args.budget, args.rounds)[0]
        saved = (eager - fast) * 1e-6
        rows.append((label, f"{sum(p.numel() for p in params):,}", fmt_us(eager), fmt_us(fast),
                     f"{cold:.1f}", f"{cold / saved:,.0f}" if saved > 0 else "never"))
        torch._dynamo.reset()
    head = ("model", "N", "eager step+vjp µs", "compiled step+vjp µs", "compile s (cold)",
            "break-even (unroll steps)")
    widths_ = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("\nThe whole call (InnerOptimizer.step + .vjp over six tensors, one lr per tensor), "
          "as GimliSolver(compile=True) runs it")
    print("| " + " | ".join(h.rjust(w) for h, w in zip(head, widths_)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths_) + "|")
    for r in rows:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths_)) + " |")
    sys.stdout.flush()


# --- part 2: Adam's step count --------------------------------------------------------------
def step_t(flags: adam.Flags, p: Tensor, m: Tensor, v: Tensor, g: Tensor, lr: Tensor,
           b1: Tensor, b2: Tensor, eps: Tensor, wd: Tensor, t: Tensor) -> tuple[Tensor, ...]:
    """adam.step (coupled decay, no amsgrad) with flat arguments and t = the step count
    *before* the step, a 0-dim tensor: (A1)–(A7), op for op as adam._forward/step."""
    g2 = (-g if flags.maximize else g) + wd * p                    # (A1)
    m1 = b1 * m + (1 - b1) * g2                                     # (A3)
    v1 = b2 * v + (1 - b2) * (g2 * g2)
    t1 = t + 1
    c1, c2 = 1 - b1 ** t1, 1 - b2 ** t1                             # (A5)
    r = v1.sqrt() / c2.sqrt()                                       # (A6)
    theta = p - (lr / c1) * m1 / (r + eps)                          # (A7)
    return theta, m1, v1, t1


def step_count(n: int, steps: int, budget: float, rounds: int) -> None:
    mod, flags, make = RULES["adam"]
    print(f"\nAdam's step count changing every call (N = {n:,}, float32, State.step = 0, 1, …, "
          f"{steps - 1}; recompile_limit = {torch._dynamo.config.recompile_limit})")
    head = ("variant", "graphs", "calls 1-3 s", f"calls 4-{steps} s", "steady µs",
            "eager µs", "max rel diff f64")
    rows = []

    def run(label: str, fn: Callable[..., Any], args_at: Callable[[int, torch.dtype], tuple[Any, ...]],
            eager: Callable[..., Any], eager_args_at: Callable[[int, torch.dtype], tuple[Any, ...]]) -> None:
        """``fn`` called with State.step = 0 … steps−1 (first calls timed one by one), then
        its steady per-call time at a fixed later step next to ``eager``'s, measured in
        the same rounds; then float64 against ``eager`` at four step counts."""
        torch._dynamo.reset()
        g0 = graphs()
        times = [first_call_s(fn, args_at(t, torch.float32)) for t in range(steps)]
        made = graphs() - g0
        later = steps + 7
        steady, ref = per_call_us([(fn, args_at(later, torch.float32)),
                                   (eager, eager_args_at(later, torch.float32))], 2 * budget, rounds)
        torch._dynamo.reset()               # below the recompile limit again: really compiled
        worst = 0.0
        for t in (0, 1, 7, 1000):
            worst = max(worst, rel_diff(fn(*args_at(t, torch.float64)),
                                        eager(*eager_args_at(t, torch.float64))))
        rows.append((label, str(made), f"{sum(times[:3]):.2f}", f"{sum(times[3:]):.2f}",
                     fmt_us(steady), fmt_us(ref), f"{worst:.1e}"))

    data = {dt: make(n, dt, torch.Generator().manual_seed(0)) for dt in (torch.float32, torch.float64)}

    def lib_args(t: int, dt: torch.dtype, tensor: bool = False) -> tuple[Any, ...]:
        x = data[dt]
        s = x["s"]._replace(step=torch.tensor(t, dtype=torch.int64) if tensor else t)
        return x["p"], s, x["g"], x["hp"]

    def vjp_lib_args(t: int, dt: torch.dtype, tensor: bool = False) -> tuple[Any, ...]:
        x = data[dt]
        return (*lib_args(t, dt, tensor), x["P"], x["S"])

    def flat_args(t: int, dt: torch.dtype) -> tuple[Any, ...]:
        x = data[dt]
        hp = x["hp"]
        return (x["p"], x["s"].exp_avg, x["s"].exp_avg_sq, x["g"], hp["lr"], hp["beta1"],
                hp["beta2"], hp["eps"], hp["weight_decay"], torch.tensor(t, dtype=torch.int64))

    eager_step, eager_vjp = rule_fns(mod, flags)

    def inline(*a: Any) -> Any:
        return step_t(flags, *a)[:3]        # t + 1 is no float output: left out of the check

    def t_tensor(f: Callable[..., tuple[Any, ...]]) -> Callable[[int, torch.dtype], tuple[Any, ...]]:
        return lambda t, dt: f(t, dt, True)

    # the step and the VJP, each: static shapes with an int t (recompiles per t), automatic
    # dynamic shapes with an int t, static shapes with t a 0-dim tensor
    for which, args, eager in (("step", lib_args, eager_step), ("vjp", vjp_lib_args, eager_vjp)):
        fn = rule_fns(mod, flags)[0 if which == "step" else 1]
        run(f"{which}, dynamic=False, int t", torch.compile(fn, dynamic=False), args, eager, args)
        run(f"{which}, dynamic=None (automatic), int t", torch.compile(fn), args, eager, args)
        run(f"{which}, dynamic=False, t a 0-dim tensor", torch.compile(fn, dynamic=False),
            t_tensor(args), eager, args)
    run("inline step_t, dynamic=False, tensor t", torch.compile(inline, dynamic=False),
        flat_args, inline, flat_args)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))) + " |")
    print("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |")
    sys.stdout.flush()


def autotune(n: int, budget: float, rounds: int) -> None:
    """Adam's step and vjp compiled in the default mode and in max-autotune-no-cudagraphs
    (which on CPU only adds GEMM/conv templates to choose among: these rules have none)."""
    mod, flags, make = RULES["adam"]
    x = make(n, torch.float32, torch.Generator().manual_seed(n))
    torch._dynamo.reset()
    out = []
    for mode in ("default", "max-autotune-no-cudagraphs"):
        step, vjp = rule_fns(mod, flags)
        c_step = torch.compile(step, dynamic=False, mode=mode)
        c_vjp = torch.compile(vjp, dynamic=False, mode=mode)
        with temporary_cache_dir(tempfile.mkdtemp(prefix="gimli-compiled-")):     # cold for each
            cold = first_call_s(c_step, step_args(x)) + first_call_s(c_vjp, vjp_args(x))
        out.append((mode, cold, c_step, c_vjp))
    us = per_call_us([(f, a(x)) for _, _, cs, cv in out for f, a in ((cs, step_args), (cv, vjp_args))],
                     4 * budget, rounds)
    print(f"\nAdam, N = {n:,}, compile mode (compile s for step + vjp, cold; step µs; vjp µs):")
    for k, (mode, cold, _, _) in enumerate(out):
        print(f"  {mode:27s} {cold:5.2f} s  {fmt_us(us[2 * k]):>7s} µs  {fmt_us(us[2 * k + 1]):>7s} µs")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timed calls; no float64 check at N = 10⁶")
    ap.add_argument("--no-autotune", action="store_true",
                    help="skip the mode='max-autotune-no-cudagraphs' comparison (Adam, N = 22 000)")
    ap.add_argument("--keep-cache", action="store_true",
                    help="use inductor's usual on-disk cache (default: a fresh one, cold compiles)")
    ap.add_argument("--rules", default="adam,sgd", help="comma-separated; '' for none")
    ap.add_argument("--sizes", default=",".join(str(n) for n in SIZES))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    args.budget = 0.2 if args.quick else 0.6        # seconds of timed calls per function
    args.rounds = 3 if args.quick else 6
    if not args.keep_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gimli-compiled-")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch._logging.set_logs(dynamo=logging.ERROR)  # the recompile_limit warning: counted below
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"inductor cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')}")

    t0 = time.perf_counter()
    warmup = torch.compile(lambda a, b: (a * b + 1).sqrt(), dynamic=False)
    warmup(torch.rand(3), torch.rand(3))
    print(f"process one-time start-up of the first compile (trivial function): "
          f"{time.perf_counter() - t0:.1f} s (not counted below)")
    torch._dynamo.reset()

    sizes = tuple(int(s) for s in args.sizes.split(","))
    rules = [r for r in args.rules.split(",") if r]
    for name in rules:
        table(name, sizes, args)
    if "adam" in rules:
        step_count(1_761, 12, args.budget, args.rounds)
    if not args.no_autotune:
        autotune(22_000, args.budget, args.rounds)
    whole_call(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
