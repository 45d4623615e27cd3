"""What every benchmark reports about where it ran, and how it stops on a missing prerequisite.

Imported by the benchmark scripts (which put the repository root on ``sys.path``) so each prints
the same machine facts next to its figures.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import ssl
import sys
from pathlib import Path
from typing import Any, NoReturn


def fail(message: str) -> NoReturn:
    print(f"FAILED: {message}", file=sys.stderr)
    raise SystemExit(1)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(**extra: Any) -> dict[str, Any]:
    """Interpreter, platform, CPU and OpenSSL, plus the benchmark's own ``extra`` facts."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "openssl": ssl.OPENSSL_VERSION,
        **extra,
    }
