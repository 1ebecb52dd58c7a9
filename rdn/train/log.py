"""Epoch logs of a run: ``log.csv``, ``log.json`` and ``accuracy.png`` (per-exit test accuracy).

Each epoch is one flat row: ``epoch``, ``step``, ``lr``, ``train_loss``, ``train_top1`` (largest
exit, on augmented training batches), ``images_per_s``, ``epoch_s``, then ``test_top1_s`` /
``test_top5_s`` for every exit s = 1..K (and ``ema_test_top1_s`` / ``ema_test_top5_s`` with EMA).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from rdn.files import atomic_write

__all__ = ["RunLog"]


class RunLog:
    """Appends epoch rows to the run folder's CSV / JSON and redraws the accuracy plot."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.rows: list[dict] = []
        json_path = self.folder / "log.json"
        if json_path.is_file():  # a resumed run continues its log
            self.rows = json.loads(json_path.read_text())["epochs"]

    def append(self, row: dict) -> None:
        # A resumed run may redo an epoch whose row the killed run had written: keep the latest.
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_json()
        self._write_csv()
        self._plot()

    def _write_json(self) -> None:
        atomic_write(self.folder / "log.json", lambda tmp: tmp.write_text(json.dumps({"epochs": self.rows}, indent=1)))

    def _write_csv(self) -> None:
        columns = list(dict.fromkeys(key for row in self.rows for key in row))

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, columns)
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write(self.folder / "log.csv", write)

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        prefix = "ema_test_top1_" if any("ema_test_top1_1" in row for row in self.rows) else "test_top1_"
        exits = sorted({int(key[len(prefix):]) for row in self.rows for key in row if key.startswith(prefix)})
        if not exits:
            return
        epochs = [row["epoch"] for row in self.rows]
        figure, axes = plt.subplots(figsize=(6, 4))
        for s in exits:
            axes.plot(epochs, [row.get(f"{prefix}{s}") for row in self.rows], marker="o", label=f"N_{s}")
        axes.set_xlabel("epoch")
        axes.set_ylabel(f"test top-1 (%){' , EMA weights' if prefix.startswith('ema') else ''}")
        axes.grid(alpha=0.3)
        axes.legend(ncol=2 if len(exits) > 4 else 1, fontsize="small")
        figure.tight_layout()
        atomic_write(self.folder / "accuracy.png", lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
        plt.close(figure)
