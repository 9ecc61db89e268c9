"""gimli: exact hypergradients through unrolled inner optimization (Algorithm 1 of
"Generalized Inner Loop Meta-Learning"), with a hand-written reverse sweep."""

from ._clip import ClipGradNorm, ClipGradValue
from ._functional import FunctionalModel
from ._implicit import Implicit, ImplicitReport
from ._meta import MetaParams
from ._oracle import full_unroll_hypergradient
from ._problem import GimliInfo, GimliWarning
from ._solver import GimliSolver, Hypergradients, StepResult
from ._verify import CheckReport, assert_hypergradients_correct, check
from .optim import LearnedOptimizer, register_optimizer

__all__ = ["CheckReport", "ClipGradNorm", "ClipGradValue", "FunctionalModel", "GimliInfo", "GimliSolver", "GimliWarning", "Hypergradients",
           "Implicit", "ImplicitReport",
           "LearnedOptimizer", "MetaParams", "StepResult", "assert_hypergradients_correct", "check", "full_unroll_hypergradient",
           "register_optimizer"]
__version__ = "0.1.0"
