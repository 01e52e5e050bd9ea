"""The compiled engine: one fused kernel per chain of formulas, over flat buffers.

A step records the chain's formulas once more on symbolic operands (the same recording the
foreach engine runs), and turns the record into a small Python function of plain torch
operations: ``kernel(param, grad, *state, *coefficients)``, generated once per wiring of the
record (:meth:`~torchupdates.formula.Graph.wiring`) and reused by later steps.
``torch.compile`` (Inductor) fuses it into one loop that reads each element of the
parameters, gradients and state once and writes the parameters and state once: the memory
traffic a step cannot avoid. The kernel runs over
:class:`~torchupdates.engines._flat.FlatBucket` buffers, so one call updates every tensor of
a batch however many there are.

Coefficients (the learning rate, ``1 - rho``, Adam's bias correction at step ``t``, ...) are
computed in Python exactly as on the eager engines and passed as 0-d tensors: a new value
is a new input, never a new kernel, so schedulers and in-place changes do not recompile.

Exactness: each recorded operation is one IEEE operation per element, in the formula's
order. Inductor's C++ is built without FMA contraction and its square root is correctly
rounded; on CUDA, these kernels turn off the contraction of ``a * b + c`` into FMA
(``emulate_precision_casts``) and divide with IEEE rounding as eager CUDA does (Triton's
``/`` is an approximation unless ``eager_numerics.division_rounding`` is set). So float32
results equal the eager engines' bit for bit.
"""

from __future__ import annotations

import functools
import linecache
import operator
import shutil
import weakref
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from numbers import Real
from typing import Any, cast

import torch
from torch import Tensor

from ..formula import ELEMENTWISE, PROBE_SCALAR, Graph, Node, Scalar, ScalarKind, Symbol, probe_operands, scalar_kind
from ._chain import (
    Batch,
    KeptRecordings,
    Slot,
    Stage,
    StepNumbers,
    counts_steps,
    fits,
    number_tensor,
    pairs_for_slot,
    recording_key,
    run_chain,
    step_scalars,
)
from ._flat import PLAIN_TENSORS, FlatBucket, local, real
from ._vector_isa import remembered_vector_isa_options
from .reference import propose_reference

__all__ = ["CompiledEngine", "CompilerMissingError", "require_compiler"]

# emulate_precision_casts: on CUDA, no contraction into FMA (and casts as eager rounds them).
# pattern_matcher off: among its rewrites, torch before 2.12 drops a float32 -> 16-bit ->
# float32 round trip, the rounding that makes a fused 16-bit step round as eager does. An
# elementwise kernel has nothing else for it to rewrite.
_COMPILE_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {
    "emulate_precision_casts": True,
    "pattern_matcher": False,
}
# On CUDA, eager torch divides with IEEE rounding and keeps subnormals; Triton's defaults do
# neither. These settings exist in recent torch only; older Inductor has no way to ask.
_EAGER_NUMERICS = ("division_rounding", "disable_ftz")
# On CPU a kernel is parallel or not by the length it was first compiled for; one kernel serves
# buckets of every length, so the choice is made here: threads for long buffers (whatever
# length came first), one thread for short ones (where waking threads costs more than it saves,
# and much more when other processes hold the cores).
PARALLEL_ELEMENTS = 1 << 16
GRADIENTS_IN_PLACE_FROM = 1 << 18
"""On CPU, a new ``.grad`` of at least this many elements is read where it is by the steady
state's kernel (one more kernel call) instead of copied into the bucket (one more pass over
its memory); smaller ones are copied, as a call costs more than their copy."""
_THREADS: dict[bool, dict[str, str | int | bool | Callable[..., Any]]] = {
    True: {"cpp.dynamic_threads": True},
    False: {"cpp.threads": 1},
}


_OPMATH_FLOAT32 = (torch.float16, torch.bfloat16)


class CompilerMissingError(RuntimeError):
    """``engine="compiled"`` cannot compile kernels for a device on this machine."""


@functools.cache
def _cpp_compiler(search: tuple[str | None, ...]) -> str | None:
    """The C++ compiler Inductor finds, or None. ``search`` is Inductor's search list
    (``config.cpp.cxx``): not read here, it keys the cache, so a changed setting is looked up
    again while each setting costs one look-up per process."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except ImportError:
        return shutil.which("g++") or shutil.which("c++")
    except Exception:  # Inductor raises its own InvalidCxxCompiler
        return None


def _configured_compiler() -> str | None:
    """The C++ compiler Inductor finds with its current ``cpp.cxx`` setting, or None."""
    from torch._inductor import config

    cxx = config.cpp.cxx
    return _cpp_compiler(tuple(cxx) if isinstance(cxx, (list, tuple)) else (cxx,))


def require_compiler(device_types: set[str]) -> None:
    """Raise :class:`CompilerMissingError`, naming the fix, unless kernels can be compiled
    for every device type given."""
    if "cpu" in device_types and _configured_compiler() is None:
        raise CompilerMissingError(
            'engine="compiled" needs a C++ compiler for CPU tensors and torch.compile found none. '
            'Install one (e.g. g++: "apt-get install g++"), or use engine="foreach" (no compiler needed).'
        )
    if device_types - {"cpu"}:
        from torch.utils._triton import has_triton

        if not has_triton():
            raise CompilerMissingError(
                f'engine="compiled" needs Triton for {sorted(device_types - {"cpu"})} tensors and it is not '
                'installed. Install triton, or use engine="foreach".'
            )


def _coefficients(
    values: Sequence[object], device: torch.device, work_dtype: torch.dtype = torch.float64
) -> tuple[Tensor, ...]:
    """The kernel inputs for a recording's scalar operands, in order.

    A Python number becomes a 0-d tensor on the CPU: float64, which the kernel rounds to the
    working dtype exactly as eager torch rounds the number, or, for float32 kernels on the CPU,
    float32 already: eager torch rounds a scalar operand (a number or a 0-d tensor) of a
    float32 operation to float32 before its loop, so rounding it here gives the same operand,
    and spares the kernel a load and a conversion of every coefficient in every iteration of
    its loop (10-20% of an Adam step on data in cache). On CUDA, Inductor passes a CPU
    tensor to the kernel as an argument, where a tensor on the GPU would cost a copy to it
    (and a wait for the GPU) every step. Numbers recur from step to step (a learning rate,
    ``1 - rho``), so their tensors are kept and reused, one per position: one call never gets
    the same tensor twice, which torch.compile would guard on."""
    dtype = _coefficient_dtype(device, work_dtype)
    return tuple(
        _tensor_coefficient(value, device, dtype)
        if isinstance(value, Tensor)
        else number_tensor(position, float(cast(Real, value)), dtype)
        for position, value in enumerate(values)
    )


def _coefficient_dtype(device: torch.device, work_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if work_dtype == torch.float32 and device.type == "cpu" else torch.float64


def _step_coefficients(
    values: Sequence[Scalar], device: torch.device, work_dtype: torch.dtype, numbers: StepNumbers
) -> tuple[Tensor, ...]:
    """:func:`_coefficients` for a later step of a kept recording: on the CPU, where the
    kernel reads them at once, numbers are written into the recording's
    :class:`~._chain.StepNumbers` instead of looked up or made."""
    held = numbers.hold(values, _coefficient_dtype(device, work_dtype)) if device.type == "cpu" else None
    return _coefficients(values, device, work_dtype) if held is None else held


def _tensor_coefficient(value: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A 0-d tensor hyperparameter, on the kernel's device (as eager torch reads it there);
    on the CPU in ``dtype`` when that is float32 (see :func:`_coefficients`)."""
    if device.type == "cpu":
        return value.to(dtype) if dtype == torch.float32 else value
    return value if value.device == device else value.to(device)


def _rounded(expression: str, dtype: torch.dtype) -> str:
    """Kernel source rounding ``expression`` to the 16-bit ``dtype``."""
    return f"{expression}.to({dtype})"


@functools.cache
def _eager_rounds_scalar(op: str, dtype: torch.dtype, device: torch.device, kind: ScalarKind) -> bool:
    """Whether eager ``op(tensor, scalar)`` on a 16-bit tensor rounds the scalar to ``dtype``
    before computing in float32, as found by trying it once per process. Torch is not
    uniform: on CPU ``add`` and ``sub`` round a scalar, ``mul`` and ``div`` do not; on CUDA a
    Python number is not rounded and a 0-d tensor on the device is."""
    if op not in ("add", "sub", "mul", "div"):
        return False
    tensor, scalar = probe_operands(dtype, device, kind)
    rounded = ELEMENTWISE[op](tensor.float(), float(torch.tensor(PROBE_SCALAR, dtype=dtype))).to(dtype)
    return torch.equal(ELEMENTWISE[op](tensor, scalar), rounded)


@dataclass(frozen=True)
class _Program:
    """A recorded chain as kernel source: one per wiring, whatever the step's scalars."""

    header: str
    body: tuple[str, ...]
    results: dict[str, str]  # role -> the name of its new value in the source
    dtypes: dict[str, torch.dtype]  # role -> its buffer's dtype

    @functools.cached_property
    def writing_source(self) -> str:
        """The kernel that writes its results into its inputs."""
        tail = [f"    {role}.copy_({name})" for role, name in self.results.items() if name != f"w_{role}"]
        return "\n".join([self.header, *self.body, *tail]) + "\n"

    @functools.cached_property
    def returning_source(self) -> str:
        """The kernel that returns its results, in the buffers' dtypes."""
        values = [f"{name}.to({self.dtypes[role]})" for role, name in self.results.items()]
        return "\n".join([self.header, *self.body, f"    return ({', '.join(values)},)"]) + "\n"


def _program(
    graph: Graph,
    leaves: dict[str, Symbol],
    outputs: dict[str, Symbol],
    dtypes: dict[str, torch.dtype],
    work_dtype: torch.dtype,
    device: torch.device,
) -> tuple[_Program, tuple[Tensor, ...]]:
    """The kernel program of a recorded chain, and the coefficients to call it with. A step
    records its chain again with this step's scalars (a learning rate, a bias correction):
    the source is generated once per wiring of the recording, and only the coefficients are
    new."""
    for role, value in outputs.items():
        graph.output(role, value)
    leaf_nodes = tuple(leaf.node.index for leaf in leaves.values())
    key = (graph.wiring(), leaf_nodes, tuple(dtypes.items()), work_dtype, device)
    template = _SOURCES.get(key)
    if template is None:
        template = _generate(graph, leaves, dtypes, work_dtype, device)
        if len(_SOURCES) >= _KEPT_SOURCES:
            _SOURCES.clear()  # one atomic step, whatever other threads do meanwhile
        _SOURCES[key] = template
    return template, _coefficients(graph.scalars(), device, work_dtype)


_RECORDINGS: KeptRecordings[tuple[_Program, tuple[Tensor, ...]]] = KeptRecordings(64)
"""Programs and coefficients of recorded chains, by recording key."""

_KEPT_SOURCES = 256
_SOURCES: dict[Hashable, _Program] = {}
"""Generated programs by wiring (at most
:data:`_KEPT_SOURCES`, then emptied)."""


def _generate(
    graph: Graph,
    leaves: dict[str, Symbol],
    dtypes: dict[str, torch.dtype],
    work_dtype: torch.dtype,
    device: torch.device,
) -> _Program:
    """Print the recording (its results named already) as the body of a kernel whose inputs
    are the leaves, then the scalars in :meth:`Graph.scalars` order (``c0``, ``c1``, ...)."""
    names: dict[int, str] = {}
    body: list[str] = []
    for role, leaf in leaves.items():
        cast_to = "" if dtypes[role] == work_dtype else f".to({work_dtype})"
        names[leaf.node.index] = f"w_{role}"
        body.append(f"    w_{role} = {role}{cast_to}")
    # A result is called new_<role> (the first role it is named for), unless that name is taken.
    taken = {*leaves, *names.values()}
    result_names: dict[int, str] = {}
    for role, result in graph.outputs.items():
        if result.index not in names and result.index not in result_names and f"new_{role}" not in taken:
            result_names[result.index] = f"new_{role}"
    scalars = 0
    for node in graph.nodes:
        if node.op == "leaf":
            continue
        args = []
        for arg in node.args:
            if isinstance(arg, Node):
                args.append(names[arg.index])
                continue
            name = f"c{scalars}"
            scalars += 1
            if work_dtype in _OPMATH_FLOAT32 and _eager_rounds_scalar(node.op, work_dtype, device, scalar_kind(arg)):
                name = _rounded(name, work_dtype)
            args.append(name)
        names[node.index] = result_names.get(node.index, f"v{node.index}")
        if work_dtype in _OPMATH_FLOAT32:
            # Eager torch computes a 16-bit operation in float32 and rounds its result
            # once: the same here, so that fused operations still round one by one.
            call = _rounded(f"op_{node.op}({', '.join(f'{a}.float()' for a in args)})", work_dtype)
        else:
            call = f"op_{node.op}({', '.join(args)})"
        body.append(f"    {names[node.index]} = {call}")
    inputs = [*leaves, *(f"c{k}" for k in range(scalars))]
    results = {role: names[node.index] for role, node in graph.outputs.items()}
    return _Program(f"def kernel({', '.join(inputs)}):", tuple(body), results, dtypes)


@functools.cache
def _compiled(source: str, parallel: bool, device_type: str) -> Callable[..., Any]:
    """Compile a kernel's source once per process (Inductor caches its code on disk too)."""
    # The kernel calls each operation as ``op_<name>``: the one table of what a recorded
    # operation computes (``formula.ELEMENTWISE``).
    namespace: dict[str, Any] = {"torch": torch, **{f"op_{name}": fn for name, fn in ELEMENTWISE.items()}}
    filename = f"<torchupdates kernel {hash(source) & 0xFFFFFFFF:08x}>"
    # Known to linecache, the source shows in tracebacks, and torch.compile sees a function
    # with a source file: torch before 2.12 wraps a function without one in a helper that
    # every such function shares, so all kernels would count against one recompile limit.
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), namespace)
    options = _compile_options(parallel, device_type)
    return torch.compile(namespace["kernel"], dynamic=True, fullgraph=True, options=options)


def _compile_options(parallel: bool, device_type: str) -> dict[str, str | int | bool | Callable[..., Any]]:
    from torch._inductor import config

    numerics = getattr(config, "eager_numerics", None)
    exact = {f"eager_numerics.{name}": True for name in _EAGER_NUMERICS if hasattr(numerics, name)}
    isa = remembered_vector_isa_options(_configured_compiler()) if device_type == "cpu" else {}
    return {**_COMPILE_OPTIONS, **exact, **_THREADS[parallel], **isa}


def _batch_key(slot: Slot) -> tuple[Any, ...]:
    return (
        slot.group,
        slot.param.device,
        slot.work_dtype,
        slot.param.dtype,
        slot.steps,
        slot.applies,
        tuple(slot.state),
    )


def _point_grad_at(param: Tensor, view: Tensor) -> bool:
    """Make ``param.grad`` the bucket's ``view`` (its values already copied there) when the
    gradient is a plain tensor laid out like the view; say whether it was."""
    grad = param.grad
    if grad is None or type(grad) not in PLAIN_TENSORS or view.stride() != grad.stride():
        return False
    param.grad = view
    return True


def _addresses(tensors: Sequence[Tensor]) -> list[int]:
    return list(map(Tensor.data_ptr, tensors))


_LAYOUT, _SHAPE = operator.attrgetter("layout"), operator.attrgetter("shape")
_DTYPE, _DEVICE = operator.attrgetter("dtype"), operator.attrgetter("device")


def _all_fit(grads: Sequence[Tensor], params: Sequence[Tensor]) -> bool:
    """Whether every gradient is a plain dense tensor that :func:`fits` its parameter, for a
    batch whose parameters share one dtype and device: the same checks by C-level loops."""
    dtype, device = params[0].dtype, params[0].device
    return (
        all(map(PLAIN_TENSORS.__contains__, map(type, grads)))
        and all(map(operator.is_, map(_LAYOUT, grads), repeat(torch.strided)))
        and all(map(operator.eq, map(_SHAPE, grads), map(_SHAPE, params)))
        and all(map(operator.is_, map(_DTYPE, grads), repeat(dtype)))
        and all(map(operator.eq, map(_DEVICE, grads), repeat(device)))
    )


def _lie_in(addresses: Sequence[int], bounds: Sequence[tuple[int, int]]) -> bool:
    """Whether any address lies in any of the ``[low, high)`` ranges."""
    if not addresses:
        return False
    lowest, highest = min(addresses), max(addresses)
    return any(lowest < high and low <= highest and any(low <= a < high for a in addresses) for low, high in bounds)


def _common_count(counters: Tensor) -> int | None:
    """The step count every member's counter holds (one buffer per key), or None when
    they differ; read on the host once, whole when it is short."""
    if counters.numel() <= 64:
        values = counters.tolist()
        return values[0] if min(values) == max(values) else None
    low, high = (int(bound) for bound in torch.aminmax(counters))
    return low if low == high else None


def _all_are(tensors: Sequence[object], expected: Sequence[object]) -> bool:
    return len(tensors) == len(expected) and all(map(operator.is_, tensors, expected))


class _Run:
    """One batch of a step whose tensors were all views of their bucket's ranges afterwards:
    the next step can skip building slots, as long as :meth:`unchanged` holds."""

    def __init__(
        self,
        bucket: FlatBucket,
        members: Sequence[Slot],
        stages: Sequence[Stage],
        positions: Sequence[int],
        grad_views: Sequence[Tensor | None],
    ) -> None:
        first = members[0]
        self.bucket = bucket
        self.first = first
        self.params = [slot.param for slot in members]
        # Where the members stand among their group's stepped parameters: one slice when
        # they are neighbours there; batches of other dtypes can lie between them.
        start = positions[0]
        contiguous = list(positions) == list(range(start, start + len(positions)))
        self.positions: slice | list[int] = slice(start, start + len(positions)) if contiguous else list(positions)
        # Each member's .grad where it is the bucket's view, else None (read or copied at every
        # step); None for all: the kernel reads each step's gradients where they are (no
        # gradient buffer).
        self.grads = list(grad_views) if "grad" in bucket.roles else None
        # Each member's .grad found by the last step when not the bucket's view: see copy_grads.
        self.last_grads: list[weakref.ref[Tensor] | None] = [
            None if view is not None or slot.param.grad is None else weakref.ref(slot.param.grad)
            for slot, view in zip(members, grad_views, strict=True)
        ]
        self.entries: Sequence[Mapping[str, Any]] = ()
        self.addresses = _addresses(self.params)
        self.held: dict[str, list[Tensor]] = {}
        self.state_values: list[Tensor] = []
        for key in first.state:
            self.held[key] = [slot.state[key] for slot in members]
        self.counter_keys = [
            stage.step_key
            for stage, t in zip(stages, first.steps, strict=True)
            if stage.step_key is not None and t is not None
        ]
        for key in self.counter_keys:
            self.held[key] = [slot.counters[key] for slot in members]
        self.counts: dict[str, int] = {}  # each counter key's count, as unchanged() read it

    def members_of(self, group: Sequence[Tensor]) -> Sequence[Tensor]:
        """The tensors at the members' positions of a list of the group's stepped
        parameters (or their gradients), whose length was checked."""
        if isinstance(self.positions, slice):
            return group[self.positions]
        return [group[i] for i in self.positions]

    def unchanged(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], entries: Sequence[Mapping[str, Any]]
    ) -> list[int] | None:
        """The members whose ``.grad`` must be copied in (none where the bucket keeps no
        gradients), when everything else is still the bucket's views (nothing replaced, no
        ``.data`` of a parameter reassigned), the step counters agree and each gradient a
        kernel would read where it is fits its parameter; ``None`` otherwise. ``grads`` are the
        parameters' ``.grad`` now, ``entries`` their state dictionaries.

        A new gradient tensor (torch's ``zero_grad()`` sets ``.grad`` to None, backward makes a
        new one) is the common case and is copied here, after the checks a step makes of any
        gradient: a plain dense tensor of the parameter's shape, dtype and device.
        """
        if _addresses(params) != self.addresses:
            return None
        # State tensors are the optimizer's: replacing one (load_state_dict, an assignment) is
        # caught by identity; nothing outside reassigns their .data. Every value of every entry
        # as last time is one pass; otherwise the held tensors are looked up key by key.
        try:
            values: list[Any] = list(chain.from_iterable(map(dict.values, cast("list[dict[str, Any]]", entries))))
        except TypeError:  # not plain dicts
            values = []
        if not values or not _all_are(values, self.state_values):
            try:
                for key, held in self.held.items():
                    if not _all_are(list(map(operator.itemgetter(key), entries)), held):
                        return None
            except KeyError:  # a state entry was removed
                return None
            self.state_values = values
        counts = {}
        for key in self.counter_keys:
            count = _common_count(self.bucket.counters[key])
            if count is None:
                return None
            counts[key] = count
        self.counts = counts
        if self.grads is None:
            return [] if _all_fit(grads, params) else None
        # A gradient held from the last step is the bucket's own view, so its identity is the
        # check; a member whose .grad is not (held None) is always moved.
        if _all_are(grads, self.grads):
            return []
        moved = [i for i, (grad, held) in enumerate(zip(grads, self.grads, strict=True)) if grad is not held]
        for i in moved:
            if not (type(grads[i]) in PLAIN_TENSORS and fits(grads[i], params[i])):
                return None  # the ordinary step checks it and says what is wrong
        return moved

    def copy_grads(
        self, moved: Sequence[int], grads: Sequence[Tensor], engine: CompiledEngine, repoint: bool
    ) -> dict[int, Tensor]:
        """Bring the gradients ``grads[i]`` of ``moved`` members (those that are not the
        bucket's views) to the kernel. Return those it reads where they are, by member index
        (:meth:`CompiledEngine.gradients_read_in_place`); copy the others into the bucket.

        With ``repoint`` (the gradients are the parameters' ``.grad``), a ``.grad`` found again
        (the same tensor as at the last step: a loop that keeps its gradients) is copied and
        becomes the bucket's view, so that later steps neither copy it nor call the kernel for
        it alone. A new one (torch's default ``zero_grad()``, at every step) is read where it
        is when large, else only copied: a view made for it would be dropped by the next
        ``zero_grad()``. Gradients passed to ``step()`` are the caller's: never re-pointed.
        """
        bucket, last = self.bucket, self.last_grads
        new = {i: grads[i] for i in moved}
        kept = {i for i, grad in new.items() if (seen := last[i]) is not None and seen() is grad} if repoint else set()
        outside = engine.gradients_read_in_place(bucket, [i for i in new if i not in kept], new)
        for i in outside:
            del new[i]
        if new:
            views = bucket.views("grad")
            torch._foreach_copy_([views[i] for i in new], list(new.values()))
        if not repoint:
            return outside
        held = cast("list[Tensor | None]", self.grads)
        for i, grad in chain(new.items(), outside.items()):
            if i in kept and _point_grad_at(self.params[i], bucket.view("grad", i)):
                held[i], last[i] = self.params[i].grad, None
            else:
                last[i] = weakref.ref(grad)
        return outside

    def steps(self, stages: Sequence[Stage]) -> tuple[int | None, ...]:
        """The step numbers of this step, one past the counts :meth:`unchanged` read."""
        return tuple(
            None if t is None else self.counts[stage.step_key] + 1  # type: ignore[index]
            for stage, t in zip(stages, self.first.steps, strict=True)
        )


@dataclass(frozen=True)
class _Repeat:
    """A checked plan to step again: every batch's run, the members whose new ``.grad``
    must be copied into the bucket first, and the gradients of each batch (read where they
    are by a bucket without gradients)."""

    runs: list[_Run]
    copies: list[list[int]]
    grads: list[Sequence[Tensor]]
    given: bool  # the gradients were passed to step(), not read from .grad

    def gradient_buffers(self) -> list[Tensor] | None:
        """The flat gradient buffers, when they hold every gradient of the step already (no
        new ``.grad`` to copy in): the same values, in one tensor per batch."""
        if any(self.copies) or any(run.grads is None for run in self.runs):
            return None
        return [run.bucket.buffers["grad"] for run in self.runs]


class CompiledEngine:
    """``engine="compiled"``: the buffers and kernels of one optimizer.

    Every step batches the slots as the foreach engine does (param group, device, dtypes,
    step counts, which stages apply), keeps one :class:`FlatBucket` per batch between
    steps, and runs one kernel per batch. In a step, the parameters and state of a batch
    become views of its buffers (and gradients too when they are ``.grad``), so later steps
    copy nothing; anything replaced since the last step is copied in first.

    :meth:`prepare_repeat` and :meth:`run_repeat` are the steady state: when nothing was
    replaced since the last step, they run the kernels without the per-parameter work of
    building and checking slots.
    """

    def __init__(self) -> None:
        self._buckets: dict[Hashable, FlatBucket] = {}
        self._runs: list[_Run] | None = None
        self._state_seen: tuple[Mapping[Tensor, Any], list[Tensor], list[Any]] | None = None

    def __call__(
        self,
        stages: Sequence[Stage],
        slots: Sequence[Slot],
        hyperparameters: Sequence[Sequence[dict[str, Any]]],
        write: bool = False,
    ) -> Iterator[Batch]:
        batches: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        group_starts: dict[int, int] = {}  # the slots list each group's parameters in turn
        for index, slot in enumerate(slots):
            batches[_batch_key(slot)].append(index)
            group_starts.setdefault(slot.group, index)
        runs: list[_Run] | None = []
        self.forget()
        for key, indices in batches.items():
            members = [slots[i] for i in indices]
            if not self.takes(members):
                runs = None
                for batch in self.elsewhere(stages, members, hyperparameters, write):
                    yield [(indices[i], pairs) for i, pairs in batch]
                continue
            bucket = self._bucket(key, members)
            if write:
                grad_views = self._step(stages, members, bucket, hyperparameters[members[0].group])
                if runs is not None and grad_views is not None:
                    positions = [i - group_starts[members[0].group] for i in indices]
                    runs.append(_Run(bucket, members, stages, positions, grad_views))
                else:
                    runs = None
                yield [(i, []) for i in indices]
            else:
                program, coefficients = self._record(
                    stages, hyperparameters[members[0].group], members[0], members[0].steps, bucket
                )
                yield list(zip(indices, self._propose(stages, members, bucket, program, coefficients), strict=True))
        if write:
            self._runs = runs

    def forget(self) -> None:
        """Drop the plan to repeat the last step (the next step is an ordinary one)."""
        self._runs, self._state_seen = None, None

    def may_repeat(self) -> bool:
        """Whether the last step left a plan that :meth:`prepare_repeat` may follow."""
        return bool(self._runs)

    def takes(self, members: Sequence[Slot]) -> bool:
        """Whether a batch runs in flat buffers here (not when no member has an element)."""
        return any(slot.param.numel() for slot in members)

    def elsewhere(
        self,
        stages: Sequence[Stage],
        members: Sequence[Slot],
        hyperparameters: Sequence[Sequence[dict[str, Any]]],
        write: bool,
    ) -> Iterator[Batch]:
        """The batches :meth:`takes` refuses, run another way."""
        return propose_reference(stages, members, hyperparameters, write)

    def grads_in_bucket(self, device: torch.device) -> bool:
        """Whether buckets on ``device`` keep the gradients too (copied in when replaced, and
        ``.grad`` made their views), rather than a kernel reading them where they are."""
        return True

    def gradients_in_place_from(self, device: torch.device) -> int | None:
        """From how many elements on a new ``.grad`` on ``device`` is read where it is by the
        steady state's kernel, rather than copied into the bucket (None: never)."""
        return GRADIENTS_IN_PLACE_FROM if device.type == "cpu" else None

    def run_kernel(
        self,
        stages: Sequence[Stage],
        hyperparameters: Sequence[dict[str, Any]],
        first: Slot,
        steps: tuple[Any, ...],
        bucket: FlatBucket,
        grads: Sequence[Tensor] | None = None,
    ) -> None:
        """Step the batch whose first member is ``first`` in its bucket's buffers, in place,
        with step numbers ``steps``: the compiled kernel of its chain. ``grads``: the members'
        gradients, where the bucket keeps none (:meth:`grads_in_bucket`)."""
        kernel, coefficients = self._kernel(stages, hyperparameters, first, steps, bucket)
        kernel(*bucket.buffers.values(), *coefficients)

    def _run_kernel_in_pieces(
        self,
        stages: Sequence[Stage],
        hyperparameters: Sequence[dict[str, Any]],
        first: Slot,
        steps: tuple[Any, ...],
        bucket: FlatBucket,
        outside: Mapping[int, Tensor],
    ) -> None:
        """:meth:`run_kernel`, with the gradients of members ``outside`` read from these
        tensors instead of the gradient buffer: one call per such member, one per stretch of
        the buffers between them (:meth:`FlatBucket.pieces`)."""
        kernel, coefficients = self._kernel(stages, hyperparameters, first, steps, bucket)
        for piece in bucket.pieces("grad", outside):
            kernel(*piece, *coefficients)

    def _kernel(
        self,
        stages: Sequence[Stage],
        hyperparameters: Sequence[dict[str, Any]],
        first: Slot,
        steps: tuple[Any, ...],
        bucket: FlatBucket,
    ) -> tuple[Callable[..., Any], tuple[Tensor, ...]]:
        """The writing kernel of the batch's chain for ``bucket`` and this step's coefficients."""
        program, coefficients = self._record(stages, hyperparameters, first, steps, bucket)
        return _compiled(program.writing_source, bucket.parallel, bucket.device.type), coefficients

    def prepare_repeat(
        self,
        params: Sequence[Sequence[Tensor]],
        grads: Sequence[Sequence[Tensor]],
        state: Mapping[Tensor, Mapping[str, Any]],
        given: bool = False,
    ) -> _Repeat | None:
        """Whether the next step can repeat the last one: a plan for :meth:`run_repeat` when
        nothing changed since, else None. Writes nothing.

        ``params`` are the parameters that have a gradient, per param group, and ``grads``
        those gradients: their ``.grad``, or (``given``) gradients passed to ``step()``. Any
        tensor replaced, a parameter that gained or lost its gradient, or anything else that
        differs gives None: the caller then steps the ordinary way.
        """
        runs = self._runs
        if not runs:
            return None
        planned = [0] * len(params)
        for run in runs:
            planned[run.first.group] += len(run.params)
        if any(len(live) != count for live, count in zip(params, planned, strict=True)):
            return None
        # Looking a tensor up in the state dictionary costs a Python-level hash per parameter;
        # when the dictionary holds the same entries as last time, last time's lookups hold.
        seen = self._state_seen
        trusted = (
            seen is not None
            and seen[0] is state
            and len(state) == len(seen[1])
            and all(map(operator.is_, state, seen[1]))
            and all(map(operator.is_, state.values(), seen[2]))
        )
        looked_up, copies, run_grads = [], [], []
        bounds = [  # of the buffers a kernel writes
            (buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size())
            for run in runs
            for role, buffer in run.bucket.buffers.items()
            if role != "grad"
        ]
        for run in runs:
            live, live_grads = run.members_of(params[run.first.group]), run.members_of(grads[run.first.group])
            if not _all_are(live, run.params):
                return None
            try:
                run_entries = run.entries if trusted else list(map(state.__getitem__, live))
            except KeyError:
                return None
            moved = run.unchanged(live, live_grads, run_entries)
            if moved is None:
                return None
            read = live_grads if run.grads is None else [live_grads[i] for i in moved]
            if _lie_in(list(map(Tensor.data_ptr, read)), bounds):
                return None  # a gradient is the memory of a target: the ordinary step copies it first
            looked_up.append(run_entries)
            copies.append(moved)
            run_grads.append(live_grads)
        for run, run_entries in zip(runs, looked_up, strict=True):
            run.entries = run_entries
        if not trusted:
            self._state_seen = (state, list(state), list(state.values()))
        return _Repeat(runs, copies, run_grads, given)

    def run_repeat(
        self, plan: _Repeat, stages: Sequence[Stage], hyperparameters: Sequence[Sequence[dict[str, Any]]]
    ) -> bool:
        """Step again by ``plan``, with this step's ``stages`` and hyperparameters; False (and
        nothing written) when the last step ran another chain (with or without the clipping
        stage), so the caller steps the ordinary way."""
        if any(len(run.first.steps) != len(stages) for run in plan.runs):
            return False
        for run, moved, grads in zip(plan.runs, plan.copies, plan.grads, strict=True):
            outside = run.copy_grads(moved, grads, self, repoint=not plan.given) if moved else {}
            steps = run.steps(stages)
            group_values = hyperparameters[run.first.group]
            if outside:
                self._run_kernel_in_pieces(stages, group_values, run.first, steps, run.bucket, outside)
            else:
                in_place = None if run.grads is not None else grads
                self.run_kernel(stages, group_values, run.first, steps, run.bucket, in_place)
            for key, t in zip((s.step_key for s in stages), steps, strict=True):
                if key is not None and t is not None:
                    run.bucket.counters[key].fill_(t)
        return True

    def _bucket(self, key: tuple[Any, ...], members: Sequence[Slot]) -> FlatBucket:
        first = members[0]
        ids = tuple(id(slot.param) for slot in members)
        full_key = (key[:4], key[5:], ids)  # everything but the step counts
        bucket = self._buckets.get(full_key)
        if bucket is None or any(a is not b for a, b in zip(bucket.params, (s.param for s in members), strict=True)):
            roles = {"param": real(first.param).dtype}
            if self.grads_in_bucket(first.param.device):
                roles["grad"] = real(first.grad).dtype
            roles.update({key: real(tensor).dtype for key, tensor in first.state.items()})
            device = first.param.device
            # On the CPU large members come first: the kernel's pieces (gradients read in place)
            # and the eager engine's packed groups then find the small ones side by side.
            large_first = GRADIENTS_IN_PLACE_FROM if device.type == "cpu" else None
            bucket = FlatBucket([slot.param for slot in members], roles, device, PARALLEL_ELEMENTS, large_first)
            # A parameter belongs to one bucket: drop older buckets of any of these parameters.
            taken = set(ids)
            self._buckets = {k: b for k, b in self._buckets.items() if not taken & {id(p) for p in b.params}}
            self._buckets[full_key] = bucket
        return bucket

    @staticmethod
    def _record(
        stages: Sequence[Stage],
        hyperparameters: Sequence[dict[str, Any]],
        first: Slot,
        steps: tuple[Any, ...],
        bucket: FlatBucket,
    ) -> tuple[_Program, tuple[Tensor, ...]]:
        """The kernel program of the batch's chain and this step's coefficients: recorded
        again, unless a step already recorded the chain with the same number hyperparameters
        (:func:`~._chain.recording_key`). Its program is kept, with its coefficients, or with
        this step's read again when the chain counts steps (:func:`~._chain.step_scalars`)."""
        chain_key = recording_key(stages, hyperparameters, steps, first.applies, first.work_dtype)
        kept_as = (
            None if chain_key is None else (*chain_key, tuple(first.state), tuple(bucket.roles.items()), bucket.device)
        )
        kept = _RECORDINGS.get(kept_as, stages)
        if kept is not None:
            recorded, numbers = kept
            if not counts_steps(steps):
                return recorded
            scalars = step_scalars(stages, hyperparameters, steps, first.applies, tuple(first.state))
            return recorded[0], _step_coefficients(scalars, bucket.device, first.work_dtype, numbers)
        graph = Graph()
        leaves = {role: graph.leaf(role) for role in bucket.roles}
        state = {key: leaves[key] for key in first.state}
        proposal, new_state = run_chain(
            stages,
            hyperparameters,
            leaves["param"],
            leaves["grad"],
            cast("dict[str, Any]", state),
            steps,
            first.applies,
        )
        outputs = {"param": cast(Symbol, proposal), **cast("dict[str, Symbol]", new_state)}
        recorded = _program(graph, leaves, outputs, bucket.roles, first.work_dtype, bucket.device)
        _RECORDINGS.put(kept_as, stages, recorded)
        return recorded

    @staticmethod
    def _propose(
        stages: Sequence[Stage],
        members: Sequence[Slot],
        bucket: FlatBucket,
        program: _Program,
        coefficients: tuple[Tensor, ...],
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """The update dictionary's pairs: results in new buffers, nothing the user sees written."""
        inputs = {"param": [s.param for s in members], "grad": [s.grad for s in members]}
        inputs.update({key: [s.state[key] for s in members] for key in members[0].state})
        for role in bucket.roles:  # the buffers' order
            bucket.gather(role, inputs[role])
        kernel = _compiled(program.returning_source, bucket.parallel, bucket.device.type)
        results = dict(zip(program.results, kernel(*bucket.buffers.values(), *coefficients), strict=True))
        pairs = []
        for i, slot in enumerate(members):
            span = bucket.spans[i]
            own = [(slot.param, span.view(results["param"]))]
            own += [(slot.state[key], span.view(results[key])) for key in slot.state if key in results]
            pairs.append(own + pairs_for_slot(stages, slot, None, {}))
        return pairs

    def _step(
        self,
        stages: Sequence[Stage],
        members: Sequence[Slot],
        bucket: FlatBucket,
        hyperparameters: Sequence[dict[str, Any]],
    ) -> list[Tensor | None] | None:
        """Write one batch's step. When every parameter, state tensor and step counter is now
        a view of the bucket, return each member's ``.grad`` where it is the bucket's view
        (None where it is not, or the bucket keeps no gradients); else None."""
        targets = {"param": [s.param for s in members], **{k: [s.state[k] for s in members] for k in members[0].state}}
        grads = [s.grad for s in members]
        outside = self.gradients_read_in_place(bucket, range(len(members)), grads)
        # Role by role, in the buffers' order; each tensor adopted as soon as it is copied in.
        copied_back: dict[str, list[int]] = {}
        moved_grads: list[int] = []
        for role in bucket.roles:
            if role == "grad":
                moved_grads = bucket.gather("grad", grads, skip=outside)
            else:
                copied_back[role] = bucket.take(role, targets[role])
        adopted = not any(copied_back.values())
        first = members[0]
        with torch.no_grad():
            if outside:
                self._run_kernel_in_pieces(stages, hyperparameters, first, first.steps, bucket, outside)
            else:
                in_place = None if "grad" in bucket.roles else grads
                self.run_kernel(stages, hyperparameters, first, first.steps, bucket, in_place)
            for role, indices in copied_back.items():
                for i in indices:
                    local(targets[role][i]).copy_(bucket.view(role, i))
            # Only .grad is ours to re-point; a gradient passed to step() is the caller's.
            views: list[Tensor | None] = [
                None if i in outside or slot.grad is not slot.param.grad else slot.grad
                for i, slot in enumerate(members)
            ]
            for i in moved_grads:
                slot = members[i]
                pointed = views[i] is not None and _point_grad_at(slot.param, bucket.view("grad", i))
                views[i] = slot.param.grad if pointed else None
            for stage, t in zip(stages, first.steps, strict=True):
                if stage.step_key is not None and t is not None:
                    counters = [slot.counters[stage.step_key] for slot in members]
                    adopted = bucket.set_counters(stage.step_key, t, counters) and adopted
        if not adopted:
            return None
        return views if "grad" in bucket.roles else [None] * len(members)

    def gradients_read_in_place(
        self, bucket: FlatBucket, candidates: Iterable[int], grads: Mapping[int, Tensor] | Sequence[Tensor]
    ) -> dict[int, Tensor]:
        """Which of the ``candidates`` (member indices) a kernel reads where their gradient
        ``grads[i]`` is, rather than copied into the bucket: large enough
        (:meth:`gradients_in_place_from`), laid out as their range and outside the buffers,
        and not leaving a stretch of one element between kernel calls."""
        in_place_from = self.gradients_in_place_from(bucket.device)
        if in_place_from is None or "grad" not in bucket.roles:
            return {}
        large = [i for i in candidates if grads[i].numel() >= in_place_from]
        large = [i for i in large if bucket.readable_in_place("grad", i, grads[i])]
        return {i: grads[i] for i in bucket.keep_pieces_long(large)}
