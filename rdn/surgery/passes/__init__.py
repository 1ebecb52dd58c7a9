"""The surgery's passes: each takes the analysis or the plan (and what it needs: the network, the
base model, the calibration batch) and returns its result or edit.

- :mod:`~rdn.surgery.passes.select`: graph → the unit order of every channel layout (greedy or random);
- :mod:`~rdn.surgery.passes.budget`: plan + network + calibration → the blocks to drop for a MAC budget;
- :mod:`~rdn.surgery.passes.compensate`: network + base model + calibration → refitted weights of
  the copies that lost inputs (in place: the refit of a layer feeds the next one).
"""

from rdn.surgery.passes.budget import Pruning, apply_pruned_blocks, prune_blocks
from rdn.surgery.passes.compensate import compensate_dropped_connections
from rdn.surgery.passes.select import Selection, greedy_order, select_orders

__all__ = [
    "Pruning",
    "Selection",
    "apply_pruned_blocks",
    "compensate_dropped_connections",
    "greedy_order",
    "prune_blocks",
    "select_orders",
]
