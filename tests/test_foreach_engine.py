"""The foreach engine's CPU step (compiled programs over chunks) against the reference engine.

Every case is compared bit for bit, parameters and state, after several steps: layouts that
take the direct path (1-D views of large tensors) and the staged path (small tensors packed
into buffers; blocks of large tensors whose gradient or state is laid out differently), dtypes
that are cast on the way (float16 and bfloat16 parameters with float32 state), complex,
0-d and empty parameters, formulas that pass leaves through or swap state, gradients that
share memory with targets, and steps on two threads at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import torchupdates
from compiler import needs_compiler
from torchupdates.engines import _cpu
from torchupdates.engines import foreach as foreach_engine
from torchupdates.engines._program import Program, compile_program
from torchupdates.formula import ELEMENTWISE, FOREACH, Graph, Node
from torchupdates.optimizer import Optimizer
from torchupdates.transform import NON_NEGATIVE, Hyperparameter, Transform

CHUNK = 1000  # elements: tensors below are cut into several chunks of this size

Build = Callable[..., Optimizer]  # (params, engine, state_dtype=...)

CHAINS: dict[str, Build] = {
    "adam": lambda p, e, **k: torchupdates.adam(p, learning_rate=0.01, engine=e, **k),
    "adadelta": lambda p, e, **k: torchupdates.adadelta(p, engine=e, **k),
    "momentum": lambda p, e, **k: torchupdates.momentum(p, 0.01, engine=e, **k),
    "nesterov(amsgrad)": lambda p, e, **k: torchupdates.apply_nesterov_momentum(
        torchupdates.amsgrad(p, 0.01, engine=e, **k), momentum=0.5
    ),
    "momentum(adamax, 2 params)": lambda p, e, **k: torchupdates.apply_momentum(
        torchupdates.adamax(p, engine=e, **k), p[:2]
    ),
    "rmsprop": lambda p, e, **k: torchupdates.rmsprop(p, 0.01, engine=e, **k),
    "adagrad": lambda p, e, **k: torchupdates.adagrad(p, 0.1, engine=e, **k),
    "sgd": lambda p, e, **k: torchupdates.sgd(p, 0.1, engine=e, **k),
}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(foreach_engine, "CPU_CHUNK_ELEMENTS", CHUNK)


@pytest.fixture(params=[1, 3], ids=["inline", "3 workers"])
def workers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Chunks run on the calling thread, or on three worker threads (whatever the machine)."""
    count: int = request.param
    monkeypatch.setattr(foreach_engine, "cpu_workers", lambda: count)
    return count


@pytest.fixture
def fast_path_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The chunked CPU programs that ran: ``run_batch`` (tensors where they are) or
    ``run_flat`` (a flat bucket's parameters and state, the gradients where they are)."""
    calls: list[str] = []

    def count(name: str) -> None:
        original = getattr(_cpu, name)

        def counted(*args: Any, **kwargs: Any) -> bool:
            handled: bool = original(*args, **kwargs)
            if handled:
                calls.append(name)
            return handled

        monkeypatch.setattr(_cpu, name, counted)

    count("run_batch")
    count("run_flat")
    return calls


def _randn(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=generator)
    return torch.randn(shape, generator=generator).to(dtype)


def _layout(tensor: torch.Tensor, how: str) -> torch.Tensor:
    """``tensor``'s values in another memory layout: channels_last, or transposed storage."""
    if how == "channels_last":
        return tensor.contiguous(memory_format=torch.channels_last)
    if how == "transposed":
        return tensor.transpose(0, 1).contiguous().transpose(0, 1)
    return tensor


# name: (shapes, dtype, param layout, grad layout, state_dtype)
CASES: dict[str, tuple[list[tuple[int, ...]], torch.dtype, str, str, torch.dtype | None]] = {
    "direct float32": ([(2003, 3), (4096,), (7,), (1000,), (333, 5)], torch.float32, "", "", None),
    "float64": ([(1500, 2), (5,)], torch.float64, "", "", None),
    "channels_last": ([(8, 16, 6, 5), (3, 4, 2, 2)], torch.float32, "channels_last", "channels_last", None),
    "grads laid out otherwise": ([(8, 16, 6, 5), (40, 60), (3, 3)], torch.float32, "", "transposed", None),
    "params laid out otherwise": ([(40, 60), (50, 30)], torch.float32, "transposed", "", None),
    "float16 with float32 state": ([(1200, 3), (9,)], torch.float16, "", "", torch.float32),
    "bfloat16 with float32 state": ([(1200, 3), (9,)], torch.bfloat16, "", "", torch.float32),
    "float16": ([(1200, 3), (9,)], torch.float16, "", "", None),
    "bfloat16": ([(1200, 3), (9,)], torch.bfloat16, "", "", None),
    "complex": ([(900, 2), (6,)], torch.complex64, "", "", None),
    "0-d and empty": ([(), (0,), (4, 0), (3000,), ()], torch.float32, "", "", None),
    "many small": ([(5,), (17,), (3,), (64,), (100,), (2, 3)] * 5 + [(90,)] * 8, torch.float32, "", "", None),
}


def _problem(case: str, seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], torch.dtype | None]:
    shapes, dtype, param_layout, grad_layout, state_dtype = CASES[case]
    generator = torch.Generator().manual_seed(seed)
    init = [_layout(_randn(s, dtype, generator), param_layout if len(s) >= 2 else "") for s in shapes]
    grads = [
        [_layout(_randn(s, dtype, generator) * 0.1, grad_layout if len(s) >= 2 else "") for s in shapes]
        for _ in range(4)
    ]
    for step in grads[::2]:  # exact zeros here and there: maximum() and accumulators see them
        for g in step:
            g.masked_fill_((torch.arange(g.numel()) % 3 == 0).reshape(g.shape), 0)
    return init, grads, state_dtype


def _leaves(init: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.nn.Parameter(p.detach().clone()) for p in init]  # clone keeps the layout


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (NaNs compare equal when their bits are)."""
    tensor = tensor.detach()
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    if not tensor.is_floating_point():
        return tensor
    return tensor.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def _assert_same(a: Optimizer, pa: list[torch.Tensor], b: Optimizer, pb: list[torch.Tensor]) -> None:
    for i, (x, y) in enumerate(zip(pa, pb, strict=True)):
        assert x.dtype == y.dtype and x.stride() == y.stride(), f"param {i}: layout changed"
        assert torch.equal(_bits(x), _bits(y)), f"param {i} differs"
        sa, sb = a.state.get(x, {}), b.state.get(y, {})
        assert set(sa) == set(sb)
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(_bits(sa[key]), _bits(sb[key])), f"{i}: {key}"


def _run_both(build: Build, case: str) -> None:
    init, grads, state_dtype = _problem(case)
    runs = []
    for engine in ("reference", "foreach"):
        params = _leaves(init)
        opt = build(params, engine, state_dtype=state_dtype)
        for step in grads:
            opt.step([g.clone() for g in step])
        runs.append((opt, params))
    _assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chain", list(CHAINS))
@pytest.mark.usefixtures("workers")
def test_cpu_step_equals_reference(chain: str, case: str, fast_path_calls: list[str]) -> None:
    _run_both(CHAINS[chain], case)
    assert fast_path_calls, "the compiled CPU path did not run"


@pytest.mark.parametrize("chain", ["adam", "adadelta", "nesterov(amsgrad)"])
def test_without_numpy_roots(chain: str, monkeypatch: pytest.MonkeyPatch, fast_path_calls: list[str]) -> None:
    # Where NumPy is missing (or its root is not exact), float32 roots go through float64.
    monkeypatch.setattr(_cpu, "sqrt_mode", lambda dtype: "native" if dtype == torch.float64 else "wide")
    _run_both(CHAINS[chain], "direct float32")
    assert fast_path_calls


def test_cases_have_the_layouts_they_claim() -> None:
    init, grads, _ = _problem("channels_last")
    params = _leaves(init)
    assert params[0].is_contiguous(memory_format=torch.channels_last) and not params[0].is_contiguous()
    init, grads, _ = _problem("grads laid out otherwise")
    assert init[1].is_contiguous() and not grads[0][1].is_contiguous()
    params = _leaves(init)
    opt = torchupdates.adam(params, engine="foreach")
    opt.step(grads[0])
    assert opt.state[params[0]]["m"].is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_params_with_float32_state(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    init = [torch.randn(2100, generator=generator).to(dtype), torch.randn(5, generator=generator).to(dtype)]
    grads = [[torch.randn(p.shape, generator=generator).to(dtype) * 0.1 for p in init] for _ in range(4)]
    runs = []
    for engine in ("reference", "foreach"):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = torchupdates.adadelta(params, engine=engine, state_dtype=torch.float32)
        for step in grads:
            opt.step(step)
        runs.append((opt, params))
    _assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])


def test_updates_and_step_agree(fast_path_calls: list[str]) -> None:
    # updates() runs the tensor-list path (its values must be new tensors); step() the CPU path.
    init, grads, _ = _problem("direct float32")
    pa, pb = _leaves(init), _leaves(init)
    a, b = CHAINS["nesterov(amsgrad)"](pa, "foreach"), CHAINS["nesterov(amsgrad)"](pb, "foreach")
    for step in grads:
        a.step(step)
        calls = len(fast_path_calls)
        torchupdates.apply_updates(b.updates(step))
        assert len(fast_path_calls) == calls
    _assert_same(a, pa, b, pb)


# --- formulas that stress the register allocation --------------------------------------------


def _custom(formula: Callable[..., Any], state: tuple[str, ...]) -> Transform:
    return Transform("custom", (Hyperparameter("learning_rate", 0.1, NON_NEGATIVE),), state, formula)


def _swap(param: Any, grad: Any, state: dict[str, Any], t: None, *, learning_rate: Any) -> Any:
    return param - learning_rate * grad, {"a": state["b"] + grad, "b": state["a"]}


def _pass_grad(param: Any, grad: Any, state: dict[str, Any], t: None, *, learning_rate: Any) -> Any:
    return grad, {"a": state["a"] * learning_rate}


def _identity(param: Any, grad: Any, state: dict[str, Any], t: None, *, learning_rate: Any) -> Any:
    return param, {"a": state["a"]}


def _shared_output(param: Any, grad: Any, state: dict[str, Any], t: None, *, learning_rate: Any) -> Any:
    x = param - learning_rate * grad
    return x, {"a": x, "b": state["a"] - x}


def _read_only_state(param: Any, grad: Any, state: dict[str, Any], t: None, *, learning_rate: Any) -> Any:
    return param - state["a"] * grad - learning_rate, {}


def _everything(param: Any, grad: Any, state: dict[str, Any], t: None, *, learning_rate: Any) -> Any:
    from torchupdates.formula import maximum, sqrt

    y = maximum(abs(grad), -state["a"]) / (2.0 - sqrt(abs(state["b"]) + 1.0))
    return -(param - y * learning_rate), {"a": state["b"] - y, "b": 1.0 - state["a"]}


CUSTOM = {
    "swap": (_swap, ("a", "b")),
    "pass_grad": (_pass_grad, ("a",)),
    "identity": (_identity, ("a",)),
    "shared_output": (_shared_output, ("a", "b")),
    "read_only_state": (_read_only_state, ("a",)),
    "everything": (_everything, ("a", "b")),
}


@pytest.mark.parametrize("name", list(CUSTOM))
def test_custom_formulas(name: str, fast_path_calls: list[str]) -> None:
    formula, state = CUSTOM[name]
    transform = _custom(formula, state)
    generator = torch.Generator().manual_seed(5)
    shapes = [(2500,), (7,), (3, 4)]
    init = [torch.randn(s, generator=generator) for s in shapes]
    grads = [[torch.randn(s, generator=generator) for s in shapes] for _ in range(3)]
    runs = []
    for engine in ("reference", "foreach"):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = Optimizer(params, transform, engine=engine)
        for p in params:  # non-zero state, so that swaps and pass-throughs show
            for key in state:
                opt.state[p][key] = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(key)))
        for step in grads:
            opt.step(step)
        runs.append((opt, params))
    _assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])
    assert fast_path_calls


# --- memory shared between gradients and targets -----------------------------------------------


def test_gradient_is_another_parameters_state(fast_path_calls: list[str]) -> None:
    # Parameter 1's gradient is parameter 0's velocity: read before anything is written, as
    # apply_updates(updates(x)) reads it.
    generator = torch.Generator().manual_seed(6)
    init = [torch.randn(3000, generator=generator), torch.randn(3000, generator=generator)]
    pa, pb = [torch.nn.Parameter(p.clone()) for p in init], [torch.nn.Parameter(p.clone()) for p in init]
    a = torchupdates.momentum(pa, 0.1, engine="foreach")
    b = torchupdates.momentum(pb, 0.1, engine="reference")
    first = [torch.full_like(p, 0.5) for p in init]
    a.step(first)
    b.step(first)
    for _ in range(3):
        a.step([torch.ones(3000), a.state[pa[0]]["velocity"]])
        torchupdates.apply_updates(b.updates([torch.ones(3000), b.state[pb[0]]["velocity"].clone()]))
    _assert_same(a, pa, b, pb)
    assert fast_path_calls


def test_gradient_is_the_parameter_itself() -> None:
    generator = torch.Generator().manual_seed(7)
    init = torch.randn(2500, generator=generator)
    pa, pb = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    a, b = torchupdates.adam([pa], engine="foreach"), torchupdates.adam([pb], engine="reference")
    for _ in range(3):
        a.step([pa.detach()])
        b.step([pb.detach().clone()])
    _assert_same(a, [pa], b, [pb])


# --- threads ----------------------------------------------------------------------------------


def _reference_and_foreach(build: Build, init: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    runs = []
    for engine in ("reference", "foreach"):
        params = _leaves(init)
        opt = build(params, engine)
        for step in grads:
            opt.step([g.clone() for g in step])
        runs.append((opt, params))
    _assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])


@pytest.mark.usefixtures("workers")
def test_workers_mirror_flush_denormal() -> None:
    # Flushing subnormals is a per-thread CPU mode: the workers must compute as the caller does.
    generator = torch.Generator().manual_seed(9)
    init = [torch.randn(5000, generator=generator) * 1e-37, torch.randn(7, generator=generator) * 1e-37]
    grads = [[torch.randn(p.shape, generator=generator) * 1e-37 for p in init] for _ in range(3)]
    build = CHAINS["rmsprop"]  # programs with square roots run on workers
    assert torch.set_flush_denormal(True), "this CPU cannot flush denormals"
    try:
        _reference_and_foreach(build, init, grads)
        flushed = _leaves(init)
        build(flushed, "foreach").step(grads[0])
    finally:
        torch.set_flush_denormal(False)
    _reference_and_foreach(build, init, grads)
    kept = _leaves(init)
    build(kept, "foreach").step(grads[0])
    assert not torch.equal(flushed[0], kept[0])  # the mode mattered


@pytest.mark.usefixtures("workers")
def test_inference_mode() -> None:
    init, grads, _ = _problem("direct float32")
    with torch.inference_mode():
        _reference_and_foreach(CHAINS["adam"], init, grads)


def test_python_dispatch_modes_see_every_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under a dispatch mode the chunks run on the calling thread, where the mode sees them.
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(foreach_engine, "cpu_workers", lambda: 3)
    init, grads, _ = _problem("direct float32")
    with Record():
        _reference_and_foreach(CHAINS["adam"], init, grads)
    assert sum("aten.mul.out" in name for name in seen) >= 4 * len(grads) * 7  # every chunk's products
    assert sum("aten.sqrt.out" in name for name in seen) >= len(grads) * 7  # roots too (not NumPy's)


def test_worker_errors_reach_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(foreach_engine, "cpu_workers", lambda: 2)

    def broken(*args: Any) -> None:
        raise RuntimeError("a chunk failed")

    monkeypatch.setattr(_cpu, "_run_direct", broken)
    params = [torch.nn.Parameter(torch.ones(5000)), torch.nn.Parameter(torch.ones(5000))]
    opt = torchupdates.rmsprop(params, 0.1)
    with pytest.raises(RuntimeError, match="a chunk failed"):
        opt.step([torch.ones(5000), torch.ones(5000)])


def test_worker_count_follows_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert foreach_engine.cpu_workers() == foreach_engine.CPU_MAX_WORKERS
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert foreach_engine.cpu_workers() == 1


def test_two_threads_step_at_once() -> None:
    # Scratch buffers are per thread: optimizers stepping concurrently do not share them.
    generator = torch.Generator().manual_seed(8)
    init = [torch.randn(20_000, generator=generator), torch.randn(50, generator=generator)]
    grads = [[torch.randn(p.shape, generator=generator) for p in init] for _ in range(10)]

    def run(out: list[torch.Tensor]) -> None:
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = torchupdates.adadelta(params, engine="foreach")
        for step in grads:
            opt.step(step)
        out += [p.detach() for p in params]

    expected: list[torch.Tensor] = []
    run(expected)
    results: list[list[torch.Tensor]] = [[] for _ in range(4)]
    threads = [threading.Thread(target=run, args=(r,)) for r in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        assert all(torch.equal(x, y) for x, y in zip(result, expected, strict=True))


# --- the table of operations and the program compiler ---------------------------------------------


def test_elementwise_table_covers_every_recorded_operation() -> None:
    graph = Graph()
    a, b = graph.leaf("a"), graph.leaf("b")
    results = [a + b, a - b, a * b, a / b, a.maximum(b), -a, abs(a), b.sqrt(), 2.0 - a, a - torch.tensor(1.0)]
    nodes = [result.node for result in results]
    assert {node.op for node in nodes} == set(ELEMENTWISE) == set(FOREACH)
    values = {a.node.index: torch.tensor([4.0, -2.0]), b.node.index: torch.tensor([0.5, 3.0])}
    for node in graph.nodes[2:]:
        operands = [values[x.index] if isinstance(x, Node) else x for x in node.args]
        out = torch.empty(2)
        ELEMENTWISE[node.op](*operands, out=out)
        values[node.index] = out
    assert values[nodes[0].index].tolist() == [4.5, 1.0]
    assert values[nodes[-2].index].tolist() == [-2.0, 4.0]


def test_programs_reuse_registers() -> None:
    # Adam: its new m and v go straight into their own registers, the new parameter into the
    # parameter's; two scratch registers carry everything else, nothing is copied at the end.
    graph = Graph()
    leaves = [graph.leaf(name) for name in ("param", "grad", "m", "v")]
    param, grad, m, v = leaves
    m2 = 0.9 * m + 0.1 * grad
    v2 = 0.999 * v + 0.001 * (grad * grad)
    new = param - 0.01 * m2 / (v2.sqrt() + 1e-8)
    program = compile_program(graph, leaves, [True, False, True, True], [(new, 0), (m2, 2), (v2, 3)], "wide")
    assert program.scratch == 2
    assert program.wide
    assert program.source.startswith("def program(param, grad, m, v, r4, r5, w, c0,"), program.source
    copies = [line for line in program.source.splitlines() if ".copy_(" in line and "sqrt(w" not in line]
    assert not copies, program.source  # no register copies
    assert program.outputs == (0, 2, 3)


def test_a_program_serves_every_recording_of_the_same_wiring() -> None:
    # Each step records its chain with that step's scalars; the program is generated once.
    def program(learning_rate: float) -> Program:
        graph = Graph()
        param, grad = graph.leaf("param"), graph.leaf("grad")
        return compile_program(graph, [param, grad], [True, False], [(param - learning_rate * grad, 0)], "native")

    first, later = program(0.5), program(0.25)
    assert later.run is first.run is program(2.0).run
    assert (first.constants, later.constants) == ((0.5,), (0.25,))
    param, grad = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 8.0])
    later.run(param, grad, torch.empty(2), *later.constants)
    assert param.tolist() == [0.0, 0.0]  # the later step's learning rate, not the first's


def test_program_refuses_outputs_into_read_only_leaves() -> None:
    graph = Graph()
    param, grad = graph.leaf("param"), graph.leaf("grad")
    with pytest.raises(ValueError, match="not writable"):
        compile_program(graph, [param, grad], [True, False], [(param - grad, 1)], "native")


def _random_bits(count: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Every kind of value: random bit patterns (NaNs, infinities, subnormals, both zeros) and
    ordinary numbers of many magnitudes."""
    if dtype == torch.float32:
        bits = torch.randint(-(2**31), 2**31 - 1, (count,), dtype=torch.int32, generator=generator).view(dtype)
    else:
        bits = torch.randint(-(2**63), 2**63 - 1, (count,), dtype=torch.int64, generator=generator).view(dtype)
    scales = 10.0 ** torch.randint(-30, 30, (count,), generator=generator).to(dtype)
    ordinary = torch.randn(count, generator=generator, dtype=dtype) * scales
    zeros = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=dtype).repeat(count // 8)
    return torch.cat([bits, ordinary, zeros])


def _run(program: Program, registers: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Run ``program`` with its constants passed as documented on :class:`Program`."""
    scratch = [torch.empty_like(registers[0]) for _ in range(program.scratch)]
    constants: list[Any] = [torch.as_tensor(value).to(dtype) for value in program.constants]
    for position in program.numbers:
        constants[position] = constants[position].item()
    ones = [torch.ones((), dtype=dtype)] if program.one else []
    program.run(*registers, *scratch, *constants, *ones)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_programs_round_every_absorbed_operation(dtype: torch.dtype) -> None:
    # a -/+ c*b, a + (c*b)/d, a - b/d as one addcdiv each; products read twice, or kept as
    # results, stay calls of their own. Checked against the same graph run one operation per
    # call, on every kind of value, NaNs at the same places.
    def graph_and_results() -> tuple[Graph, list[Any], list[Any]]:
        graph = Graph()
        leaves = [graph.leaf(name) for name in ("a", "b", "d", "e", "f", "g")]
        a, b, d, e, f, g = leaves
        twice = b * 0.75
        results = [
            a - b * 0.3,
            b * torch.tensor(-1.7) + d,
            d + (b * 3.1) / e,
            e - a / d,
            f + twice - twice,  # read twice: not absorbed
            g * 1e-3,  # a result itself: not absorbed
        ]
        return graph, leaves, results

    generator = torch.Generator().manual_seed(3)
    inputs = [_random_bits(4000, dtype, generator) for _ in range(6)]
    ran = {}
    for fuse in (False, True):
        graph, leaves, results = graph_and_results()
        outputs = [(result, position) for position, result in enumerate(results)]
        program = compile_program(graph, leaves, [True] * 6, outputs, "native", fuse=fuse)
        registers = [x.clone() for x in inputs]
        _run(program, registers, dtype)
        ran[fuse] = (program, registers)
    fused, unfused = ran[True][0], ran[False][0]
    assert "addcdiv" not in unfused.source
    assert fused.source.count("addcdiv(") == 4, fused.source
    assert fused.source.count("\n") == unfused.source.count("\n") - 5, fused.source
    for got, expected in zip(ran[True][1], ran[False][1], strict=True):
        assert torch.equal(got.isnan(), expected.isnan())
        kept = ~expected.isnan()
        assert torch.equal(got[kept], expected[kept])
        assert torch.equal(got[kept].signbit(), expected[kept].signbit())


@pytest.fixture
def addcdiv_probe() -> Any:
    """The once-per-process check of addcdiv, forgotten before and after the test."""
    from torchupdates.engines import _fusion

    _fusion.addcdiv_rounds_each_operation.cache_clear()
    yield _fusion.addcdiv_rounds_each_operation
    _fusion.addcdiv_rounds_each_operation.cache_clear()


def test_programs_keep_every_operation_where_addcdiv_rounds_once(
    monkeypatch: pytest.MonkeyPatch, addcdiv_probe: Any
) -> None:
    # A torch whose addcdiv rounded a + c*b once (a fused multiply-add) would give other bits:
    # the probe must see it, and the programs then keep the multiply and the subtraction.
    assert addcdiv_probe(torch.float32) and addcdiv_probe(torch.float64)
    addcdiv_probe.cache_clear()
    native = torch.addcdiv

    def rounded_once(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, *, value: float = 1, out: Any = None) -> Any:
        if a.dtype != torch.float32:
            return native(a, b, d, value=value, out=out)
        result = (a.double() + value * b.double() / d.double()).float()
        return result if out is None else out.copy_(result)

    monkeypatch.setattr(torch, "addcdiv", rounded_once)
    assert not addcdiv_probe(torch.float32)
    assert addcdiv_probe(torch.float64)
    assert not _cpu.fuses(torch.float32)
    params = [torch.nn.Parameter(torch.full((3000,), 1.0))]
    params[0].grad = torch.full((3000,), 0.1)
    seen = _ops_seen(lambda: torchupdates.sgd(params, learning_rate=0.3).step())
    assert seen.get("aten::addcdiv", 0) == 0 and seen.get("aten::mul", 0) >= 3
    assert torch.equal(params[0].detach(), torch.full((3000,), 1.0 - 0.1 * 0.3))  # hand-rounded as two operations


def _ops_seen(step: Callable[[], None]) -> dict[str, int]:
    """How many times each ATen operation ran during ``step`` (torch's profiler: no Python
    dispatch mode, under which the engine keeps every operation for the mode to see)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    return {event.key: event.count for event in profile.key_averages()}


@pytest.mark.parametrize("rule", ["sgd", "momentum", "adam"])
def test_cpu_programs_take_one_call_per_fused_sum(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # SGD's step is one addcdiv per chunk, momentum's two addcdiv and one subtraction, Adam's
    # three products where it records six; all equal the reference engine bit for bit
    # (test_cpu_step_equals_reference) whatever the layout.
    monkeypatch.setattr(foreach_engine, "cpu_workers", lambda: 1)  # the profiler sees this thread only
    params = [torch.nn.Parameter(torch.randn(3000, generator=torch.Generator().manual_seed(0)))]
    params[0].grad = torch.randn(3000, generator=torch.Generator().manual_seed(1))
    make = getattr(torchupdates, rule)
    optimizer = make(params, learning_rate=0.01)
    optimizer.step()  # the first step moves the tensors into the buffers
    seen = _ops_seen(optimizer.step)
    chunks = 3  # CHUNK elements each
    expected = {"sgd": (1, 0, 0), "momentum": (2, 0, 1), "adam": (3, 3, 0)}[rule]
    counts = tuple(seen.get(f"aten::{op}", 0) for op in ("addcdiv", "mul", "sub"))
    assert counts == tuple(chunks * n for n in expected), seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("set_to_none", [False, True], ids=["grads kept", "new grads"])
def test_flat_buffer_path_equals_reference(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, set_to_none: bool
) -> None:
    # On a CUDA device the foreach engine keeps plain tensors, gradients included, in the
    # compiled engine's flat buffers and runs its tensor lists over them. Forced onto the CPU
    # here (chains whose operations eager CPU torch rounds correctly: no float32 square root),
    # and checked on CUDA by tests/test_cuda.py for every rule.
    monkeypatch.setattr(foreach_engine.ForeachEngine, "grads_in_bucket", lambda self, device: True)
    monkeypatch.setattr(_cpu, "run_batch", lambda *args: False)  # tensor lists, as on a GPU
    monkeypatch.setattr(_cpu, "run_flat", lambda *args: pytest.fail("the CPU program ran"))
    monkeypatch.setattr(foreach_engine, "FLAT_CHUNK_ELEMENTS", 16)  # several ranges per buffer
    chains: list[Build] = [
        lambda p, e: torchupdates.apply_nesterov_momentum(torchupdates.momentum(p, 0.1, engine=e), p[1:], momentum=0.5)
    ]
    if dtype == torch.bfloat16:  # a square root computed in float32 and rounded to bfloat16
        chains.append(lambda p, e: torchupdates.adam(p, 0.1, engine=e))
    for make in chains:
        runs = []
        for engine in ("reference", "foreach"):
            generator = torch.Generator().manual_seed(0)
            params = [torch.randn(shape, generator=generator).to(dtype).requires_grad_(True) for shape in SHAPES]
            opt = make(params, engine)
            for k in range(5):
                grads = torch.Generator().manual_seed(10 + k)
                for p in params:
                    if set_to_none or p.grad is None:
                        p.grad = torch.randn(p.shape, generator=grads).to(dtype)
                    else:
                        p.grad.copy_(torch.randn(p.shape, generator=grads))
                opt.step()
            runs.append((opt, params))
        (ref, ref_params), (flat, flat_params) = runs
        assert flat._engine_runner().may_repeat()  # the flat path ran, and its steady state
        for p, q in zip(ref_params, flat_params, strict=True):
            assert torch.equal(p.detach(), q.detach())
            for key, value in ref.state[p].items():
                assert torch.equal(value, flat.state[q][key]), key


SHAPES = [(7, 5), (3,), (), (2, 3, 4)]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("set_to_none", [False, True], ids=["grads kept", "new grads"])
def test_cpu_steady_state_reads_gradients_where_they_are(
    monkeypatch: pytest.MonkeyPatch, case: str, set_to_none: bool, fast_path_calls: list[str]
) -> None:
    # On the CPU the foreach engine keeps parameters and state in flat buffers and, from the
    # second step on, steps from .grad without per-parameter slots. The gradients stay the
    # caller's tensors whatever their layout: read where they are, never copied into a buffer
    # or re-pointed, so a gradient changed in place is read anew. Gradients laid out as their
    # parameters, of the buffers' dtype, take run_flat; the others the general path.
    from torchupdates.engines.compiled import CompiledEngine

    repeated: list[bool] = []
    original = CompiledEngine.run_repeat
    monkeypatch.setattr(CompiledEngine, "run_repeat", lambda *a: repeated.append(original(*a)) or repeated[-1])
    init, grads, state_dtype = _problem(case)
    runs = []
    for engine in ("reference", "foreach"):
        params = _leaves(init)
        opt = CHAINS["nesterov(amsgrad)"](params, engine, state_dtype=state_dtype)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                if set_to_none or p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            held = [p.grad for p in params]
            opt.step()
            assert all(p.grad is g for p, g in zip(params, held, strict=True)), "a .grad was re-pointed"
        runs.append((opt, params))
    _assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])
    assert repeated == [True] * (len(grads) - 1)  # the first step builds the buffers
    flat = case in {"direct float32", "float64", "channels_last", "float16", "bfloat16", "0-d and empty", "many small"}
    assert fast_path_calls == ["run_flat" if flat else "run_batch"] * len(grads)


def test_pieces_end_to_end_run_in_place() -> None:
    # Small tensors side by side in one buffer (a flat bucket's ranges) run where they lie;
    # anything else is staged: a gap, another order, another storage, dtype or layout.
    buffer = torch.arange(20.0)
    a, b, c = buffer[0:6].view(2, 3), buffer[6:10], buffer[10:20]
    joined = _cpu._end_to_end([a, b, c], torch.float32, 20)
    assert joined is not None and joined.data_ptr() == buffer.data_ptr() and torch.equal(joined, buffer)
    assert _cpu._end_to_end([a, c], torch.float32, 16) is None  # a gap
    assert _cpu._end_to_end([b, a], torch.float32, 10) is None  # out of order
    assert _cpu._end_to_end([a, b], torch.float64, 10) is None  # another dtype
    assert _cpu._end_to_end([buffer[0:6].view(3, 2).t(), b], torch.float32, 10) is None  # not contiguous
    assert _cpu._end_to_end([b], torch.float32, 4) is None  # one piece: nothing to join
    # The same memory as b, through a storage of its own: the joined view must lie in one.
    other_storage = torch.from_numpy(buffer.numpy()[6:10])
    assert other_storage.data_ptr() == b.data_ptr()
    assert _cpu._end_to_end([a, other_storage], torch.float32, 10) is None


def test_first_step_fills_the_buffers_role_by_role(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first step moves every tensor into the flat buffers. A role's buffer is made only
    # when that role's turn comes, and each tensor becomes a view of it as soon as it is
    # copied (freeing its old memory): the step needs about one buffer more than the tensors
    # themselves, not a second copy of parameters and state at once.
    from torchupdates.engines._flat import FlatBucket

    seen: list[tuple[str, list[str]]] = []
    original = FlatBucket.adopt

    def adopt(self: FlatBucket, role: str, index: int, tensor: torch.Tensor) -> bool:
        seen.append((role, list(self.buffers)))
        return original(self, role, index, tensor)

    monkeypatch.setattr(FlatBucket, "adopt", adopt)
    params = [torch.nn.Parameter(torch.randn(50)) for _ in range(3)]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = torchupdates.adam(params, 0.1)
    opt.step()
    roles = ["param", "m", "v"]
    assert [role for role, _ in seen] == [role for role in roles for _ in params]
    for role, made in seen:  # this role's buffer and those before it, none after
        assert made == roles[: roles.index(role) + 1], (role, made)


@pytest.mark.parametrize("engine", ["foreach", pytest.param("compiled", marks=needs_compiler)])
def test_kept_programs_follow_every_hyperparameter_change(engine: str) -> None:
    # A chain without step counters keeps its program and constants while its hyperparameters
    # stay the same numbers: every change must still reach the next step, 0.0 to -0.0
    # included (-0.0 - 0.0 * 1 is -0.0, -0.0 - (-0.0 * 1) is +0.0).
    p = torch.nn.Parameter(torch.tensor([-0.0, 3.0]))
    opt = torchupdates.sgd([p], 0.0, engine=engine)
    for lr, expected in [
        (0.0, [-0.0, 3.0]),
        (0.0, [-0.0, 3.0]),
        (-0.0, [0.0, 3.0]),
        (0.5, [-0.5, 2.5]),
        (0.5, [-1.0, 2.0]),
    ]:
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.ones(2)
        opt.step()
        assert torch.equal(_bits(p), _bits(torch.tensor(expected))), (lr, p.tolist())
    # A momentum chain, with its other hyperparameter changed too, against the reference.
    runs = []
    for each in ("reference", engine):
        params = [torch.nn.Parameter(torch.linspace(-1, 1, 7)), torch.nn.Parameter(torch.ones(2, 3))]
        opt = torchupdates.nesterov_momentum(params, 0.1, engine=each)
        for k, (lr, momentum) in enumerate([(0.1, 0.9), (0.1, 0.9), (0.05, 0.9), (0.05, 0.5), (0.05, 0.5)]):
            opt.param_groups[0].update(lr=lr, momentum=momentum)
            for i, param in enumerate(params):
                param.grad = torch.full_like(param, 0.1 * (k + i + 1))
            opt.step()
        runs.append((opt, params))
    _assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])


@pytest.mark.parametrize("engine", ["foreach", pytest.param("compiled", marks=needs_compiler)])
def test_chains_that_count_steps_are_recorded_once_per_hyperparameter_values(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Adam's scalars change at every step (its bias correction); its recording does not: the
    # engines record it once per set of hyperparameter values and read each later step's
    # scalars off a ScalarTape. The results stay the reference engine's, bit for bit.
    from torchupdates.engines import _chain

    taped: list[int] = []
    tape = _chain.step_scalars

    def counted(*args: object, **kwargs: object) -> tuple[object, ...]:
        taped.append(1)
        return tape(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_chain, "step_scalars", counted)
    module = "torchupdates.engines._cpu" if engine == "foreach" else "torchupdates.engines.compiled"
    monkeypatch.setattr(f"{module}.step_scalars", counted)
    runs = []
    for each in ("reference", engine):
        params = [torch.nn.Parameter(torch.linspace(-1, 1, 7)), torch.nn.Parameter(torch.ones(2, 3))]
        opt = torchupdates.adam(params, 0.1, engine=each)
        for k in range(6):
            if k == 3:
                opt.param_groups[0]["lr"] = 0.05  # new values: recorded again, once
            for i, param in enumerate(params):
                param.grad = torch.full_like(param, 0.1 * (k + i + 1))
            opt.step()
        runs.append((opt, params))
    _assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])
    assert len(taped) == 4  # steps 2, 3, 5 and 6 kept the recording of step 1 or 4


@pytest.mark.parametrize("engine", ["foreach", pytest.param("compiled", marks=needs_compiler)])
def test_later_steps_of_a_counting_chain_make_no_new_scalar_tensors(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Adam's bias-corrected rate is a new number at every step. The engines write it into the
    # kept recording's tensors instead of making (and caching) a new tensor per step. Two
    # groups with equal hyperparameters share that recording at different step counts (the
    # second added later): each batch must still get its own step's scalars.
    from torchupdates.engines import _chain

    monkeypatch.setattr(_chain, "_NUMBERS", {})  # not the values other tests cached
    runs = []
    for each in ("reference", engine):
        first = [torch.nn.Parameter(torch.linspace(-1, 1, 7)), torch.nn.Parameter(torch.ones(2, 3))]
        later = [torch.nn.Parameter(torch.linspace(2, -2, 5))]
        opt = torchupdates.adam(first, 0.1, engine=each)
        cached = []
        for k in range(8):
            if k == 3:
                opt.add_param_group({"params": later})
            for i, param in enumerate(opt.param_groups[0]["params"] + opt.param_groups[-1]["params"]):
                param.grad = torch.full_like(param, 0.1 * (k + i + 1))
            opt.step()
            cached.append(len(_chain._NUMBERS))
        if each == engine:
            assert cached[5:] == [cached[4]] * 3, cached  # steady: no tensor per step
        runs.append((opt, first + later))
    _assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])


def test_step_numbers_first_held_in_inference_mode_take_values_outside_it() -> None:
    from torchupdates.engines._chain import StepNumbers

    numbers = StepNumbers()
    with torch.inference_mode():
        numbers.hold([1.0, 2.0], torch.float32)
    held = numbers.hold([1e300, 0.25], torch.float32)  # 1e300: written by a copy, not NumPy
    assert [t.item() for t in held] == [float("inf"), 0.25]


_EDGE_NUMBERS = [0.1, -0.0, 0.0, 1e-300, -1e-45, 3.4028234663852886e38, 3.4028235677973366e38, 1e300, -1e300]
_EDGE_NUMBERS += [float("inf"), float("-inf"), float("nan"), 1 / 3, 2**60 + 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("numpy_missing", [False, True])
def test_step_numbers_round_each_value_as_a_new_tensor_would(
    dtype: torch.dtype, numpy_missing: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchupdates.engines._chain import StepNumbers

    if numpy_missing:

        def no_numpy(self: torch.Tensor) -> None:
            raise RuntimeError("Numpy is not available")

        monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)
    numbers = StepNumbers()
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    flipped = [-v if v == 0 else v for v in _EDGE_NUMBERS]  # zeros of the other sign, the rest equal
    for values in (_EDGE_NUMBERS, _EDGE_NUMBERS, flipped, _EDGE_NUMBERS[::-1]):  # over earlier values
        held = numbers.hold(values, dtype)
        expected = [torch.tensor(float(value), dtype=dtype) for value in values]
        assert all(t.dtype == dtype and t.dim() == 0 for t in held)
        assert len({id(t) for t in held}) == len(values)  # one tensor per position
        got = torch.stack(list(held)).view(bits)
        want = torch.stack(expected).view(bits)
        nan = torch.stack(expected).isnan()
        assert torch.equal(got[~nan], want[~nan])
        assert torch.stack(list(held))[nan].isnan().all()


def test_bucket_lists_its_buffers_in_the_roles_order() -> None:
    # Kernels take the buffers in the order of the roles, whichever was made first.
    from torchupdates.engines._flat import FlatBucket

    bucket = FlatBucket(
        [torch.zeros(3), torch.zeros(2, 2)],
        {"param": torch.float32, "grad": torch.float32, "m": torch.float64},
        torch.device("cpu"),
        1 << 16,
    )
    assert bucket.buffers == {}
    for role in ("m", "param", "grad"):
        bucket.view(role, 1).fill_(1.0)
    assert list(bucket.buffers) == ["param", "grad", "m"]
    assert [buffer.dtype for buffer in bucket.buffers.values()] == [torch.float32, torch.float32, torch.float64]
