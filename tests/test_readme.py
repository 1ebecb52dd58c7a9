"""The README's Python snippets run as written (in order, sharing one namespace, as a reader would
paste them), except those marked ``<!-- not run by tests/test_readme.py: ... -->``."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- not run by tests/test_readme.py:[^>]*-->\n)?```python\n(.*?)```", re.DOTALL)


def snippets() -> list[str]:
    return [code for skipped, code in BLOCK.findall(README.read_text()) if not skipped]


def test_the_readme_has_snippets_for_every_user_path():
    text = "\n".join(snippets())
    for needle in ("nested_conv2d(", "rdn.nest(", "fit(net, train", "JointLoss("):
        assert needle in text, needle


def test_readme_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a snippet writes (runs/...) land here
    namespace: dict = {"__name__": "__readme__"}
    for index, code in enumerate(snippets()):
        try:
            exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)  # noqa: S102
        except Exception as error:  # name the block in the failure
            pytest.fail(f"README python block {index + 1} failed: {type(error).__name__}: {error}\n{code}")
    assert os.path.isfile(tmp_path / "runs" / "readme-fit" / "checkpoint.pt")
