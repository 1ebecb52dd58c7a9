"""Deprecated alias of :mod:`rdn.experiments.pipeline`, where the pipeline moved (``rdn pipeline`` is unchanged).

``main(args)`` and ``add_arguments(parser)`` keep working; ``PRESETS`` are now
:class:`~rdn.experiments.config.ExperimentConfig` instances (:mod:`rdn.experiments.config`), no
longer dicts. Import from :mod:`rdn.experiments` instead.
"""

from __future__ import annotations

import argparse
import warnings

from rdn.experiments.config import EPSILON_OFFSETS, OPERATING_OFFSET, PRESETS
from rdn.experiments.pipeline import main, run

__all__ = ["EPSILON_OFFSETS", "OPERATING_OFFSET", "PRESETS", "add_arguments", "main", "run"]

warnings.warn("rdn.pipeline moved to rdn.experiments.pipeline (run(config, out=...) or main(args)); this alias "
              "will be removed", DeprecationWarning, stacklevel=2)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``rdn pipeline`` (run, data, surgery, experiment), as :mod:`rdn.cli` declares them."""
    from rdn.cli import _add_pipeline_options

    _add_pipeline_options(parser)
