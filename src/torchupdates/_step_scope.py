"""``step()``'s wrapper: torch.optim's hooks and profiler scope, the scope only while profiling.

``torch.optim.Optimizer`` wraps every subclass's ``step`` in a function that enters a profiler
scope (``record_function("Optimizer.step#...")``), runs the step pre-hooks, the step and the
post-hooks. Entering that scope costs about 10 µs with warm caches and 40 µs or more after a
step that streamed its buffers through the cache, and the torch operations inside an open scope
cost more too: 110-170 µs per step in all, for the benchmark's 200 tensors on the development
machine. That is several percent of a memory-bound step such as SGD's, paid whether or not a
profiler listens.

:func:`scoped_only_while_profiling` wraps ``step`` first (torch then leaves it alone): torch's
own wrapper runs whenever a profiler is recording (``torch.autograd.profiler`` sets the flag
that Inductor consults for the same purpose), any step hook is registered, or ``torch.compile``
traces the step. Otherwise the step runs directly, followed by the profiler's Python-tracing
entry point, as in torch's wrapper.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.autograd.profiler
import torch.optim.optimizer as torch_optimizer

__all__ = ["scoped_only_while_profiling"]

_Step = TypeVar("_Step", bound=Callable[..., Any])


def _profiling() -> bool:
    # Where torch has no such flag (older releases), always take torch's wrapper.
    return bool(getattr(torch.autograd.profiler, "_is_profiler_enabled", True))


def _hooked(optimizer: torch.optim.Optimizer) -> bool:
    return bool(
        optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
        or getattr(torch_optimizer, "_global_optimizer_pre_hooks", True)
        or getattr(torch_optimizer, "_global_optimizer_post_hooks", True)
    )


def scoped_only_while_profiling(step: _Step) -> _Step:
    """``step`` wrapped as ``torch.optim.Optimizer`` wraps it, except that with no profiler
    recording, no step hook and no ``torch.compile`` tracing, it runs without the scope."""
    with_scope = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(optimizer: torch.optim.Optimizer, /, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() or _profiling() or _hooked(optimizer):
            return with_scope(optimizer, *args, **kwargs)
        result = step(optimizer, *args, **kwargs)
        optimizer._optimizer_step_code()
        return result

    wrapper.hooked = True  # type: ignore[attr-defined]  # torch's mark: wrap no further
    return wrapper  # type: ignore[return-value]
