"""Maintenance tools run from a checkout (``python -m tools.<name>`` in the repository root).

Not part of the installed packages: they read the repository's sources (``csrc/``) and write the
committed tables under ``benchmarks/results/``, so their paths are found from this file's
location, never from the current directory or an installed package.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
