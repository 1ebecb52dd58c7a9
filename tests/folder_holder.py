"""A run folder held by another process, for the tests of refused second writers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
HOLDER = textwrap.dedent("""
    import sys, time
    from rdn.files import RunFolder
    with RunFolder(sys.argv[1]):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def hold_in_another_process(folder: Path, seconds: float = 120) -> subprocess.Popen:
    """Start a process that locks ``folder`` (kill it to release); returns once the lock is held."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPOSITORY)  # fmt: skip
    line = process.stdout.readline().strip()
    if line != "held":
        process.kill()
        raise RuntimeError(f"the holder process did not take {folder}: {process.stderr.read()}")
    return process


def try_in_another_process(folder: Path) -> subprocess.CompletedProcess:
    """Try to take ``folder`` from a fresh process (which releases it at once)."""
    return subprocess.run([sys.executable, "-c", HOLDER, str(folder), "0"], capture_output=True, text=True,
                          cwd=REPOSITORY, timeout=120)  # fmt: skip
