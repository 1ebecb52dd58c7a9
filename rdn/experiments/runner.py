"""A small runner of resumable steps: each step names its outputs and is skipped when they all exist.

Steps pass their results to later steps through files in the run folder, never through memory,
so a killed run resumes at the first step whose outputs are missing. A step writes each output
atomically (:func:`rdn.files.atomic_write`): an output exists complete or not at all.

Example::

    steps = [Step("train", ("model/result.json",), train), Step("report", (), report)]
    run_steps(folder, steps)   # "[1/2] train: running" ... "[2/2] report: running"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Step", "run_steps"]


@dataclass(frozen=True)
class Step:
    """One resumable step.

    Attributes:
        title: what it does, for the progress line.
        outputs: the files it writes, relative to the run folder; when all exist it is skipped. A step
            without outputs (e.g. a report rendered from the others) always runs.
        run: does the work (reads earlier steps' outputs, writes its own).
    """

    title: str
    outputs: tuple[str, ...]
    run: Callable[[], None]

    def done(self, folder: Path) -> bool:
        return bool(self.outputs) and all((folder / output).exists() for output in self.outputs)


def run_steps(folder: str | Path, steps: Sequence[Step]) -> list[str]:
    """Run the steps in order, skipping those already done; returns the titles of the steps that ran."""
    folder = Path(folder)
    ran = []
    for index, step in enumerate(steps, 1):
        if step.done(folder):
            names = ", ".join(Path(output).name for output in step.outputs)
            print(f"[{index}/{len(steps)}] {step.title}: done, skipped ({names} exist)", flush=True)
            continue
        print(f"[{index}/{len(steps)}] {step.title}: running", flush=True)
        step.run()
        ran.append(step.title)
    return ran
