"""GimliSolver: Algorithm 1 end to end, the one stateful object.

The mathematics lives elsewhere: the split and join in ``_meta.py``/``_problem.py``,
the unroll in ``_unroll.py``, the sweep in ``_sweep.py``. Around them: batches drawn
by the solver (``_data.py``), all-or-nothing steps and commits (``_transaction.py``),
and several processes (``_distributed.py``).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import _arguments, _checkpoint, _distributed
from ._clip import Clip, check_clip
from ._data import Stream
from ._distributed import Sums
from ._forward import Horizon, directions, forward_hypergradient
from ._implicit import Implicit, ImplicitReport, implicit_hypergradient
from ._implicit import why_not as _why_not_implicit
from ._meta import MetaParams
from ._problem import GimliInfo, GimliWarning, LossFn, NonFiniteError, Problem, ValLossFn
from ._schedule import Schedule, rebase
from ._sweep import Sweep, sweep
from ._transaction import Snapshot, commit as commit_unroll
from ._unroll import Point, Unroll


class Hypergradients(dict[str, Tensor]):
    """What :meth:`GimliSolver.hypergradient` returns: ∇_φ L^val per meta-parameter name
    (a dict), and the unroll's losses as :meth:`GimliSolver.step` reports them."""

    def __init__(self, grads: dict[str, Tensor], val_loss: float, train_losses: list[float]):
        super().__init__(grads)
        self.val_loss = val_loss                # L^val(θ'_J)
        self.train_losses = train_losses        # ℓ_j(θ'_j), j = 0 … J−1


class StepResult(NamedTuple):
    """What :meth:`GimliSolver.step` reports about the meta-step it took."""

    val_loss: float                         # L^val(θ'_J) before the meta-update
    train_losses: list[float]               # ℓ_j(θ'_j), j = 0 … J−1
    hypergradient_norms: dict[str, float]   # ‖∇_φ L^val‖ per meta-parameter
    skipped: bool = False                   # on_nonfinite="skip" and the result was not finite


class GimliSolver:
    """Exact hypergradients through J steps of the user's own ``torch.optim`` optimizer.

    Args:
        model: the user's ``nn.Module``; never modified by an unroll.
        loss_fn: ``loss_fn(model, batch, meta) -> scalar``, step j's training loss ℓ_j;
            ``model`` is a :class:`FunctionalModel` at θ'_j, ``meta[name]`` reads φ^loss.
        opt: the inner ``torch.optim`` optimizer over the model's parameters (any of
            ``gimli.optim.capabilities()``, or one registered with
            :func:`register_optimizer`); its param groups and current state are the start.
            Or a list of optimizers, each over its own tensors (Muon for the matrices and
            AdamW for the rest): each unroll step steps every tensor with the optimizer
            that holds it; ``meta_params`` must be built on the same list.
        meta_params: the :class:`MetaParams` declaring what is meta-learned.
        val_loss_fn: ``val_loss_fn(model, batch, meta)`` -> scalar, L^val, called as
            ``loss_fn`` is; default ``loss_fn``. (The older ``val_loss_fn(model, batch)``
            still works, with a DeprecationWarning.)
        clip: gradient clipping between each step's gradient and the optimizer, as a
            training loop calls it between ``backward()`` and ``opt.step()``:
            ``gimli.ClipGradNorm(max_norm, norm_type=2.0)`` (torch's
            ``clip_grad_norm_`` over the optimizer's tensors) or
            ``gimli.ClipGradValue(clip_value)``; the threshold may be a function of the
            meta-parameters, and is then meta-learned. Differentiated exactly (reverse
            mode).
        val_mode: ``"eval"``: L^val is evaluated with the module in eval mode (dropout
            off, BatchNorm on the running statistics the unroll reached), ``"train"``: in
            train mode; ``None`` (default): in the module's own mode. The module itself
            is not changed: ``val_loss_fn``'s ``model`` is a view in that mode.
        meta_opt: a ``torch.optim`` optimizer over ``meta_params.parameters()``, used by
            :meth:`step` (Algorithm 1, line 16).
        steps: J, the unroll length; default: as many as training batches given.
        train_data, val_data: iterables of batches, drawn from when :meth:`step` or
            :meth:`hypergradient` get none (re-iterated when exhausted).
        scheduler: the optimizer's ``torch.optim.lr_scheduler``, if any: step j of an
            unroll uses the hyperparameters it would set, and a meta-learned lr is its
            base lr. An unroll never advances it; :meth:`step` re-bases it. With several
            optimizers: a list with one scheduler per optimizer (``None`` for one without),
            or a single scheduler, matched to the optimizer it drives.
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
            all-reduced before the meta-update, so every rank applies the same one,
            and when a rank fails every rank fails or skips the step with it).
            ``None`` (default): when a process group is initialized; ``False``: never.
        process_group: the group to average over (default: the whole world).
        mode: ``"reverse"`` (Algorithm 1: the sweep back over the unroll) or
            ``"forward"``: the tangents dθ'_j/dφ and dσ_j/dφ carried forward with the
            unroll, one per element of the learned hyperparameters and φ^loss entries, so
            memory does not grow with J (for few hyperparameters: scalar, group or tensor
            granularity; not θ₀ or per-element ones). The same hypergradient to rounding.
            ``"auto"``: forward mode where it holds fewer tangents than reverse mode holds
            points (fewer directions than swept steps, or ``horizon="full"``), else
            reverse; it says which (:class:`GimliInfo`, once per solver and choice) and
            records it in ``solver.last_mode``.
        horizon: forward mode only. ``"window"`` (default): each hypergradient is that of
            its own J steps, as in reverse mode. ``"full"``: the tangents carry over from
            one ``commit=True`` call to the next, so the hypergradient is that of the
            validation loss after all the training committed so far (online, real-time
            hyperparameter learning with no truncation); :meth:`reset_horizon` restarts it.
        implicit: ``mode="implicit"``: how the linear system is solved, a
            :class:`Implicit` (default ``Implicit()``: conjugate gradients). The inner loop
            runs the J steps with the optimizer (no graph kept) and is taken to have
            converged: the hypergradient is the implicit function theorem's at its end
            point, with the Hessian of ``loss_fn`` on the last training batch, for φ^loss
            and (with ``Implicit(proximal=λ)``, iMAML) θ₀; optimizer hyperparameters have
            none. ``solver.last_implicit`` reports the solve (:class:`ImplicitReport`).
        compile: run each optimizer call's update and its VJP, over the call's tensors
            laid end to end, through ``torch.compile``, fused into a few kernels instead
            of one per operation (elementwise rules with a closed-form VJP). Exact to
            rounding; it costs a compile (seconds) per optimizer call shape. On a CPU it
            pays on large models: Adam's calls over 10⁶ elements take 0.2× the eager
            time, paid back after about 100 unroll steps, and the hypergradient of a
            10⁶-parameter Adam MLP 0.56×. It does not pay on small ones: the
            hypergradient of a 2·10⁴-element Adam MLP takes 0.97–1.01× its eager time,
            and small SGD models run slower (benchmarks/compiled.py). Off by default.

    A tensor with ``requires_grad=False`` is a constant: in the optimizer it does not
    step (``torch.optim`` skips a tensor without a gradient), and as a meta-parameter
    it gets no hypergradient.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn,
                 opt: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
                 meta_params: MetaParams, *, val_loss_fn: ValLossFn | None = None,
                 meta_opt: torch.optim.Optimizer | None = None, steps: int | None = None,
                 train_data: Iterable[Any] | None = None, val_data: Iterable[Any] | None = None,
                 scheduler: Any = None, memory: str = "retain", snapshots: int | None = None,
                 first_order: bool = False, truncate: int | None = None,
                 distributed: bool | None = None, process_group: Any = None,
                 compile: bool = False, mode: str = "reverse", horizon: str = "window",
                 val_mode: str | None = None, clip: Clip | None = None, implicit: Implicit | None = None,
                 _shadows: Any = None):
        _arguments.check_positional(model, loss_fn, opt, meta_params)
        if meta_opt is not None:
            _arguments.check_meta_opt_type(meta_opt)
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
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        if mode not in ("reverse", "forward", "auto", "implicit"):
            raise ValueError(f"mode must be 'reverse', 'forward', 'auto' or 'implicit', not {mode!r}")
        if implicit is not None and not isinstance(implicit, Implicit):
            raise TypeError(f"implicit must be a gimli.Implicit, not {type(implicit).__name__}")
        if implicit is not None and mode != "implicit":
            raise ValueError("implicit= says how mode='implicit' solves its linear system: give "
                             "mode='implicit' too")
        if mode == "implicit":
            implicit = implicit or Implicit()
            if memory != "retain" or first_order or truncate is not None or horizon != "window":
                raise ValueError("mode='implicit' keeps no trajectory and differentiates no path: "
                                 "memory=, snapshots=, first_order=, truncate= and horizon= do not apply")
            why = _why_not_implicit(meta_params, implicit)
            if why:
                raise ValueError(why)
        self.implicit = implicit
        self.last_implicit: ImplicitReport | None = None    # how the last implicit solve went
        if mode == "forward" and memory != "retain":
            raise ValueError(f"memory={memory!r} chooses how reverse mode keeps the trajectory; "
                             f"mode='forward' keeps none (its memory does not grow with J)")
        if val_mode not in (None, "eval", "train"):
            raise ValueError(f"val_mode must be 'eval', 'train' or None (the module's own mode), "
                             f"not {val_mode!r}")
        if horizon not in ("window", "full"):
            raise ValueError(f"horizon must be 'window' or 'full', not {horizon!r}")
        if horizon == "full" and (mode == "reverse" or truncate is not None):
            raise ValueError("horizon='full' carries forward mode's tangents from one committed "
                             "meta-step to the next: it needs mode='forward' and no truncate=")
        check_clip(clip)
        why_not = _why_not_forward(meta_params, clip)
        if why_not and (mode == "forward" or horizon == "full"):
            raise ValueError(why_not)
        self._forward_possible = not why_not
        self.mode, self.horizon = mode, horizon
        self.last_mode = mode if mode != "auto" else ""     # the mode the last unroll used
        self._said: set[str] = set()
        self._horizon = Horizon()       # the tangents carried between meta-steps (horizon='full')
        self.distributed, self.process_group = distributed, process_group
        self.memory, self.snapshots = memory, snapshots
        self.first_order, self.truncate = first_order, truncate
        self.last_forward_steps = 0     # optimizer steps the last unroll evaluated
        self.problem = Problem.build(model, loss_fn, opt, meta_params,    # (_shadows: gimli.check's copy)
                                     _arguments.val_loss(val_loss_fn), scheduler, _shadows)
        self.meta = meta_params
        self.problem.inner.compile = compile
        self.problem.val_mode = val_mode
        self.problem.clip = clip
        self.problem.proximal = implicit.proximal if implicit is not None else 0.0
        self.meta_opt = meta_opt
        if meta_opt is not None:
            self._check_meta_opt()
        self.steps = steps
        self.train_data = None if train_data is None else Stream(train_data, "train_data")
        self.val_data = None if val_data is None else Stream(val_data, "val_data")
        self.meta_steps = 0             # meta-updates taken by step()
        self._warned: set[str] = set()

    # --- the public calls --------------------------------------------------------------------
    def hypergradient(self, train_batches: Iterable[Any] | None = None,
                      val_batch: Any = None, *, tasks: Iterable[tuple[Any, Any]] | None = None,
                      commit: bool = False) -> Hypergradients:
        """∇_φ L^val(θ'_J) for every meta-parameter with ``requires_grad=True``, keyed by
        its name in ``meta_params.named_parameters()`` (a dict, which also carries
        ``val_loss`` and ``train_losses``, as :meth:`step` reports them). Changes nothing of the user's,
        unless ``commit`` (see :meth:`step`); a call that fails draws no batch from
        ``train_data``/``val_data`` and leaves torch's random state as it was.

        ``tasks``: a meta-batch of ``(train_batches, val_batch)`` pairs instead; the
        hypergradients are averaged, one task's unroll held at a time. Under
        ``torch.distributed`` (see the class), the average runs over every rank's tasks.
        """
        self._check_commit(commit, tasks)
        with Snapshot.take(self, meta=False, commit=commit):        # undone if anything fails
            grads, result = self._gradients(train_batches, val_batch, tasks)
            if commit:
                commit_unroll(self, result.final, len(result.train_losses))
                self._carry(result)
        return Hypergradients(grads, result.val_loss, result.train_losses)

    def step(self, train_batches: Iterable[Any] | None = None, val_batch: Any = None, *,
             tasks: Iterable[tuple[Any, Any]] | None = None, on_nonfinite: str = "raise",
             commit: bool = False) -> StepResult:
        """One meta-update: the hypergradient, then ``meta_opt.step()`` (line 16), then
        scalar and per-group hyperparameters written back into the optimizer (and, with
        a scheduler, the scheduler re-based on the learned base lr).

        All or nothing: if anything fails (an exception, a non-finite loss or gradient
        in the unroll, a non-finite hypergradient or updated meta-parameter), the
        model, the optimizer (param groups and state), the scheduler, the
        meta-parameters (and their ``.grad``), the meta-optimizer's state, the
        position in ``train_data``/``val_data`` and torch's random state are left as
        they were before the call (a retry draws the same batches and dropout masks),
        and the error is raised (a non-finite value as :class:`FloatingPointError`);
        with ``on_nonfinite="skip"`` a non-finite value is instead reported by a
        warning and a :class:`StepResult` with ``skipped=True``, and the batches the
        step drew from ``train_data``/``val_data`` count as used (the run moves past
        a bad batch). Under ``torch.distributed`` every rank raises or skips together.

        ``tasks``: a meta-batch, as for :meth:`hypergradient`; the result's losses are
        then averaged over the tasks (and the ranks).

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
        self._check_meta_opt()
        self._check_commit(commit, tasks)
        grads: dict[str, Tensor] = {}
        result: _Result | None = None
        with Snapshot.take(self, commit=commit) as saved:           # undone if anything fails
            try:
                grads, result = self._gradients(train_batches, val_batch, tasks)
                bad = [name for name, g in grads.items() if not bool(torch.isfinite(g).all())]
                if bad:
                    raise NonFiniteError(f"non-finite hypergradient: {', '.join(bad)}")
                self.meta_opt.zero_grad()
                for name, p in self._learned():
                    p.grad = grads[name]
                self.meta_opt.step()                                        # line 16
                self.meta.constrain_()
                bad = [name for name, p in self._learned() if not bool(torch.isfinite(p).all())]
                if bad:
                    raise NonFiniteError(f"non-finite meta-parameter after the meta-update: "
                                         f"{', '.join(bad)}")
            except NonFiniteError as e:
                if on_nonfinite == "raise":
                    e.args = (f"{e}; nothing was changed",)
                    raise
                saved.restore(self, keep_draws=True)    # a skipped step uses up its batches
                saved.settle()
                warnings.warn(f"GimliSolver.step skipped: {e}; nothing was changed",
                              RuntimeWarning, stacklevel=2)
                if result is None:
                    return StepResult(float("nan"), [], {}, True)
                return StepResult(result.val_loss, result.train_losses, _norms(grads), True)
            self.meta.write_back()
            if result.schedule is not None and self.meta.granularity.get("lr") in ("scalar", "group"):
                lr = self.meta.value("lr").detach()         # the base lr (the transform applied)
                bases = [float(lr if lr.dim() == 0 else lr[g]) for g in range(len(self.problem.inner.groups))]
                assert self.problem.shadows is not None
                rebase(self.problem.scheduler, self.problem.inner, bases, result.schedule,
                       self.problem.shadows)
            if commit:
                commit_unroll(self, result.final, len(result.train_losses))
                self._carry(result)
        self.meta_steps += 1
        return StepResult(result.val_loss, result.train_losses, _norms(grads))

    # --- resuming ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume meta-training, for ``torch.save`` (it loads with
        ``torch.load(..., weights_only=True)``): the meta-parameters, the
        meta-optimizer's state, the hyperparameters gimli writes into the optimizer's
        param groups, the scheduler (and what gimli keeps of it), the number of
        meta-steps, and the position in ``train_data``/``val_data``. The model's weights
        and the inner optimizer's state are the user's, saved as usual (with ``init=``,
        the meta-parameters are the model's weights and are saved here too)."""
        return _checkpoint.save(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the following hypergradients and meta-steps
        are bit-identical to those of the run that saved it (given the same model
        weights, optimizer state and data, and the same random-number state where the
        model draws random numbers). Everything is checked before anything is loaded;
        on any error nothing changes and the message names the entry."""
        _checkpoint.load(self, state)

    # --- several processes -------------------------------------------------------------------
    def check_replicas(self) -> None:
        """Raise if the meta-parameters differ between ranks: two all-reduces of them, the
        elementwise maximum and minimum over the ranks, must both equal this rank's
        values. A no-op outside torch.distributed."""
        group = self._group()
        if group is not None:
            _distributed.check_replicas(list(self.meta.parameters()), group)

    def _group(self) -> Any:
        return _distributed.process_group(self.distributed, self.process_group)

    # --- checks ------------------------------------------------------------------------------
    def _learned(self) -> list[tuple[str, Tensor]]:
        """The meta-parameters that get a hypergradient (``requires_grad=True``)."""
        return [(n, p) for n, p in self.meta.named_parameters() if p.requires_grad]

    def _check_meta_opt(self) -> None:
        _arguments.check_meta_opt(self.meta_opt, self.meta, [n for n, _ in self._learned()])

    def _check_commit(self, commit: bool, tasks: Any = None) -> None:
        if commit and (tasks is not None or self._group() is not None):
            raise ValueError("commit=True writes one unroll's end into the model: not with a "
                             "meta-batch of tasks or across processes")
        if commit and self.meta.init is not None:
            raise ValueError("commit=True would overwrite the model's weights, which are the "
                             "meta-learned initial weights θ₀ (init=): it is for online learning "
                             "of hyperparameters or loss parameters")
        if commit:
            self.problem.inner.check_commit(self.meta.granularity)

    def transactional(self) -> list[Any]:
        """Objects of the solver's own with ``snapshot()``/``restore()``, kept by a step's
        transaction: the schedule's shadows, with lr meta-learned under a scheduler, and
        the carried tangents of ``horizon="full"``."""
        return ([] if self.problem.shadows is None else [self.problem.shadows]) \
            + ([self._horizon] if self.horizon == "full" else [])

    def reset_horizon(self) -> None:
        """``horizon="full"``: forget the carried tangents; the next unroll starts the
        horizon anew from the model's current weights."""
        self._horizon.reset()

    def _carry(self, result: _Result) -> None:
        if self.horizon == "full":
            assert result.tangents is not None
            self._horizon.carry(result.tangents, self.problem.inner.params)

    # --- the hypergradient -------------------------------------------------------------------
    def _batches(self, train_batches: Iterable[Any] | None, val_batch: Any) -> tuple[list[Any], Any]:
        """The J training batches and the validation batch a call will use."""
        if train_batches is None:
            if self.train_data is None:
                raise ValueError("no training batches: pass train_batches or give train_data=")
            taken = self.train_data.take(self.steps or 0)
        else:
            _arguments.check_batches(train_batches)
            taken = list(itertools.islice(train_batches, self.steps)) if self.steps else list(train_batches)
        if not taken or (self.steps is not None and len(taken) < self.steps):
            raise ValueError(f"need {self.steps or 'at least 1'} training batches for the unroll, "
                             f"got {len(taken)}")
        if val_batch is None:
            if self.val_data is None:
                raise ValueError("no validation batch: pass val_batch or give val_data=")
            (val_batch,) = self.val_data.take(1)
        return taken, val_batch

    def _gradients(self, train_batches: Iterable[Any] | None, val_batch: Any,
                   tasks: Iterable[tuple[Any, Any]] | None) -> tuple[dict[str, Tensor], _Result]:
        """One task's hypergradient, or the mean over a meta-batch (and over every rank's
        tasks when distributed): summed one task at a time, all-reduced, divided."""
        pairs = [(train_batches, val_batch)] if tasks is None else \
            _arguments.task_pairs(tasks, train_batches, val_batch)
        group = self._group()
        last: _Result | None
        if group is None:
            sums, last = self._local(pairs)
        else:
            try:
                local: tuple[Sums | None, _Result | None] = self._local(pairs)
                failure = None
            except Exception as e:          # every rank must still take part in the all-reduce
                local, failure = (None, None), e
            sums = _distributed.all_reduce(local[0], failure, dict(self._learned()), group)
            last = local[1]
        assert last is not None
        n = sums.tasks
        mean = _Result(sums.val_loss / n, [s / n for s in sums.train_losses], last.schedule, last.final,
                       last.tangents)
        return {k: g / n for k, g in sums.grads.items()}, mean

    def _local(self, pairs: Sequence[tuple[Any, Any]]) -> tuple[Sums, _Result]:
        """This process's tasks, one at a time: the sums of their hypergradients and losses."""
        total: dict[str, Tensor] = {}
        val, train = 0.0, None
        result: _Result | None = None
        for train_batches, val_batch in pairs:
            grads, result = self._compute(*self._batches(train_batches, val_batch))
            total = grads if not total else {k: total[k] + g for k, g in grads.items()}
            val += result.val_loss
            if train is None:
                train = list(result.train_losses)
            elif len(train) != len(result.train_losses):
                raise ValueError(f"the tasks of a meta-batch unroll different numbers of steps "
                                 f"({len(train)} and {len(result.train_losses)}); give every task "
                                 f"the same number of training batches (or steps=)")
            else:
                train = [a + b for a, b in zip(train, result.train_losses)]
        assert result is not None and train is not None
        return Sums(total, float(len(pairs)), val, train), result

    def _tangents_and_steps(self, J: int) -> tuple[int, int]:
        """How many tangents forward mode would carry, and how many of the J steps are swept
        (the points reverse mode would hold)."""
        count = len(directions(self.meta, frozenset(self.meta.granularity), self.problem.loss_leaves()))
        return count, J if self.truncate is None else min(J, self.truncate)

    def _chosen_mode(self, J: int) -> str:
        """``mode``, or what ``mode="auto"`` picks for a J-step unroll (said once per choice)."""
        if self.mode != "auto":
            return self.mode
        count, swept = self._tangents_and_steps(J)
        forward = self._forward_possible and (self.horizon == "full" or count < swept)
        chosen = "forward" if forward else "reverse"
        if chosen not in self._said:
            self._said.add(chosen)
            why = (f"{count} tangents of (θ, σ) against the {swept} points reverse mode holds"
                   if self._forward_possible else _why_not_forward(self.meta, self.problem.clip))
            warnings.warn(f"mode='auto' chose mode={chosen!r}: {why}", GimliInfo, stacklevel=5)
        return chosen

    def _compute(self, train_batches: Sequence[Any], val_batch: Any) -> tuple[dict[str, Tensor], _Result]:
        self.last_mode = self._chosen_mode(len(train_batches))
        if self.last_mode == "forward":
            return self._compute_forward(train_batches, val_batch)
        if self.last_mode == "implicit":
            return self._compute_implicit(train_batches, val_batch)
        problem = self.problem
        with torch.enable_grad(), problem.held():                   # also under torch.no_grad()
            split = problem.split(len(train_batches))                             # line 2
            learned, phi_loss, schedule = split.learned, split.phi_loss, split.schedule
            run = Unroll(problem, split.per_step(len(train_batches)), train_batches, memory=self.memory,     # lines 3–7
                         snapshots=self.snapshots, truncate=self.truncate,
                         graph=not self.first_order or bool(phi_loss))
            if self.truncate is not None and self.truncate < len(train_batches) \
                    and self.meta.init is not None and "init" not in self._warned:
                self._warned.add("init")
                warnings.warn(f"truncate={self.truncate} < J = {len(train_batches)} cuts every path "
                              f"from θ₀ (init=) to L^val: its hypergradient is identically 0",
                              GimliWarning, stacklevel=4)
            result: Sweep = sweep(problem, run, learned, phi_loss, schedule, val_batch,
                                  first_order=self.first_order)                # lines 8–15
            self._warn_unreached(phi_loss, result.reached)
            grads = self._join(result, phi_loss)                                   # line 16
        self.last_forward_steps = run.forward_steps
        return grads, _Result(result.val_loss, run.train_losses, schedule, result.final)

    def _compute_forward(self, train_batches: Sequence[Any], val_batch: Any) -> tuple[dict[str, Tensor], _Result]:
        problem = self.problem
        J = len(train_batches)
        with torch.enable_grad(), problem.held():
            split = problem.split(J)
            learned, phi_loss, schedule = split.learned, split.phi_loss, split.schedule
            count, swept = self._tangents_and_steps(J)
            if count > swept and self.horizon == "window":     # (only forward mode has the full one)
                raise ValueError(
                    f"mode='forward' would carry {count} tangents of (θ, σ), one per learned "
                    f"hyperparameter or loss-parameter element, more than the {swept} steps whose "
                    f"points reverse mode keeps: use mode='reverse' (memory='recompute' holds "
                    f"{swept} points, 'budget' fewer)")
            start = self._horizon.start(problem.inner.params, count) if self.horizon == "full" else None
            run = Unroll(problem, split.per_step(J), train_batches, truncate=self.truncate,
                         graph=not self.first_order or bool(phi_loss), leaves=phi_loss)
            result = forward_hypergradient(problem, run, learned, phi_loss, schedule, val_batch,
                                           first_order=self.first_order, start=start)
            self._warn_unreached(phi_loss, result.reached)
            grads = {name: result.grads[id(p)] for name, p in self._learned()}
        self.last_forward_steps = run.forward_steps
        return grads, _Result(result.val_loss, run.train_losses, schedule, result.final, result.tangents)

    def _compute_implicit(self, train_batches: Sequence[Any], val_batch: Any) -> tuple[dict[str, Tensor], _Result]:
        problem = self.problem
        J = len(train_batches)
        assert self.implicit is not None
        with torch.enable_grad(), problem.held():
            split = problem.split(J)
            run = Unroll(problem, split.per_step(J), train_batches, graph=False)
            result = implicit_hypergradient(problem, run, split.phi_loss, val_batch, self.implicit)
            self._warn_unreached(split.phi_loss, result.reached)
            by_tensor = dict(result.grads)
            for p, g in zip(problem.inner.params, result.B0 or []):
                by_tensor[id(p)] = g
            grads = {name: by_tensor[id(p)] for name, p in self._learned()}
        self.last_forward_steps = run.forward_steps
        self.last_implicit = report = result.report
        resolution = 1e3 * torch.finfo(problem.inner.params[0].dtype).eps    # rounding's floor
        if report.residual > max(self.implicit.tol, resolution) and report.method != "dense" \
                and "residual" not in self._warned:     # said once per solver
            self._warned.add("residual")
            warnings.warn(f"mode='implicit': the {report.method} solve stopped at relative residual "
                          f"{report.residual:.2e} after {report.products} Hessian-vector products "
                          f"(tol={self.implicit.tol:g}): raise iterations= (solver.last_implicit "
                          f"reports each solve)", GimliWarning, stacklevel=5)
        return grads, _Result(result.val_loss, run.train_losses, split.schedule, result.final)

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
                          stacklevel=5)

    def _join(self, result: Sweep, phi_loss: list[Tensor]) -> dict[str, Tensor]:
        """Line 16's join(A^opt, A^loss), plus B₀ for θ₀, keyed by meta-parameter name."""
        meta, problem = self.meta, self.problem
        by_tensor: dict[int, Tensor] = {}
        for name in meta.granularity:                               # per-tensor a_j → φ^opt's shape
            if name in result.A_step:                               # learned per step: step j's a_j
                pairs = [(v, a) for j, a_j in enumerate(result.A_step[name]) if a_j is not None
                         for v, a in zip(meta.expand(name, j), a_j) if v is not None]
            else:                           # (v None: a tensor whose optimizer has no such name)
                pairs = [(v, a) for v, a in zip(meta.expand(name), result.A_opt[name]) if v is not None]
            hyper = meta.hyper(name)
            (g,) = torch.autograd.grad([v for v, _ in pairs], hyper, [a for _, a in pairs],
                                       allow_unused=True) if pairs else (None,)
            by_tensor[id(hyper)] = torch.zeros_like(hyper) if g is None else g
        for leaf, g in zip(phi_loss, result.A_loss):
            by_tensor[id(leaf)] = g
        if meta.init is not None:
            for p, g in zip(problem.inner.params, result.B0):
                by_tensor[id(p)] = g
        return {name: by_tensor[id(p)] for name, p in self._learned()}


class _Result(NamedTuple):
    val_loss: float
    train_losses: list[float]
    schedule: Schedule | None
    final: Point
    tangents: list[Any] | None = None       # forward mode's (Z_J, Y_J) per direction


def _why_not_forward(meta: MetaParams, clip: Any = None) -> str:
    """Why forward mode, which carries one tangent per meta-parameter element, cannot take
    these meta-parameters (their count grows with the model: θ₀, per-element
    hyperparameters), or this setup (clipping), or ''."""
    if clip is not None:
        return ("mode='forward' does not carry tangents through gradient clipping (clip=): "
                "use mode='reverse'")
    if meta.init is not None:
        return ("mode='forward' carries one tangent of (θ, σ) per meta-parameter element, "
                "and θ₀ (init=) has as many elements as the model: use mode='reverse'")
    if meta.stepwise():
        return (f"mode='forward' carries one tangent of (θ, σ) per meta-parameter element, and "
                f"{', '.join(sorted(meta.stepwise()))} per step has one per step, as many as the "
                f"points reverse mode holds: use mode='reverse'")
    per_element = [name for name, per in meta.granularity.items() if per == "element"]
    if per_element:
        return (f"mode='forward' carries one tangent of (θ, σ) per meta-parameter element, "
                f"and {', '.join(per_element)} per 'element' has as many as the model: learn "
                f"it per 'tensor', 'group' or 'scalar', or use mode='reverse'")
    return ""


def _norms(grads: dict[str, Tensor]) -> dict[str, float]:
    return {name: g.norm().item() for name, g in grads.items()}
