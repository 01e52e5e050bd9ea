"""The formula language (``torchupdates.formula``): its recording, its foreach run, its layering."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import torch

import torchupdates
from torchupdates import registry
from torchupdates._groups import stage_values
from torchupdates.engines._chain import run_chain, step_scalars
from torchupdates.formula import (
    ForeachGraph,
    Graph,
    Node,
    ScalarTape,
    Symbol,
    TensorGraph,
    maximum,
    sqrt,
    square,
)

FORMULA = Path(torchupdates.__file__).parent / "formula"


def test_the_formula_layer_imports_nothing_above_it() -> None:
    for path in sorted(FORMULA.glob("*.py")):
        for statement in ast.walk(ast.parse(path.read_text())):
            if isinstance(statement, ast.ImportFrom):
                assert statement.level <= 1, f"{path.name} imports from above the formula package"
                assert statement.level == 1 or not (statement.module or "").startswith("torchupdates"), path.name
            elif isinstance(statement, ast.Import):
                assert not any(alias.name.startswith("torchupdates") for alias in statement.names), path.name


def test_nodes_record_operations_in_order_with_names() -> None:
    graph = Graph()
    p, g = graph.leaf("param"), graph.leaf("grad")
    result = p - 0.5 * g
    assert isinstance(result, Symbol) and isinstance(result.node, Node)
    assert [node.op for node in graph.nodes] == ["leaf", "leaf", "mul", "sub"]
    assert [node.index for node in graph.nodes] == [0, 1, 2, 3]
    assert graph.nodes[0].name == "param" and graph.nodes[2].name is None
    assert result.node.args == (graph.nodes[0], graph.nodes[2])
    assert graph.nodes[2].args == (graph.nodes[1], 0.5)  # IEEE multiplication commutes
    assert graph.output("param", result) is result.node
    assert graph.outputs == {"param": result.node}
    assert repr(graph).splitlines()[-2:] == ["%3 = sub(%0, %2)", "param = %3"]


def _sgd_momentum(learning_rate: object, momentum: object) -> Graph:
    graph = Graph()
    p, g, v = graph.leaf("param"), graph.leaf("grad"), graph.leaf("velocity")
    x = momentum * v + (p - learning_rate * g)
    graph.output("param", x)
    graph.output("velocity", x - p)
    return graph


def test_wiring_is_the_recording_without_its_scalar_values() -> None:
    # Engines generate code once per wiring and pass each step's scalars to it.
    first, later = _sgd_momentum(0.1, 0.9), _sgd_momentum(0.05, torch.tensor(0.9))
    assert first.scalars() == (0.9, 0.1)  # node by node: momentum * v first
    assert float(later.scalars()[0]) == pytest.approx(0.9) and later.scalars()[1] == 0.05
    assert _sgd_momentum(0.2, 0.5).wiring() == first.wiring()
    assert later.wiring() != first.wiring()  # a 0-d tensor is another kind of scalar than a number
    assert _sgd_momentum(0.05, torch.tensor(0.5)).wiring() == later.wiring()
    swapped = Graph()
    p, g, v = swapped.leaf("param"), swapped.leaf("grad"), swapped.leaf("velocity")
    x = 0.9 * v + (p - 0.1 * g)
    swapped.output("param", x)
    swapped.output("velocity", p - x)  # another operation order
    assert swapped.scalars() == first.scalars() and swapped.wiring() != first.wiring()


def test_exact_rewrites() -> None:
    graph = Graph()
    x = graph.leaf("x")
    shifted = (x - torch.tensor(0.25)).node  # x - s as x + (-s)
    assert shifted.op == "add" and float(shifted.args[1]) == -0.25
    minus = (2.0 - x).node  # s - x as (-x) + s
    negated = minus.args[0]
    assert minus.op == "add" and minus.args[1] == 2.0 and isinstance(negated, Node) and negated.op == "neg"


def test_symbols_of_two_graphs_do_not_mix() -> None:
    a, b = Graph().leaf("a"), Graph().leaf("b")
    with pytest.raises(ValueError, match="different graphs"):
        a + b
    with pytest.raises(ValueError, match="graph it is named in"):
        Graph().output("x", a)


def test_math_functions_on_numbers_tensors_and_symbols() -> None:
    assert sqrt(4.0) == 2.0
    assert torch.equal(sqrt(torch.tensor([4.0])), torch.tensor([2.0]))
    assert torch.equal(square(torch.tensor([3.0])), torch.tensor([9.0]))
    graph = Graph()
    a, b = graph.leaf("a"), graph.leaf("b")
    assert [sqrt(a).node.op, square(a).node.op, maximum(a, b).node.op] == ["sqrt", "mul", "maximum"]
    with pytest.raises(TypeError, match="maximum"):
        maximum(a, torch.tensor([1.0]))  # type: ignore[type-var]


def _adam_like(p: Any, g: Any, m: Any, v: Any) -> tuple[Any, Any, Any]:
    m2 = 0.9 * m + (1 - 0.9) * g
    v2 = 0.999 * v + 0.001 * square(g)
    return p - 0.01 * m2 / (sqrt(v2) + 1e-8), m2, v2


def _everything(p: Any, g: Any, a: Any, b: Any) -> tuple[Any, Any, Any]:
    y = maximum(abs(g), -a) / (2.0 - sqrt(abs(b) + 1.0))
    return -(p - y * torch.tensor(0.1)), b - y, 1.0 - a


@pytest.mark.parametrize("formula", [_adam_like, _everything])
# 16-bit lists: torch's in-place foreach kernels round some scalars first (the foreach engine's concern).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("writable", [False, True])
def test_foreach_graph_equals_the_formula_on_tensors(formula: Any, dtype: torch.dtype, writable: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (1,)]
    inputs = [[torch.randn(shape, generator=generator).to(dtype) for shape in shapes] for _ in range(4)]
    inputs[3] = [t.abs() for t in inputs[3]]  # a second moment
    expected = [formula(*(role[k] for role in inputs)) for k in range(len(shapes))]
    lists = ForeachGraph()
    leaves = [lists.leaf([t.clone() for t in role], writable=writable and i != 1) for i, role in enumerate(inputs)]
    results = formula(*leaves)
    replaced = [leaves[0], leaves[2], leaves[3]]
    for position, (tensors, in_place) in enumerate(lists.run(list(zip(results, replaced, strict=True)))):
        if in_place:
            assert writable
            assert all(t is u for t, u in zip(tensors, lists._tensors[replaced[position].node.index], strict=True))
        for k, tensor in enumerate(tensors):
            assert torch.equal(tensor.view(-1).view(torch.uint8), expected[k][position].view(-1).view(torch.uint8))
    assert all(torch.equal(t, u) for t, u in zip(lists._tensors[leaves[1].node.index], inputs[1], strict=True))


def test_an_engine_may_compute_an_operation_itself() -> None:
    computed: list[int] = []

    class Eager(ForeachGraph):
        def compute(self, node: Node, operands: list[Any]) -> list[torch.Tensor] | None:
            if node.op != "mul":
                return None
            computed.append(node.index)
            tensors, scalar = operands
            return [torch.mul(t, scalar) for t in tensors]

    lists = Eager()
    original = torch.tensor([1.0, 2.0])
    x = lists.leaf([original], writable=True)
    [(tensors, in_place)] = lists.run([(x * 3.0 + 1.0, x)])
    assert computed == [1]
    assert torch.equal(tensors[0], torch.tensor([4.0, 7.0])) and not in_place  # in the new buffer of x * 3
    assert torch.equal(original, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("formula", [_adam_like, _everything])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_graph_equals_the_formula_on_tensors(formula: Any, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(4, 5, generator=generator).to(dtype) for _ in range(4)]
    inputs[3] = inputs[3].abs()
    graph = TensorGraph()
    leaves = [graph.leaf(t, name) for t, name in zip(inputs, "pgab", strict=True)]
    results = graph.run(list(formula(*leaves)))
    for got, expected in zip(results, formula(*inputs), strict=True):
        assert torch.equal(got.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8))


def test_tensor_graph_takes_a_scalar_second() -> None:
    # float16 g = 1.1 (1.099609375) times a float32 0-d 0.1: eager g * s is 0.10996094, 1801.6
    # float16 steps of 2**-14: 1802 / 16384. s * g rounds 0.1 to float16 (0.0999755859375) first:
    # 0.10993409, 1801.2 steps: 1801 / 16384. The recording holds mul(g, s), so its run gives 1802.
    g, s = torch.tensor([1.1], dtype=torch.float16), torch.tensor(0.1)
    assert float(g * s) == 1802 / 16384 and float(s * g) == 1801 / 16384
    graph = TensorGraph()
    [product] = graph.run([s * graph.leaf(g, "g")])
    assert float(product) == 1802 / 16384


def _chain_of(rule: str, modifiers: tuple[str, ...]) -> Any:
    """A rule's optimizer, with modifiers on top, innermost first."""
    params = [torch.zeros(3, requires_grad=True)]
    entry = registry.RULES[rule]
    required = {spec.name: 0.1 for spec in entry.hyperparameters if spec.default is None}
    opt = entry.factory(params, **required)
    for modifier in modifiers:
        opt = registry.MODIFIERS[modifier].factory(opt)
    return opt


@pytest.mark.parametrize(
    "modifiers", [(), *((name,) for name in registry.MODIFIER_NAMES), tuple(registry.MODIFIER_NAMES)], ids=str
)
@pytest.mark.parametrize("rule", registry.RULE_NAMES)
def test_step_numbers_change_a_chains_scalars_never_its_wiring(rule: str, modifiers: tuple[str, ...]) -> None:
    # The engines keep the program recorded at one step and read later steps' scalars off a
    # ScalarTape (step_scalars): sound only while no formula branches on the step number, and
    # only if the tape meets the scalars in the recording's order.
    opt = _chain_of(rule, modifiers)
    stages = opt._stages
    values = stage_values(opt.param_groups, stages)[0]
    applies = [True] * len(stages)
    keys = [key for stage in stages for key in stage.state_keys.values()]
    wirings, scalars = set(), []
    for t in (1, 2, 7, 10**6):
        steps = [t if stage.step_key is not None else None for stage in stages]
        graph = Graph()
        param, grad = graph.leaf("param"), graph.leaf("grad")
        run_chain(stages, values, param, grad, {key: graph.leaf(key) for key in keys}, steps, applies)
        wirings.add(graph.wiring())
        assert step_scalars(stages, values, steps, applies, keys) == graph.scalars()
        scalars.append(graph.scalars())
    assert len(wirings) == 1
    # A counting chain's scalars do change (Adam's bias correction), so the tape is needed.
    assert (scalars[0] != scalars[1]) == any(stage.step_key is not None for stage in stages)


def test_a_scalar_tape_keeps_the_scalars_in_recording_order_and_no_nodes() -> None:
    tape = ScalarTape()
    _ = 0.9 * tape.leaf("velocity") + (tape.leaf("param") - 0.1 * tape.leaf("grad")) - torch.tensor(2.0)
    assert tape.nodes == []
    assert tape.scalars()[:2] == (0.9, 0.1) and float(tape.scalars()[2]) == -2.0  # x - s is x + (-s)
    with pytest.raises(TypeError, match="no wiring"):
        tape.wiring()
