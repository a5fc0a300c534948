"""Where the lab keeps what it downloads and builds (outside the checkout)."""
from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """CONNTRACE_LAB_CACHE, else $XDG_CACHE_HOME/conntrace-lab, else ~/.cache/conntrace-lab."""
    explicit = os.environ.get("CONNTRACE_LAB_CACHE")
    if explicit:
        root = Path(explicit)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "conntrace-lab"
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()
