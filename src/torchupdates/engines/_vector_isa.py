"""Inductor's check of the CPU's vector instruction sets, remembered between processes.

Before a process compiles its first CPU kernel, Inductor checks that each vector instruction set
the CPU reports (AVX2, AVX-512, ...) compiles and loads, by starting a Python child process per
set: about 0.6 s of the first step of every new process on the development machine, even with a
warm kernel cache. The answer depends on the CPU, the C++ compiler and torch, not on the
process. So the first process writes it into Inductor's cache directory, beside the kernels, and
a later process tells Inductor that the check passed (its ``cpp.vec_isa_ok`` setting) when it
passed for every set the CPU reports. When anything differs (another compiler, another torch, a
set that failed) or cannot be read, Inductor checks as usual.

This reads Inductor's own list of instruction sets, which is not public API: on a torch that
lays it out differently, nothing is remembered and Inductor checks every time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

__all__ = ["remembered_vector_isa_options"]


def remembered_vector_isa_options(compiler: str | None) -> dict[str, bool]:
    """``{"cpp.vec_isa_ok": True}`` when every vector instruction set this CPU reports is
    usable with ``compiler`` and this torch, else ``{}``. The answer is read from the record an
    earlier process left; without one, this process checks now (Inductor's own check, which
    its first kernel would run anyway and which it keeps for the process) and leaves the
    record for the next."""
    if compiler is None or platform.machine() not in ("x86_64", "AMD64"):
        return {}
    try:
        return _remembered(compiler)
    except (ImportError, AttributeError, OSError, ValueError, TypeError):
        return {}


@functools.cache
def _remembered(compiler: str) -> dict[str, bool]:
    from torch._inductor import cpu_vec_isa

    reported = _reported_sets(cpu_vec_isa)
    if not reported:
        return {}
    path = os.path.realpath(shutil.which(compiler) or compiler)
    key = {"torch": torch.__version__, "compiler": path, "compiler_mtime": os.stat(path).st_mtime_ns}
    record = _record_path(key)
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and saved.get("key") == key:
        usable = saved.get("usable")
    else:
        _check_concurrently(cpu_vec_isa, reported)
        usable = sorted(str(isa) for isa in cpu_vec_isa.valid_vec_isa_list())
        record.parent.mkdir(parents=True, exist_ok=True)
        partial = record.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"key": key, "usable": usable}))
        partial.replace(record)  # whole or not at all, for processes reading it meanwhile
    # The same setting whether the check ran now or earlier: Inductor's settings are part of
    # its cache keys, so the kernels cached by the first process serve the later ones.
    return {"cpp.vec_isa_ok": True} if usable == reported else {}


def _check_concurrently(cpu_vec_isa: Any, reported: list[str]) -> None:
    """Run Inductor's check of each reported set at once, one thread each: each check
    compiles a probe with the C++ compiler and loads it in a child process (about 2 s a set
    on the development machine), and Inductor keeps each answer for the process, so its own
    pass over the sets that follows only reads them."""
    candidates = [isa for isa in cpu_vec_isa.supported_vec_isa_list if str(isa) in reported]
    if len(candidates) > 1:
        with ThreadPoolExecutor(len(candidates)) as pool:
            list(pool.map(bool, candidates))


def _reported_sets(cpu_vec_isa: Any) -> list[str]:
    """The instruction sets Inductor would check on this CPU (those whose flags it reports)."""
    flags = cpu_vec_isa.x86_isa_checker()
    names = (str(isa) for isa in cpu_vec_isa.supported_vec_isa_list)
    return sorted(name for name in names if all(flag in flags for flag in name.split()))


def _record_path(key: dict[str, Any]) -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir()) / "torchupdates" / f"vector-isa-{digest}.json"
