"""Surgery: a pretrained network → a Russian doll network (DESIGN.md §4).

``nest(model, k, mode, select, calib, ...)`` analyses the model's dataflow graph
(:mod:`rdn.surgery.graph`), orders the channels of every nested tensor (:mod:`rdn.surgery.select`),
lays out copies and groups (:mod:`rdn.surgery.spaces`), optionally drops blocks of the added groups
to fit a MAC budget (:mod:`rdn.surgery.budget`) and returns a :class:`RussianDollNet`
(:mod:`rdn.surgery.network`).
"""

from rdn.surgery.config import NestConfig
from rdn.surgery.nest import nest
from rdn.surgery.network import RussianDollNet, StagedState
from rdn.surgery.record import NestRecord
from rdn.surgery.spaces import ChannelSpace

__all__ = ["nest", "NestConfig", "NestRecord", "RussianDollNet", "StagedState", "ChannelSpace"]
