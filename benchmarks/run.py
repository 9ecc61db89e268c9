"""gimli's benchmark suite: hypergradient time and peak memory, side by side.

For each task (``tasks.py``) and unroll length J it measures, in one run:

* time: one plain training unroll of the same J steps with the real
  ``torch.optim`` (zero_grad/backward/step on a copy of the model) is the unit;
  one hypergradient by each of gimli's memory modes (retain, recompute, budget
  with ⌈√J⌉ snapshots), the full autograd unroll
  (``gimli.full_unroll_hypergradient``), ``higher`` and ``torchopt`` is
  reported as a multiple of it. float32, one thread, a warm-up call of every
  method, then a few repetitions with the methods interleaved (the order
  rotated); a ratio is the median over repetitions of the two calls' ratio in
  the same repetition, so that background load drifting between repetitions
  cancels;
* peak memory: each (task, J, method) in a fresh process (a child forked from
  this one before it has run anything, or ``--spawn``: a new interpreter, as
  ``--one`` runs it), as the growth of the peak RSS (VmHWM) over the RSS just
  before the measured call; the child first warms the method up on 2 steps,
  then resets VmHWM (/proc/self/clear_refs), and allocates large blocks with
  mmap (mallopt) so that freed tensors leave the RSS;
* agreement: each hypergradient against the autograd unroll's (or retain's,
  where the unroll's is not finite).

    python benchmarks/run.py                      # full run, ~10 min on 2 CPU cores
    python benchmarks/run.py --quick              # J = 5, 20 only, ~1–2 min
    python benchmarks/run.py --tasks cnn_adam --steps 40 --methods recompute,autograd
    python benchmarks/run.py --one cnn_adam 40 recompute   # one memory measurement, JSON
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from methods import METHODS, Unsupported, loss_hvp, missing, plain_step, prepare  # noqa: E402
from tasks import TASKS, Instance  # noqa: E402

HYPERGRADIENT_METHODS = METHODS[1:]     # everything but the plain unroll
MIB = 2.0 ** 20


# --- memory: one measurement in a fresh process ------------------------------------------
def _proc_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    """VmHWM ← current RSS (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _mmap_large_blocks() -> None:
    """Blocks ≥ 64 KiB straight from mmap, so a freed tensor leaves the RSS at once
    (glibc would otherwise keep it on its heap and raise its mmap threshold)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)     # M_MMAP_THRESHOLD (also stops its dynamic adjustment)
    libc.mallopt(-1, 128 * 1024)    # M_TRIM_THRESHOLD


def measure_memory(task: str, J: int, method: str) -> dict[str, Any]:
    """Peak RSS growth of one call of ``method`` on (task, J), in this (fresh) process.
    ``method`` "step" is one plain training step (the optimizer state already built),
    "hvp" one Hessian-vector product of the training loss by plain autograd."""
    _mmap_large_blocks()
    torch.set_num_threads(1)
    inst = TASKS[task].build(J)
    if method == "step":
        call: Callable[[], Any] = plain_step(inst)      # one step already taken: state exists
    elif method == "hvp":
        call = loss_hvp(inst)
        call()                                          # warm-up
    else:
        run = prepare(method, inst)
        run(inst.train[:2])                 # warm-up on 2 steps
        call = lambda: run(inst.train)  # noqa: E731
    return {"task": task, "J": J, "method": method, "peak_mb": peak_mb(call)}


def peak_mb(call: Callable[[], Any]) -> float:
    """The peak RSS growth of ``call()`` in MB, over the RSS just before it (in a process
    whose large blocks are mmapped: ``_mmap_large_blocks``)."""
    gc.collect()
    _reset_peak()
    before = _proc_kb("VmRSS")
    out = call()
    peak = _proc_kb("VmHWM")
    del out
    return (peak - before) * 1024 / MIB


def _forked(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a forked child; its JSON result comes back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                        # the child
        os.close(r)
        try:
            payload = json.dumps(fn(*args))
        except BaseException as e:                      # noqa: BLE001 — reported, not raised
            payload = json.dumps({"error": f"{type(e).__name__}: {e}"})
        with os.fdopen(w, "w") as out:
            out.write(payload)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"error": f"the child died (wait status {status}; out of memory?)"}
    return json.loads(data)


def _spawned(task: str, J: int, method: str) -> dict[str, Any]:
    """The same measurement in a new interpreter (``--one``)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", task, str(J), method]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


# --- time: the methods side by side in this process ----------------------------------------
def time_config(inst: Instance, methods: Sequence[str], reps: int | None,
                log: Callable[[str], None]) -> tuple[dict[str, list[float]], dict[str, float], float]:
    """Seconds per call of each method in each repetition, each hypergradient's relative
    difference from the reference, and the warm-up round's length."""
    runs = {m: prepare(m, inst) for m in methods}
    start = time.perf_counter()
    for m in methods:                                   # warm-up: one full call each
        runs[m](inst.train)
    warm = time.perf_counter() - start
    reps = reps or (7 if warm < 1.0 else 5 if warm < 5.0 else 3)
    times: dict[str, list[float]] = {m: [] for m in methods}
    outs: dict[str, torch.Tensor | None] = {}
    for r in range(reps):
        order = list(methods[r % len(methods):]) + list(methods[:r % len(methods)])
        for m in order:                                 # interleaved, the order rotated
            gc.collect()
            t0 = time.perf_counter()
            out = runs[m](inst.train)
            times[m].append(time.perf_counter() - t0)
            outs.setdefault(m, out)
        log(f"    rep {r + 1}/{reps}")
    return times, _agreement(outs), warm


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """t_a / t_b: the median over repetitions of the two calls' ratio in the same
    repetition, so that load drifting between repetitions cancels."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def _agreement(outs: dict[str, torch.Tensor | None]) -> dict[str, float]:
    """max |g − g_ref| / max |g_ref|, g_ref the autograd unroll's (retain's if not finite)."""
    ref = outs.get("autograd")
    if ref is None or not torch.isfinite(ref).all():
        ref = outs.get("retain")
    if ref is None:
        return {}
    scale = ref.abs().max().item()
    return {m: ((o - ref).abs().max().item() / scale) if torch.isfinite(o).all() else float("nan")
            for m, o in outs.items() if o is not None}


# --- the run -------------------------------------------------------------------------------
def side_benchmark(doc: str, quick: str) -> argparse.Namespace:
    """A side benchmark's command line (``--quick``, with ``quick`` its help) and preamble:
    one intra-op thread, and the machine's line."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=quick)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine())
    return args


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = [f"torch {torch.__version__}"]
    for lib in ("higher", "torchopt"):
        if missing(lib) is None:
            versions.append(f"{lib} {importlib.metadata.version(lib)}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{datetime.date.today().isoformat()} · {cpu}, {os.cpu_count()} logical CPUs · "
            f"{' · '.join(versions)} · Python {platform.python_version()} · "
            f"torch.get_num_threads() = {torch.get_num_threads()} · float32 · "
            f"load average at start {load}")


def plan(args: argparse.Namespace) -> list[tuple[str, list[int]]]:
    names = args.tasks.split(",") if args.tasks else list(TASKS)
    for n in names:
        if n not in TASKS:
            raise SystemExit(f"unknown task {n!r}; tasks: {', '.join(TASKS)}")
    out = []
    for n in names:
        steps = TASKS[n].quick_steps if args.quick else TASKS[n].steps
        if args.steps:
            steps = tuple(int(s) for s in args.steps.split(","))
        out.append((n, sorted(steps)))
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="J = 5 and 20 only (~1–2 min)")
    parser.add_argument("--tasks", help=f"comma-separated, from: {', '.join(TASKS)}")
    parser.add_argument("--steps", help="comma-separated J to run (default: each task's own list)")
    parser.add_argument("--methods", help=f"comma-separated, from: {', '.join(HYPERGRADIENT_METHODS)} "
                        "(the plain unroll always runs)")
    parser.add_argument("--reps", type=int, help="timed repetitions (default 7, 5 or 3 where "
                        "the warm-up round of all methods took < 1 s, < 5 s or longer)")
    parser.add_argument("--max-call", type=float, default=60.0, help="skip a method at a J where "
                        "its call, extrapolated from the previous J, would take longer (s)")
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--no-time", action="store_true", help="memory only")
    parser.add_argument("--spawn", action="store_true", help="memory in a new interpreter per "
                        "measurement instead of a forked child (slower, same numbers)")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--one", nargs=3, metavar=("TASK", "J", "METHOD"),
                        help="one memory measurement in this process; prints JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.one:
        task, J, method = args.one
        result = measure_memory(task, int(J), method)
        print(json.dumps(result))
        return result

    wanted = args.methods.split(",") if args.methods else list(HYPERGRADIENT_METHODS)
    for m in wanted:
        if m not in HYPERGRADIENT_METHODS:
            raise SystemExit(f"unknown method {m!r}; methods: {', '.join(HYPERGRADIENT_METHODS)}")
    notes = {m: why for m in wanted if (why := missing(m))}
    methods = ["plain"] + [m for m in wanted if m not in notes]
    for lib in ("higher", "torchopt"):                  # imported before forking: children share it
        if lib in methods:
            importlib.import_module(lib)
    importlib.import_module("torch._dynamo")            # torch.optim imports it lazily (seconds)
    gc.collect()
    gc.freeze()         # what is loaded so far stays out of every later collection (and COW-free)
    todo = plan(args)
    header = machine()
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    log(header)
    results: dict[str, Any] = {"machine": header, "notes": notes, "tasks": {}}
    # 1. memory first, while this process has run nothing (each child starts from it)
    memory: dict[tuple[str, int, str], dict[str, Any]] = {}
    if not args.no_memory:
        if args.spawn:
            for task, steps in todo:
                for J in steps:
                    for m in methods:
                        memory[task, J, m] = _spawned(task, J, m)
                for m in ("step", "hvp"):
                    memory[task, 0, m] = _spawned(task, steps[0], m)
                log(f"memory {task} done")
        else:
            try:
                _reset_peak()
            except OSError as e:
                raise SystemExit(f"peak memory needs a writable /proc/self/clear_refs ({e}); "
                                 f"use --no-memory") from None
            for task, steps in todo:
                for J in steps:
                    for m in methods:
                        memory[task, J, m] = _forked(measure_memory, task, J, m)
                for m in ("step", "hvp"):
                    memory[task, 0, m] = _forked(measure_memory, task, steps[0], m)
                log(f"memory {task} done")
    # 2. time, in this process
    timing: dict[tuple[str, int], dict[str, Any]] = {}
    if not args.no_time:
        for task, steps in todo:
            previous: dict[str, tuple[int, float]] = {}
            for J in steps:
                inst = TASKS[task].build(J)
                run_now, skipped = [], {}
                for m in methods:
                    est = previous[m][1] * J / previous[m][0] if m in previous else 0.0
                    err = memory.get((task, J, m), {}).get("error")
                    try:
                        prepare(m, inst)
                    except Unsupported as e:
                        skipped[m] = f"cannot express this task: {e}"
                        continue
                    if err:
                        skipped[m] = f"failed in the memory run: {err}"
                    elif est > args.max_call:
                        skipped[m] = f"skipped: ~{est:.0f} s per call extrapolated (> --max-call)"
                    else:
                        run_now.append(m)
                log(f"time {task} J={J}: {', '.join(run_now)}")
                times, agree, warm = time_config(inst, run_now, args.reps, log)
                previous.update({m: (J, statistics.median(t)) for m, t in times.items()})
                timing[task, J] = {"seconds": times, "agreement": agree, "skipped": skipped}
    elapsed = time.perf_counter() - t_start
    results["elapsed_s"] = elapsed
    report = render(todo, methods, notes, memory, timing, header, elapsed, results)
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


# --- tables --------------------------------------------------------------------------------
COLUMNS = ("retain", "recompute", "budget", "compiled", "autograd", "higher", "torchopt")
TITLES = {"retain": "retain", "recompute": "recompute", "budget": "budget (⌈√J⌉)",
          "compiled": "retain, compiled", "autograd": "autograd unroll", "higher": "higher",
          "torchopt": "torchopt"}
MLP_TASKS = ("maml_sine", "adam_lrs", "l2_momentum")


def _sizes(task: str) -> tuple[float, float]:
    """|θ| and |σ| in MiB (float32)."""
    inst = TASKS[task].build(1)
    theta = sum(p.numel() for p in inst.model.parameters()) * 4 / MIB
    return theta, theta * inst.state_factor()


def render(todo: list[tuple[str, list[int]]], methods: list[str], notes: dict[str, str],
           memory: dict[tuple[str, int, str], dict[str, Any]],
           timing: dict[tuple[str, int], dict[str, Any]], header: str, elapsed: float,
           results: dict[str, Any]) -> str:
    lines = [f"Machine: {header}", ""]
    for m, why in notes.items():
        lines.append(f"- {m}: not run: {why}")
    lines.append("")
    keys = ["t0retain", "t0compiled", "t1retain", "t1compiled", "tpretain", "tpcompiled",
            "t2", "t3", "m1", "m2"]
    checks: dict[str, list[str]] = {k: [] for k in keys}
    verdict: dict[str, bool] = dict.fromkeys(keys, True)
    for task, steps in todo:
        t = TASKS[task]
        theta_mb, state_mb = _sizes(task)
        raw: dict[str, Any] = {"theta_mb": theta_mb, "state_mb": state_mb, "J": {}}
        results["tasks"][task] = raw
        lines += [f"### {task}: {t.summary}", ""]
        if timing:
            lines += ["Time: one plain training unroll's median seconds, and each hypergradient as "
                      "× it (the median over repetitions of the ratio of the two calls in the same "
                      "repetition).", "",
                      "| J | plain unroll (s) | " + " | ".join(f"{TITLES[c]} ×" for c in COLUMNS) + " |",
                      "|---:|---:|" + "---:|" * len(COLUMNS)]
            for J in steps:
                cfg = timing.get((task, J))
                if cfg is None:
                    continue
                sec, skipped = cfg["seconds"], cfg["skipped"]
                raw["J"].setdefault(J, {})["time"] = cfg
                unit = statistics.median(sec["plain"])
                cells = []
                for c in COLUMNS:
                    if c in sec:
                        cells.append(f"{ratio(sec, c, 'plain'):.2f}")
                    elif c in skipped:
                        cells.append("skip¹")
                    else:
                        cells.append("n/a")
                lines.append(f"| {J} | {unit:.3f} | " + " | ".join(cells) + " |")
                for fast in ("retain", "compiled"):
                    if {fast, "autograd"} <= sec.keys() and J >= 20:
                        r = ratio(sec, fast, "autograd")
                        key = "t0" if task == "adam_lrs" else "t1"
                        verdict[key + fast] &= r <= (0.75 if task == "adam_lrs" else 1.0)
                        checks[key + fast].append(f"{task} J={J}: {r:.2f}")
                        if task == "adam_lrs":      # adam_lrs also counts for ≤ 1.0
                            verdict["t1" + fast] &= r <= 1.0
                        peers = [p for p in ("higher", "torchopt") if p in sec]
                        if peers:
                            rs = ", ".join(f"{ratio(sec, fast, p):.2f}× {p}" for p in peers)
                            verdict["tp" + fast] &= all(ratio(sec, fast, p) < 1.0 for p in peers)
                            checks["tp" + fast].append(f"{task} J={J}: {rs}")
                if {"retain", "recompute"} <= sec.keys() and task in MLP_TASKS and J >= 20:
                    r = ratio(sec, "recompute", "retain")
                    verdict["t2"] &= r <= 1.3
                    checks["t2"].append(f"{task} J={J}: {r:.2f}")
                if {"retain", "budget"} <= sec.keys() and J >= 20:
                    r = ratio(sec, "budget", "retain")
                    verdict["t3"] &= r <= 1.6
                    checks["t3"].append(f"{task} J={J}: {r:.2f}")
            agree = [(J, timing[task, J]["agreement"]) for J in steps if (task, J) in timing]
            lines += ["", "Hypergradient check, max |g − g_ref| / max |g_ref| (g_ref: the autograd "
                      "unroll's; retain's where the unroll's is not finite):", "",
                      "| J | " + " | ".join(TITLES[c] for c in COLUMNS) + " |",
                      "|---:|" + "---:|" * len(COLUMNS)]
            for J, a in agree:
                lines.append(f"| {J} | " + " | ".join(_fmt_err(a.get(c)) for c in COLUMNS) + " |")
            skips = [f"J={J} {m}: {why}" for J in steps if (task, J) in timing
                     for m, why in timing[task, J]["skipped"].items()]
            if skips:
                lines += ["", "¹ " + "; ".join(skips)]
            lines.append("")
        if memory:
            step = memory.get((task, 0, "step"), {}).get("peak_mb", float("nan"))
            hvp = memory.get((task, 0, "hvp"), {}).get("peak_mb", float("nan"))
            raw["step_peak_mb"], raw["hvp_peak_mb"] = step, hvp
            lines += [f"Peak memory, MB above the RSS before the call (× the autograd unroll's). "
                      f"|θ| = {theta_mb:.3f} MB, |σ| = {state_mb:.3f} MB; one plain training "
                      f"step's peak = {step:.2f} MB; one Hessian-vector product of the training "
                      f"loss by plain autograd (the least an exact sweep step can hold) peaks at "
                      f"{hvp:.2f} MB; bound = 1.1·J·(|θ|+|σ|) + that HVP's peak.", "",
                      "| J | plain unroll | " + " | ".join(TITLES[c] for c in COLUMNS) + " | bound |",
                      "|---:|---:|" + "---:|" * len(COLUMNS) + "---:|"]
            for J in steps:
                got = {m: memory.get((task, J, m), {}) for m in methods}
                raw["J"].setdefault(J, {})["memory"] = got
                ag = got.get("autograd", {}).get("peak_mb")
                bound = 1.1 * J * (theta_mb + state_mb) + hvp
                cells = [_fmt_mem(got.get("plain"), None)]
                cells += [_fmt_mem(got.get(c), ag) if c in got else "n/a" for c in COLUMNS]
                lines.append(f"| {J} | " + " | ".join(cells) + f" | {bound:.2f} |")
                rc = got.get("recompute", {}).get("peak_mb")
                if rc is not None:
                    verdict["m1"] &= rc <= bound
                    checks["m1"].append(f"{task} J={J}: {rc:.2f} vs {bound:.2f} MB")
                if task == "cnn_adam" and J == 40 and rc is not None and ag is not None:
                    bg = got.get("budget", {}).get("peak_mb")
                    verdict["m2"] &= ag / rc >= 5
                    checks["m2"].append(f"recompute {ag / rc:.1f}× less"
                                        + (f", budget {ag / bg:.1f}× less" if bg else ""))
            errors = [f"J={J} {m}: {memory[task, J, m]['error']}" for J in steps for m in methods
                      if "error" in memory.get((task, J, m), {})]
            if errors:
                lines += ["", "Memory runs that failed: " + "; ".join(errors)]
            lines.append("")
    lines += ["### Targets", ""]
    targets = [("t0retain", "adam_lrs, J ≥ 20: retain ≤ 0.75 × the autograd unroll (retain / autograd)"),
               ("t0compiled", "adam_lrs, J ≥ 20: retain, compiled ≤ 0.75 × the autograd unroll"),
               ("t1retain", "every task, J ≥ 20: retain ≤ 1.0 × the autograd unroll"),
               ("t1compiled", "every task, J ≥ 20: retain, compiled ≤ 1.0 × the autograd unroll"),
               ("tpretain", "every task, J ≥ 20: retain faster than higher and torchopt"),
               ("tpcompiled", "every task, J ≥ 20: retain, compiled faster than higher and torchopt"),
               ("t2", "MLP tasks, J ≥ 20: recompute ≤ 1.3 × retain (recompute / retain)"),
               ("t3", "every task, J ≥ 20: budget ≤ 1.6 × retain (budget / retain)"),
               ("m1", "recompute peak memory ≤ 1.1·J·(|θ|+|σ|) + one plain autograd HVP's peak"),
               ("m2", "cnn_adam, J = 40: ≥ 5 × less peak memory than the autograd unroll")]
    for key, text in targets:
        if checks[key]:
            mark = "met" if verdict[key] else "NOT met"
            lines.append(f"- **{mark}**: {text}: {'; '.join(checks[key])}")
        else:
            lines.append(f"- not measured in this run: {text}")
    results["targets"] = {k: {"met": verdict[k], "detail": checks[k]} for k, _ in targets if checks[k]}
    lines += ["", f"Total run time: {elapsed / 60:.1f} min."]
    return "\n".join(lines)


def _fmt_err(x: float | None) -> str:
    if x is None:
        return "n/a"
    return "NaN" if x != x else f"{x:.1e}"


def _fmt_mem(entry: dict[str, Any] | None, autograd: float | None) -> str:
    if not entry:
        return "n/a"
    if "error" in entry:
        return "failed"
    mb = entry["peak_mb"]
    if autograd is not None and autograd >= 0.1:       # (below that, the ratio is noise)
        return f"{mb:.2f} ({mb / autograd:.2f})"
    return f"{mb:.2f}"


if __name__ == "__main__":
    main()
