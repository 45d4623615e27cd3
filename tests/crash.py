"""Running a crash test's worker: a ``tests.*_worker`` module started as its own process, which
prints one ``KILLED ...`` line and kills itself with SIGKILL at the point the test chose.

What this module does: start the worker from the repository root, wait for it, fail the test when
it hangs or dies any other way, and return the words of its ``KILLED`` line. What it does not do:
decide where the worker dies or check what it left behind (each crash test does).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_until_killed(module: str, *args: str, timeout_s: float) -> list[str]:
    """Run ``python -m module args``, wait for it to die by its own SIGKILL, and return the
    words after ``KILLED`` on the one such line it printed."""
    worker = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        stdout, stderr = worker.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        worker.kill()
        stdout, stderr = worker.communicate()
        pytest.fail(f"the worker hung: {stdout[-500:]!r}\n{stderr[-6000:]}")
    assert worker.returncode == -signal.SIGKILL, (
        f"worker exited with {worker.returncode}: {stdout[-500:]!r} {stderr[-3000:]}"
    )
    (line,) = [line for line in stdout.splitlines() if line.startswith("KILLED ")]
    return line.split()[1:]
