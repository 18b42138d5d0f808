"""Programs the project builds from source once per version, into a cache outside the checkout that every
clone on the machine shares (CI's too): the test infrastructure's Go programs and llama.cpp's server."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "inference-picker-fleet"


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(target)` unless it is there; concurrent callers (parallel test workers,
    two clones) wait for one build."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            build(target)
    return target
