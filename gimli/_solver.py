"""GimliSolver: Algorithm 1 end to end, the one stateful object."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ._meta import MetaParams
from ._problem import GimliWarning, LossFn, Problem, ValLossFn
from ._schedule import Schedule, rebase
from ._sweep import Sweep, sweep
from ._unroll import Point, Unroll


class StepResult(NamedTuple):
    """What :meth:`GimliSolver.step` reports about the meta-step it took."""

    val_loss: float                         # L^val(θ'_J) before the meta-update
    train_losses: list[float]               # ℓ_j(θ'_j), j = 0 … J−1
    hypergradient_norms: dict[str, float]   # ‖∇_φ L^val‖ per meta-parameter
    skipped: bool = False                   # on_nonfinite="skip" and the result was not finite


class _Saved(NamedTuple):
    """What a meta-step may change, copied, so that a failed step can be undone."""

    meta: list[Tensor]
    grads: list[Tensor | None]
    meta_opt: dict[str, Any] | None
    groups: list[dict[str, Any]]
    scheduler: dict[str, Any] | None
    model: dict[str, Tensor] | None             # with commit: the model's weights and buffers
    inner_state: dict[Any, Any] | None          # and the optimizer's state

    @classmethod
    def take(cls, solver: GimliSolver, commit: bool = False) -> _Saved:
        params = list(solver.meta.parameters())
        opt = solver.problem.inner.torch_optimizer
        scheduler = solver.problem.scheduler
        module = solver.problem.module
        return cls([p.detach().clone() for p in params],
                   [None if p.grad is None else p.grad.clone() for p in params],
                   None if solver.meta_opt is None else copy.deepcopy(solver.meta_opt.state_dict()),
                   [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
                   None if scheduler is None else copy.deepcopy(scheduler.state_dict()),
                   {k: v.clone() for k, v in module.state_dict(keep_vars=True).items()} if commit else None,
                   {p: copy.deepcopy(s) for p, s in opt.state.items()} if commit else None)

    def restore(self, solver: GimliSolver) -> None:
        with torch.no_grad():
            for p, value, grad in zip(solver.meta.parameters(), self.meta, self.grads):
                p.copy_(value)
                p.grad = grad
        if solver.meta_opt is not None and self.meta_opt is not None:
            solver.meta_opt.load_state_dict(copy.deepcopy(self.meta_opt))
        opt = solver.problem.inner.torch_optimizer
        for group, saved in zip(opt.param_groups, self.groups):
            group.update(saved)
        if self.scheduler is not None:
            solver.problem.scheduler.load_state_dict(self.scheduler)
        if self.model is not None and self.inner_state is not None:
            with torch.no_grad():
                for name, t in solver.problem.module.state_dict(keep_vars=True).items():
                    t.copy_(self.model[name])
            opt.state.clear()
            opt.state.update(self.inner_state)


class GimliSolver:
    """Exact hypergradients through J steps of the user's own ``torch.optim`` optimizer.

    Args:
        model: the user's ``nn.Module``; never modified by an unroll.
        loss_fn: ``loss_fn(model, batch, meta) -> scalar``, step j's training loss ℓ_j;
            ``model`` is a :class:`FunctionalModel` at θ'_j, ``meta[name]`` reads φ^loss.
        opt: the inner ``torch.optim`` optimizer over the model's parameters (any of
            ``gimli.optim.capabilities()``, or one registered with
            :func:`register_optimizer`); its param groups and current state are the start.
        meta_params: the :class:`MetaParams` declaring what is meta-learned.
        val_loss_fn: ``val_loss_fn(model, batch) -> scalar``, L^val; default ``loss_fn``.
        meta_opt: a ``torch.optim`` optimizer over ``meta_params.parameters()``, used by
            :meth:`step` (Algorithm 1, line 16).
        steps: J, the unroll length; default: as many as training batches given.
        train_data, val_data: iterables of batches, drawn from when :meth:`step` or
            :meth:`hypergradient` get none (re-iterated when exhausted).
        scheduler: the optimizer's ``torch.optim.lr_scheduler``, if any: step j of an
            unroll uses the hyperparameters it would set, and a meta-learned lr is its
            base lr. An unroll never advances it; :meth:`step` re-bases it.
        memory: ``"retain"`` keeps every G_j's graph from the forward pass (fastest for
            short unrolls); ``"recompute"`` keeps only θ'_j and the optimizer state per
            step and rebuilds one step's graph at a time; ``"budget"`` keeps at most
            ``snapshots`` of them and recomputes the rest on the optimal (revolve)
            schedule. All three give the same, exact hypergradient.
        first_order: drop the Hessian term h_j (first-order MAML); the optimizer
            hyperparameters' and loss parameters' terms a_j and m_j stay exact.
        truncate: sweep only the last K steps (B_{J−K} is not propagated further).
        distributed: average hypergradients over the ranks of ``torch.distributed``
            (each rank unrolls its own tasks; the joined hypergradients are
            all-reduced before the meta-update, so every rank applies the same one).
            ``None`` (default): when a process group is initialized; ``False``: never.
        process_group: the group to average over (default: the whole world).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, opt: torch.optim.Optimizer,
                 meta_params: MetaParams, *, val_loss_fn: ValLossFn | None = None,
                 meta_opt: torch.optim.Optimizer | None = None, steps: int | None = None,
                 train_data: Iterable[Any] | None = None, val_data: Iterable[Any] | None = None,
                 scheduler: Any = None, memory: str = "retain", snapshots: int | None = None,
                 first_order: bool = False, truncate: int | None = None,
                 distributed: bool | None = None, process_group: Any = None):
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if steps is None and train_data is not None:
            raise ValueError("give steps= when training batches come from train_data")
        if memory not in ("retain", "recompute", "budget"):
            raise ValueError(f"memory must be 'retain', 'recompute' or 'budget', not {memory!r}")
        if (memory == "budget") != (snapshots is not None):
            raise ValueError("memory='budget' needs snapshots= (how many points may be held "
                             "at once, the starting one included), and only it takes one")
        if snapshots is not None and (not isinstance(snapshots, int) or snapshots < 1):
            raise ValueError(f"snapshots must be an int ≥ 1, got {snapshots!r}")
        if truncate is not None and (not isinstance(truncate, int) or truncate < 1):
            raise ValueError(f"truncate must be an int ≥ 1, got {truncate!r}")
        self.distributed, self.process_group = distributed, process_group
        self.memory, self.snapshots = memory, snapshots
        self.first_order, self.truncate = first_order, truncate
        self.last_forward_steps = 0     # optimizer steps the last unroll evaluated
        self.problem = Problem.build(model, loss_fn, opt, meta_params, val_loss_fn, scheduler)
        self.meta = meta_params
        self.meta_opt = meta_opt
        self.steps = steps
        self._train_data = None if train_data is None else _Stream(train_data)
        self._val_data = None if val_data is None else _Stream(val_data)
        self.meta_steps = 0             # meta-updates taken by step()
        self._warned: set[str] = set()

    def hypergradient(self, train_batches: Iterable[Any] | None = None,
                      val_batch: Any = None, *, tasks: Iterable[tuple[Any, Any]] | None = None,
                      commit: bool = False) -> dict[str, Tensor]:
        """∇_φ L^val(θ'_J) for every meta-parameter, keyed by its name in
        ``meta_params.named_parameters()``. Changes nothing of the user's, unless
        ``commit`` (see :meth:`step`).

        ``tasks``: a meta-batch of ``(train_batches, val_batch)`` pairs instead; the
        hypergradients are averaged, one task's unroll held at a time. Under
        ``torch.distributed`` (see the class), the average runs over every rank's tasks.
        """
        self._check_commit(commit, tasks)
        grads, result = self._gradients(train_batches, val_batch, tasks)
        if commit:
            saved = _Saved.take(self, commit=True)
            try:
                self._commit(result)
            except BaseException:
                saved.restore(self)
                raise
        return grads

    def step(self, train_batches: Iterable[Any] | None = None, val_batch: Any = None, *,
             tasks: Iterable[tuple[Any, Any]] | None = None, on_nonfinite: str = "raise",
             commit: bool = False) -> StepResult:
        """One meta-update: the hypergradient, then ``meta_opt.step()`` (line 16), then
        scalar and per-group hyperparameters written back into the optimizer (and, with
        a scheduler, the scheduler re-based on the learned base lr).

        All or nothing: if anything fails, or a hypergradient or an updated
        meta-parameter is not finite, the model, the optimizer (param groups and
        state), the scheduler, the meta-parameters (and their ``.grad``) and the
        meta-optimizer's state are left bit-identical to before the call, and the
        error is raised; with ``on_nonfinite="skip"`` a non-finite result is instead
        reported by a warning and a :class:`StepResult` with ``skipped=True``.

        ``tasks``: a meta-batch, as for :meth:`hypergradient`; the result's losses are
        then averaged over the tasks.

        ``commit=True`` then writes the unroll's end into the user's objects (online
        hyperparameter learning: the base training continues from the unrolled
        weights): θ'_J into the model's parameters, the optimizer state σ_J into
        ``opt.state``, the buffers (BatchNorm running statistics) into the model, and
        the scheduler, if any, advanced J steps. By default they are discarded.
        """
        if self.meta_opt is None:
            raise ValueError("step() needs a meta-optimizer: pass meta_opt= to GimliSolver "
                             "(hypergradient() needs none)")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', not {on_nonfinite!r}")
        self._check_commit(commit, tasks)
        saved = _Saved.take(self, commit)
        try:
            grads, result = self._gradients(train_batches, val_batch, tasks)
            bad = [name for name, g in grads.items() if not bool(torch.isfinite(g).all())]
            if not bad:
                self.meta_opt.zero_grad()
                for name, p in self.meta.named_parameters():
                    p.grad = grads[name]
                self.meta_opt.step()                                    # line 16
                bad = [f"{name} (after the meta-update)" for name, p in self.meta.named_parameters()
                       if not bool(torch.isfinite(p).all())]
            if bad:
                saved.restore(self)
                message = (f"non-finite hypergradient or meta-parameter: {', '.join(bad)}; "
                           f"nothing was changed")
                if on_nonfinite == "raise":
                    raise FloatingPointError(message)
                warnings.warn(f"GimliSolver.step skipped: {message}", RuntimeWarning, stacklevel=2)
                return StepResult(result.val_loss, result.train_losses, _norms(grads), True)
            self.meta.write_back()
            if result.schedule is not None and self.meta.granularity.get("lr") in ("scalar", "group"):
                lr = self.meta.hyper("lr").detach()
                bases = [float(lr if lr.dim() == 0 else lr[g]) for g in range(len(self.problem.inner.groups))]
                rebase(self.problem.scheduler, self.problem.inner, bases, result.schedule)
            if commit:
                self._commit(result)
        except BaseException:
            saved.restore(self)
            raise
        self.meta_steps += 1
        return StepResult(result.val_loss, result.train_losses, _norms(grads))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume meta-training, for ``torch.save``: the
        meta-parameters, the meta-optimizer's state, the hyperparameters written into
        the optimizer's param groups, the scheduler, the number of meta-steps, and the
        position in ``train_data``/``val_data``. The model's weights and the inner
        optimizer's state are the user's, saved as usual (with ``init=``, the
        meta-parameters are the model's weights and are saved here too)."""
        opt = self.problem.inner.torch_optimizer
        return {
            "meta": self.meta.state_dict(),
            "meta_opt": None if self.meta_opt is None else self.meta_opt.state_dict(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "scheduler": None if self.problem.scheduler is None else self.problem.scheduler.state_dict(),
            "meta_steps": self.meta_steps,
            "data": {name: None if stream is None else stream.position()
                     for name, stream in (("train", self._train_data), ("val", self._val_data))},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the following hypergradients and meta-steps
        are bit-identical to those of the run that saved it (given the same model
        weights, optimizer state and data, and the same random-number state where the
        model draws random numbers)."""
        if (self.meta_opt is None) != (state["meta_opt"] is None):
            raise ValueError("the saved solver had " + ("no " if state["meta_opt"] is None else "a ")
                             + "meta-optimizer and this one " + ("has" if self.meta_opt else "has none"))
        groups = self.problem.inner.torch_optimizer.param_groups
        if len(groups) != len(state["param_groups"]):
            raise ValueError(f"the saved optimizer had {len(state['param_groups'])} param groups, "
                             f"this one {len(groups)}")
        self.meta.load_state_dict(state["meta"])
        if self.meta_opt is not None:
            self.meta_opt.load_state_dict(state["meta_opt"])
        for group, saved in zip(groups, state["param_groups"]):
            group.update(copy.deepcopy(saved))
        if self.problem.scheduler is not None and state["scheduler"] is not None:
            self.problem.scheduler.load_state_dict(state["scheduler"])
        self.meta_steps = state["meta_steps"]
        for stream, position in ((self._train_data, state["data"]["train"]),
                                 (self._val_data, state["data"]["val"])):
            if stream is not None and position is not None:
                stream.seek(position)

    def _check_commit(self, commit: bool, tasks: Any = None) -> None:
        if commit and (tasks is not None or self._group() is not None):
            raise ValueError("commit=True writes one unroll's end into the model: not with a "
                             "meta-batch of tasks or across processes")
        if commit and self.meta.init is not None:
            raise ValueError("commit=True would overwrite the model's weights, which are the "
                             "meta-learned initial weights θ₀ (init=): it is for online learning "
                             "of hyperparameters or loss parameters")

    def _commit(self, result: _Result) -> None:
        """θ'_J, σ_J and the buffers into the user's model and optimizer; the scheduler J steps on."""
        problem, final = self.problem, result.final
        inner = problem.inner
        opt = inner.torch_optimizer
        untouched = [not opt.state.get(p) and torch.equal(p.detach(), t)    # no state, never stepped
                     for p, t in zip(inner.params, final.theta)]
        with torch.no_grad():
            for p, t in zip(inner.params, final.theta):
                p.copy_(t)
            buffers = dict(problem.module.named_buffers())
            for name, b in final.buffers.items():
                buffers[name].copy_(b)
        for i, p in enumerate(inner.params):
            if not untouched[i]:
                opt.state[p] = inner.write_state(final.state, i)
        if problem.scheduler is not None:
            with warnings.catch_warnings():     # "scheduler.step() before optimizer.step()"
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(len(result.train_losses)):
                    problem.scheduler.step()

    def _batches(self, train_batches: Iterable[Any] | None, val_batch: Any) -> tuple[list[Any], Any]:
        """The J training batches and the validation batch a call will use."""
        if train_batches is None:
            if self._train_data is None:
                raise ValueError("no training batches: pass train_batches or give train_data=")
            taken = self._train_data.take(self.steps or 0)
        else:
            taken = list(itertools.islice(train_batches, self.steps)) if self.steps else list(train_batches)
        if not taken or (self.steps is not None and len(taken) < self.steps):
            raise ValueError(f"need {self.steps or 'at least 1'} training batches for the unroll, "
                             f"got {len(taken)}")
        if val_batch is None:
            if self._val_data is None:
                raise ValueError("no validation batch: pass val_batch or give val_data=")
            (val_batch,) = self._val_data.take(1)
        return taken, val_batch

    def _gradients(self, train_batches: Iterable[Any] | None, val_batch: Any,
                   tasks: Iterable[tuple[Any, Any]] | None) -> tuple[dict[str, Tensor], _Result]:
        """One task's hypergradient, or the mean over a meta-batch (and over every rank's
        tasks when distributed): summed one task at a time, all-reduced, divided."""
        if tasks is None:
            pairs = None
        else:
            if train_batches is not None or val_batch is not None:
                raise ValueError("give either tasks= or train_batches/val_batch, not both")
            pairs = list(tasks)
            if not pairs:
                raise ValueError("tasks= holds no task")
        group = self._group()
        if pairs is None and group is None:
            return self._compute(*self._batches(train_batches, val_batch))
        total: dict[str, Tensor] = {}
        results = []
        for train, val in pairs if pairs is not None else [(train_batches, val_batch)]:
            grads, result = self._compute(*self._batches(train, val))
            total = grads if not total else {k: total[k] + g for k, g in grads.items()}
            results.append(result)
        count, val_sum = float(len(results)), sum(r.val_loss for r in results)
        if group is not None:
            total, count, val_sum = _all_reduce(total, count, val_sum, group)
        steps = zip(*(r.train_losses for r in results))
        mean = _Result(val_sum / count, [sum(ls) / len(results) for ls in steps],
                       results[-1].schedule, results[-1].final)
        return {k: g / count for k, g in total.items()}, mean

    def _group(self) -> Any:
        """The torch.distributed process group the hypergradients are averaged over, or None."""
        if self.distributed is False:
            return None
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            if self.distributed:
                raise RuntimeError("distributed=True, but no torch.distributed process group is "
                                   "initialized (torch.distributed.init_process_group)")
            return None
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def check_replicas(self) -> None:
        """Raise if the meta-parameters differ between ranks: two all-reduces of them, the
        elementwise maximum and minimum over the ranks, must both equal this rank's
        values. A no-op outside torch.distributed."""
        group = self._group()
        if group is None:
            return
        flat = torch.cat([p.detach().reshape(-1).double() for p in self.meta.parameters()])
        high, low = flat.clone(), flat.clone()
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX, group=group)
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN, group=group)
        if not (torch.equal(high, flat) and torch.equal(low, flat)):
            raise RuntimeError("the meta-parameters differ between ranks")

    def _compute(self, train_batches: Sequence[Any], val_batch: Any) -> tuple[dict[str, Tensor], Any]:
        problem = self.problem
        with torch.enable_grad():                                   # also under torch.no_grad()
            split = problem.split(len(train_batches))                             # line 2
            _, learned, phi_loss, schedule = split
            run = Unroll(problem, split.per_step(len(train_batches)), train_batches, memory=self.memory,     # lines 3–7
                         snapshots=self.snapshots, truncate=self.truncate,
                         graph=not self.first_order or bool(phi_loss))
            if self.truncate is not None and self.truncate < len(train_batches) \
                    and self.meta.init is not None and "init" not in self._warned:
                self._warned.add("init")
                warnings.warn(f"truncate={self.truncate} < J = {len(train_batches)} cuts every path "
                              f"from θ₀ (init=) to L^val: its hypergradient is identically 0",
                              GimliWarning, stacklevel=3)
            result: Sweep = sweep(problem, run, learned, phi_loss, schedule, val_batch,
                                  first_order=self.first_order)                # lines 8–15
            self._warn_unreached(phi_loss, result.reached)
            grads = self._join(result, phi_loss)                                   # line 16
        self.last_forward_steps = run.forward_steps
        return grads, _Result(result.val_loss, run.train_losses, schedule, result.final)

    def _warn_unreached(self, leaves: list[Tensor], reached: list[bool]) -> None:
        """A φ^loss entry that reaches no G_j and not L^val gets a hypergradient of 0:
        Requirement IIIb is not met (said once per entry)."""
        names = {id(p): n for n, p in self.meta.named_parameters()}
        for leaf, ok in zip(leaves, reached):
            name = names.get(id(leaf), "")
            if ok or not name.startswith("loss.") or name in self._warned:
                continue
            self._warned.add(name)
            warnings.warn(f"{name} reaches no gradient G_j = ∇_θ ℓ_j of the unroll and not L^val, so "
                          f"its hypergradient is identically 0 (Requirement IIIb of the paper: G_j must "
                          f"depend on φ^loss). Does loss_fn read meta[...] for it, and not only "
                          f"additively (a term without θ has no gradient in θ)?", GimliWarning,
                          stacklevel=4)

    def _join(self, result: Sweep, phi_loss: list[Tensor]) -> dict[str, Tensor]:
        """Line 16's join(A^opt, A^loss), plus B₀ for θ₀, keyed by meta-parameter name."""
        meta, problem = self.meta, self.problem
        by_tensor: dict[int, Tensor] = {}
        for name in meta.granularity:                               # per-tensor a_j → φ^opt's shape
            (g,) = torch.autograd.grad(meta.expand(name), meta.hyper(name),
                                       grad_outputs=result.A_opt[name])
            by_tensor[id(meta.hyper(name))] = g
        for leaf, g in zip(phi_loss, result.A_loss):
            by_tensor[id(leaf)] = g
        if meta.init is not None:
            for p, g in zip(problem.inner.params, result.B0):
                by_tensor[id(p)] = g
        return {name: by_tensor[id(p)] for name, p in meta.named_parameters()}


class _Result(NamedTuple):
    val_loss: float
    train_losses: list[float]
    schedule: Schedule | None
    final: Point


def _norms(grads: dict[str, Tensor]) -> dict[str, float]:
    return {name: g.norm().item() for name, g in grads.items()}


def _all_reduce(total: dict[str, Tensor], count: float, val_sum: float,
                group: Any) -> tuple[dict[str, Tensor], float, float]:
    """Sum the joined hypergradients, the task count and the validation losses over the
    ranks, in one flat all-reduce (line 16's join is linear, so summing it is exact)."""
    values = list(total.values())
    dtype = values[0].dtype if len({v.dtype for v in values}) == 1 else torch.float64
    flat = torch.cat([v.reshape(-1).to(dtype) for v in values]
                     + [torch.tensor([count, val_sum], dtype=dtype, device=values[0].device)])
    torch.distributed.all_reduce(flat, group=group)
    out, start = {}, 0
    for (name, v) in total.items():
        out[name] = flat[start:start + v.numel()].view_as(v).to(v.dtype)
        start += v.numel()
    return out, float(flat[start]), float(flat[start + 1])


class _Stream:
    """Batches drawn from an iterable, starting it over when it runs out; its position
    (passes started, items drawn in this pass) is saved and restored by state_dict."""

    def __init__(self, data: Iterable[Any]):
        self.data = data
        self.epoch, self.index = 0, 0
        self._it: Iterator[Any] | None = None

    def take(self, k: int) -> list[Any]:
        out: list[Any] = []
        restarted = False
        while len(out) < k:
            if self._it is None:
                self._it, self.index = iter(self.data), 0
            try:
                out.append(next(self._it))
                self.index += 1
                restarted = False
            except StopIteration:
                if restarted:
                    raise ValueError("train_data/val_data yields no batches") from None
                self._it, restarted = None, True
                self.epoch += 1
        return out

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, position: dict[str, int]) -> None:
        """Re-iterate the data and skip to the position: exact for data that iterate the
        same way each pass (lists, loaders with a seeded sampler)."""
        self._it, self.index, self.epoch = None, 0, position["epoch"]
        if position["index"]:
            self._it = iter(self.data)
            for _ in range(position["index"]):
                next(self._it)
            self.index = position["index"]
