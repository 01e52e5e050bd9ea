"""Worker threads for the CPU step: independent chunks on several cores at once.

torch parallelises one elementwise operation over its threads (OpenMP); NumPy's square root
(see :mod:`torchupdates.formula._sqrt`) runs on one thread. A program that takes NumPy's roots runs
its chunks on worker threads instead, each worker running whole chunks with single-threaded
operations, its chunk in its own core's cache; torch and NumPy release the GIL inside every
operation, so the workers run in parallel and only the Python glue between operations is
serialised. A step uses as many workers as the calling thread's ``torch.get_num_threads()``
(capped); results are the same as on one thread, element for element (each element's
operations are the same, whichever thread runs them).

A worker mirrors the caller's thread-local state that could change an operation's result or
legality: inference mode and flush-denormal mode. Under a Python dispatch or function mode
(which would not see the workers' operations) the caller runs the chunks itself.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = ["run_tasks"]

Task = Callable[[], None]


class _Worker:
    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(ready,), name="torchupdates-worker", daemon=True)
        self.thread.start()
        ready.wait()

    def _main(self, ready: threading.Event) -> None:
        # Settle this thread's torch thread count (torch initialises it lazily, per thread, from
        # a process-wide default), then make its operations single-threaded.
        torch.get_num_threads()
        torch.set_num_threads(1)
        torch.set_grad_enabled(False)
        ready.set()
        while True:
            job = self.inbox.get()
            if job is None:
                return
            job()


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []

    def workers(self, count: int) -> list[_Worker]:
        with self._lock:
            if len(self._workers) < count:
                threads = torch.get_num_threads()
                while len(self._workers) < count:
                    self._workers.append(_Worker())
                # A worker's set_num_threads(1) also set the process-wide default: restore it.
                torch.set_num_threads(threads)
            return self._workers[:count]

    def forget(self) -> None:
        """After fork: the child has none of the parent's threads."""
        self._lock = threading.Lock()
        self._workers = []


_POOL = _Pool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.forget)

_DENORMAL = 1e-40  # a float32 subnormal: flushed to zero when the caller flushes denormals


def _flushes_denormals() -> bool:
    return bool((torch.full((1,), _DENORMAL, dtype=torch.float32) * 1.0).item() == 0.0)


_local = threading.local()


def _drain(tasks: Iterator[Task], inference: bool, flush: bool, done: queue.SimpleQueue[BaseException | None]) -> None:
    try:
        if getattr(_local, "flush", False) != flush:
            torch.set_flush_denormal(flush)
            _local.flush = flush
        # (inference_mode(False) would turn gradients on: enter it only when the caller is in it.)
        with torch.inference_mode() if inference else torch.no_grad():
            for task in tasks:  # a shared iterator: each task runs once, on whichever worker takes it
                task()
    except BaseException as error:
        for _ in tasks:  # let the other workers stop early
            pass
        done.put(error)
        return
    done.put(None)


@functools.cache
def _per_thread_torch_threads() -> bool:
    """Whether torch's thread count is per thread (OpenMP), so that workers can be made
    single-threaded without changing the caller's operations (not so with torch's native
    thread pool, whose size is process-wide)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def run_tasks(tasks: Sequence[Task], count: int) -> None:
    """Run every task, on ``count`` worker threads (the caller waits), or on the caller's
    thread when ``count`` is 1, a Python dispatch or function mode is active, or torch's
    threads are not OpenMP's."""
    if (
        count <= 1
        or len(tasks) <= 1
        or torch._C._len_torch_dispatch_stack()
        or torch._C._len_torch_function_stack()
        or not _per_thread_torch_threads()
    ):
        for task in tasks:
            task()
        return
    workers = _POOL.workers(min(count, len(tasks)))
    shared = iter(tasks)
    done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
    inference, flush = torch.is_inference_mode_enabled(), _flushes_denormals()
    for worker in workers:
        worker.inbox.put(lambda: _drain(shared, inference, flush, done))
    errors = [done.get() for _ in workers]
    for error in errors:
        if error is not None:
            raise error
