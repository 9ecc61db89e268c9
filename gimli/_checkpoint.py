"""A solver's checkpoint: what :meth:`GimliSolver.state_dict` holds, checked whole before
:meth:`GimliSolver.load_state_dict` loads any of it.

Everything in it is a tensor, a number, a string, or a list or dict of them, so
``torch.load(..., weights_only=True)`` (torch's default) reads it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ._forward import directions
from ._schedule import LR_KEYS, check_shadows, load_shadows, start_shadows
from ._transaction import Snapshot

if TYPE_CHECKING:
    from ._solver import GimliSolver

def save(solver: GimliSolver) -> dict[str, Any]:
    problem = solver.problem
    keys = _written_keys(solver)
    return {
        "meta": solver.meta.state_dict(),
        "meta_opt": None if solver.meta_opt is None else solver.meta_opt.state_dict(),
        "param_groups": [{k: g[k] for k in keys if k in g} for g in problem.inner.torch_optimizer.param_groups],
        "scheduler": None if problem.scheduler is None else problem.scheduler.state_dict(),
        "schedule": None if problem.shadows is None else problem.shadows.state_dict(),
        "meta_steps": solver.meta_steps,
        "data": {name: None if stream is None else stream.position()
                 for name, stream in (("train", solver.train_data), ("val", solver.val_data))},
        "horizon": solver._horizon.state_dict(),        # forward mode's carried tangents
    }


def load(solver: GimliSolver, state: dict[str, Any]) -> None:
    check(solver, state)
    problem = solver.problem
    streams = {}
    for stream, name in ((solver.train_data, "train"), (solver.val_data, "val")):
        if stream is not None and state["data"][name] is not None:
            streams[name] = stream.moved_to(state["data"][name])    # a new Stream: ours kept
    with Snapshot.take(solver):                  # undone if anything fails
        solver.meta.load_state_dict(state["meta"])
        if solver.meta_opt is not None:
            solver.meta_opt.load_state_dict(copy.deepcopy(state["meta_opt"]))
        for group, values in zip(problem.inner.torch_optimizer.param_groups, state["param_groups"]):
            group.update(copy.deepcopy(values))
        if problem.scheduler is not None and state["scheduler"] is not None:
            problem.scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))
        shadows = problem.shadows
        if shadows is not None:         # an older checkpoint has none: start them anew
            if state.get("schedule") is None:
                shadows.restore(start_shadows(problem.scheduler, problem.inner).snapshot())
            else:
                load_shadows(shadows, state["schedule"], problem.scheduler, problem.inner)
        solver._horizon.load_state_dict(state.get("horizon"), type(problem.inner.read_state()))
    solver.train_data = streams.get("train", solver.train_data)
    solver.val_data = streams.get("val", solver.val_data)
    solver.meta_steps = state["meta_steps"]


def check(solver: GimliSolver, state: Any) -> None:
    """Raise ``ValueError`` naming the entry of ``state`` that does not fit this solver."""
    if not isinstance(state, dict):
        raise ValueError(f"a solver state_dict is a dict, not {type(state).__name__}")
    missing = [k for k in ("meta", "meta_opt", "param_groups", "scheduler", "meta_steps", "data")
               if k not in state]
    if missing:
        raise ValueError(f"the state_dict has no {', '.join(repr(k) for k in missing)} entry: "
                         f"is it a GimliSolver.state_dict()?")
    ours = solver.meta.state_dict()
    theirs = state["meta"]
    if not isinstance(theirs, dict) or set(theirs) != set(ours):
        raise ValueError(f"state_dict['meta'] holds other meta-parameters "
                         f"({sorted(theirs) if isinstance(theirs, dict) else theirs!r}) than "
                         f"this solver's ({sorted(ours)})")
    for name, value in ours.items():
        if not isinstance(theirs[name], Tensor) or theirs[name].shape != value.shape:
            raise ValueError(f"state_dict['meta'][{name!r}] has shape "
                             f"{getattr(theirs[name], 'shape', None)}, this solver's {tuple(value.shape)}")
    if (solver.meta_opt is None) != (state["meta_opt"] is None):
        raise ValueError("state_dict['meta_opt']: the saved solver had "
                         + ("no " if state["meta_opt"] is None else "a ")
                         + "meta-optimizer and this one " + ("has" if solver.meta_opt else "has none"))
    if solver.meta_opt is not None:
        groups = state["meta_opt"].get("param_groups") if isinstance(state["meta_opt"], dict) else None
        if groups is None or [len(g["params"]) for g in groups] != \
                [len(g["params"]) for g in solver.meta_opt.param_groups]:
            raise ValueError("state_dict['meta_opt'] does not fit this meta-optimizer "
                             "(other param groups)")
    groups = solver.problem.inner.torch_optimizer.param_groups
    if not isinstance(state["param_groups"], list) or len(groups) != len(state["param_groups"]):
        n = len(state["param_groups"]) if isinstance(state["param_groups"], list) else "no"
        raise ValueError(f"state_dict['param_groups']: the saved optimizer had {n} param "
                         f"groups, this one {len(groups)}")
    if (solver.problem.scheduler is None) != (state["scheduler"] is None):
        raise ValueError("state_dict['scheduler']: the saved solver had "
                         + ("no " if state["scheduler"] is None else "a ")
                         + "scheduler and this one " + ("has" if solver.problem.scheduler else "has none"))
    if solver.problem.shadows is not None and state.get("schedule") is not None:
        check_shadows(state["schedule"], solver.problem.scheduler, solver.problem.inner)
    _check_horizon(solver, state.get("horizon"))
    if not isinstance(state["meta_steps"], int):
        raise ValueError(f"state_dict['meta_steps'] is not an int: {state['meta_steps']!r}")
    data = state["data"]
    if not isinstance(data, dict) or set(data) != {"train", "val"}:
        raise ValueError("state_dict['data'] must hold the 'train' and 'val' positions")
    for stream, name in ((solver.train_data, "train"), (solver.val_data, "val")):
        if stream is not None and data[name] is not None:
            try:
                stream.check(data[name])
            except ValueError as e:
                raise ValueError(f"state_dict['data'][{name!r}]: {e}") from None


def _check_horizon(solver: GimliSolver, horizon: Any) -> None:
    """The carried tangents of ``horizon="full"``: one (Z, Y) or None per direction."""
    if horizon is None:
        return
    if solver.horizon != "full":
        raise ValueError("state_dict['horizon'] holds carried tangents, but this solver does not "
                         "carry them (GimliSolver(mode='forward', horizon='full'))")
    problem = solver.problem
    count = len(directions(solver.meta, frozenset(solver.meta.granularity), problem.loss_leaves()))
    tangents = horizon.get("tangents") if isinstance(horizon, dict) else None
    if not isinstance(tangents, list) or len(tangents) != count \
            or not isinstance(horizon.get("fingerprint"), Tensor):
        raise ValueError(f"state_dict['horizon'] does not fit this solver: it needs {count} carried "
                         f"tangents and the weights' fingerprint")
    shapes = [p.shape for p in problem.inner.params]
    for t in tangents:
        if t is not None and [getattr(z, "shape", None) for z in t[0]] != shapes:
            raise ValueError("state_dict['horizon'] holds tangents of other parameter shapes than "
                             "this solver's model")


def _written_keys(solver: GimliSolver) -> list[str]:
    """The param-group entries gimli writes: learned hyperparameters and, with a
    scheduler, its learning-rate entries."""
    inner = solver.problem.inner
    keys = {rule.group_key(name)[0]
            for name in solver.meta.granularity if "." not in name for rule in inner.rules_for(name)}
    if solver.problem.scheduler is not None:
        keys |= set(LR_KEYS)                # what a re-base writes
    return sorted(keys)
