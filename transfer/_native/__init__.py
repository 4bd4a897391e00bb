"""The native kernels, chosen explicitly.

TRANSFER_NATIVE=cython (the default) loads the compiled modules built from
native/*.pyx; TRANSFER_NATIVE=python loads their pure-Python twins from
_reference.py. A missing compiled module is an error that says how to build
it, never a silent fallback to the twins: a benchmark of the twins would be a
measurement of something else. The choice is read on first use (not at
import), so a bad value is reported as a clear error, and it is recorded in
every report ("native").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..errors import BadInput, NativeMissing
from ..runs import Runs

ENV = "TRANSFER_NATIVE"
MODULES = ("zeroscan", "blockhash", "fileops", "intervals", "blockstatus")


@dataclass(frozen=True)
class Kernels:
    implementation: str  # "cython" or "python"
    zero_blocks: Callable[..., int]
    hash_blocks: Callable[..., int]
    fallocate: Callable[[int, int, int, int], None]
    sync_file_range: Callable[[int, int, int, int], None]
    blkzeroout: Callable[[int, int, int], None]
    blksszget: Callable[[int], int]
    merge_runs: Callable[..., Runs]
    subtract_runs: Callable[[Any, Any], Runs]
    clip_runs: Callable[[Any, int, int], Runs]
    runs_bytes: Callable[[Any], int]
    block_status: Callable[..., tuple]

    def describe(self) -> dict[str, str]:
        return {name: self.implementation for name in MODULES}


_loaded: dict[str, Kernels] = {}


def _compiled() -> dict[str, Any]:
    mods: dict[str, ModuleType] = {}
    for name in MODULES:
        try:
            mods[name] = __import__(f"transfer._native.{name}", fromlist=[name])
        except ImportError as e:
            raise NativeMissing(
                f"native kernel transfer._native.{name} is not built ({e}); run tools/setup, "
                f"or set {ENV}=python to run the pure-Python twins on purpose"
            ) from None
    return {
        "zero_blocks": mods["zeroscan"].zero_blocks,
        "hash_blocks": mods["blockhash"].hash_blocks,
        "fallocate": mods["fileops"].fallocate,
        "sync_file_range": mods["fileops"].sync_file_range,
        "blkzeroout": mods["fileops"].blkzeroout,
        "blksszget": mods["fileops"].blksszget,
        "merge_runs": mods["intervals"].merge_runs,
        "subtract_runs": mods["intervals"].subtract_runs,
        "clip_runs": mods["intervals"].clip_runs,
        "runs_bytes": mods["intervals"].runs_bytes,
        "block_status": mods["blockstatus"].block_status,
    }


def _twins() -> dict[str, Any]:
    from . import _reference as ref

    return {
        "zero_blocks": ref.zero_blocks,
        "hash_blocks": ref.hash_blocks,
        "fallocate": ref.fallocate,
        "sync_file_range": ref.sync_file_range,
        "blkzeroout": ref.blkzeroout,
        "blksszget": ref.blksszget,
        "merge_runs": ref.merge_runs,
        "subtract_runs": ref.subtract_runs,
        "clip_runs": ref.clip_runs,
        "runs_bytes": ref.runs_bytes,
        "block_status": ref.block_status,
    }


def kernels(choice: str | None = None) -> Kernels:
    """The kernels named by choice, else by $TRANSFER_NATIVE, else the compiled ones."""
    if choice is None:
        choice = os.environ.get(ENV, "cython") or "cython"
    if choice not in ("cython", "python"):
        raise BadInput(f"{ENV}={choice!r}: expected 'cython' or 'python'")
    if choice not in _loaded:
        funcs = _compiled() if choice == "cython" else _twins()
        _loaded[choice] = Kernels(implementation=choice, **funcs)
    return _loaded[choice]
