"""The ``gimli`` command line (also ``python -m gimli``).

    gimli demo [ARGS...]   the main demo, examples/maml_sine.py; ARGS are the demo's own
                           (``gimli demo --help`` lists them)
    gimli check            the verification zoo: every built-in optimizer × meta-parameter
                           kind against the full autograd unroll in float64
"""

from __future__ import annotations

import argparse
import runpy
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "examples" / "maml_sine.py"


def _demo(args: list[str]) -> int:
    """Every argument after ``demo`` goes to the demo's own parser, ``--help`` included
    (a leading ``--`` is dropped), so its usage reads ``gimli demo ...``."""
    if not DEMO.exists():
        print(f"gimli demo runs examples/maml_sine.py from gimli's source tree, which is not "
              f"next to this installation ({DEMO} is missing): clone the repository and "
              f"`pip install -e .` there", file=sys.stderr)
        return 2
    module = runpy.run_path(str(DEMO), run_name="gimli_demo")
    module["main"](args[1:] if args[:1] == ["--"] else args, prog="gimli demo")
    return 0


def _check(args: argparse.Namespace, rest: list[str]) -> int:
    from ._check import TOLERANCE, ZOO, run_zoo, table

    if rest:
        print(f"gimli check: unrecognised arguments {' '.join(rest)}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(ZOO))
        return 0
    optimizers = args.optimizers.split(",") if args.optimizers else None
    unknown = [o for o in optimizers or [] if o not in ZOO]
    if unknown:
        print(f"gimli check: unknown optimizer(s) {', '.join(unknown)}; see `gimli check --list`",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    progress = None if args.quiet else (lambda what: print(f"  {what} ...", file=sys.stderr))
    cases = run_zoo(optimizers, steps=args.steps, granularities=args.granularities.split(","),
                    progress=progress)
    print(table(cases))
    failed = [c for c in cases if not c.passed]
    print(f"\n{len(cases) - len(failed)} of {len(cases)} cases within {TOLERANCE:.0e} of the full "
          f"autograd unroll (float64, J = {args.steps}) in {time.perf_counter() - start:.1f} s: "
          + ("PASS" if not failed else "FAIL"))
    return 1 if failed else 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="gimli", description="Exact hypergradients through "
                                  "unrolled inner optimization (Algorithm 1 of Generalized Inner "
                                  "Loop Meta-Learning).")
    sub = top.add_subparsers(dest="command", required=True)
    # the demo parses its own arguments (main() hands it all of them, --help included,
    # before this parser runs); this entry only lists it in `gimli --help`
    sub.add_parser("demo", help="run the main demo: MAML on sine waves (gimli demo --help)",
                   add_help=False)
    check = sub.add_parser("check", help="verify every built-in optimizer against autograd",
                           description="The verification zoo: for every built-in optimizer and "
                           "granularity, gimli's hypergradient of every learnable hyperparameter "
                           "(φ^opt), an L2 coefficient (φ^loss) and the initial weights (θ₀) "
                           "against the full autograd unroll, in float64. Prints the max relative "
                           "error per kind and a verdict; exits 1 if any case fails.")
    check.add_argument("--optimizers", help="comma-separated zoo entries (default: all; see --list)")
    check.add_argument("--granularities", default="scalar,group,tensor,element",
                       help="comma-separated (default: all four)")
    check.add_argument("--steps", type=int, default=4, help="J, inner steps per case (default 4)")
    check.add_argument("--list", action="store_true", help="list the zoo's entries and exit")
    check.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    check.set_defaults(run=_check)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        return _demo(argv[1:])
    args, rest = parser().parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    code: int = args.run(args, rest)
    return code


if __name__ == "__main__":
    sys.exit(main())
