"""The machine a bench ran on, for its table's header."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """'<CPU model>, N cores', read from /proc/cpuinfo where it exists."""
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"
