"""Surgery: a pretrained network → a Russian doll network (DESIGN.md §4; docs/surgery.md).

``nest(model, k, mode, select, calib, ...)`` (or ``nest(model, config=NestConfig(...), calib=...)``)
analyses the model's dataflow graph (:mod:`rdn.surgery.graph`), orders the channels of every
nested tensor (:mod:`rdn.surgery.passes.select`), writes down what to run as a plain-data plan
(:mod:`rdn.surgery.plan`, made by :mod:`rdn.surgery.build`), optionally drops blocks of the added
groups to fit a MAC budget (:mod:`rdn.surgery.passes.budget`) and refits what lost inputs
(:mod:`rdn.surgery.passes.compensate`), and returns a :class:`RussianDollNet`
(:mod:`rdn.surgery.network`), which executes the plan. Costs and export are functions of the plan
(:mod:`rdn.surgery.costs`, :mod:`rdn.surgery.export`), and so is the coverage report
(:mod:`rdn.surgery.coverage`: how much of the model is nested, and why the rest is not).
:func:`fold_batch_norms` makes an inference copy with the BatchNorms folded into their convs
(:mod:`rdn.surgery.fold`).
"""

from rdn.surgery.config import NestConfig
from rdn.surgery.coverage import Coverage, CoverageWarning
from rdn.surgery.fold import fold_batch_norms
from rdn.surgery.nest import nest
from rdn.surgery.network import RussianDollNet, StagedState
from rdn.surgery.plan import Plan, Role
from rdn.surgery.record import NestRecord
from rdn.surgery.spaces import ChannelSpace, ConcatSpace

__all__ = [
    "nest",
    "fold_batch_norms",
    "ChannelSpace",
    "ConcatSpace",
    "Coverage",
    "CoverageWarning",
    "NestConfig",
    "NestRecord",
    "Plan",
    "Role",
    "RussianDollNet",
    "StagedState",
]
