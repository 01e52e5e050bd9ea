"""Running a recording over lists of tensors with ``torch._foreach_*`` kernels.

Recording first lets the run reuse memory: an operation whose operand is read by nothing later
writes its result into that operand's buffer, and in a step the buffers of the parameters and
state being replaced serve once their old values are read for the last time. Every operation
is one elementwise IEEE operation per element, in the order written, whatever buffer receives
it, so results are bitwise those of the plain-tensor run.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._graph import Graph, Node, Scalar, Symbol
from ._ops import COMMUTATIVE, FOREACH


class ForeachGraph:
    """A :class:`Graph` whose leaves are bound to lists of tensors (of one device and dtype),
    run by multi-tensor kernels. The tensors are kept here, beside the graph, not in its nodes."""

    def __init__(self) -> None:
        self.graph = Graph()
        self._tensors: dict[int, list[Tensor]] = {}
        self._writable: set[int] = set()

    def leaf(self, tensors: Sequence[Tensor], writable: bool = False, name: str | None = None) -> Symbol:
        """An input bound to ``tensors``. ``writable``: its tensors are replaced by an output of
        this run, so once read for the last time they may hold intermediate values and that output."""
        symbol = self.graph.leaf(name)
        self._tensors[symbol.node.index] = list(tensors)
        if writable:
            self._writable.add(symbol.node.index)
        return symbol

    def run(self, outputs: Sequence[tuple[Symbol, Symbol | None]]) -> list[tuple[list[Tensor], bool]]:
        """Execute the recorded operations and return each output's tensors.

        ``outputs`` pairs each wanted symbol with the leaf it replaces (``None``: it replaces
        nothing here). Each result comes with whether it already lies in that leaf's tensors
        (written in place); otherwise the caller writes it.
        """
        return _Run(self, self._tensors, self._writable).run(outputs)

    def compute(self, node: Node, operands: list[list[Tensor] | Scalar]) -> list[Tensor] | None:
        """A hook for engines: the tensors of ``node`` computed from its ``operands`` (tensor
        lists for nodes, scalars as recorded) into new tensors, or ``None`` (as here) to let the
        run pick the foreach kernel, in place where a buffer is free. An engine overrides it
        where a kernel would not compute the operation as eager torch does."""
        return None


class _Run:
    """One execution: the tensors of each node and the buffer (a writable leaf or the node
    itself) that holds them, by node index."""

    def __init__(self, lists: ForeachGraph, tensors: dict[int, list[Tensor]], writable: set[int]) -> None:
        self.lists = lists
        nodes = self.nodes = lists.graph.nodes
        self.writable = writable
        self.values: list[list[Tensor]] = [tensors.get(node.index, []) for node in nodes]
        self.buffer: list[int | None] = [node.index if node.index in writable else None for node in nodes]
        self.last_read = lists.graph.last_reads()
        self.kept: set[int] = set()
        self.replaces: dict[int, int] = {}

    def run(self, outputs: Sequence[tuple[Symbol, Symbol | None]]) -> list[tuple[list[Tensor], bool]]:
        self.kept = {value.node.index for value, _ in outputs}
        self.replaces = {
            value.node.index: leaf.node.index
            for value, leaf in outputs
            if leaf is not None and leaf.node.index in self.writable
        }
        for node in self.nodes:
            if node.op != "leaf":
                self._execute(node)
        return [
            (
                self.values[value.node.index],
                leaf is not None
                and self.buffer[value.node.index] == leaf.node.index
                and leaf.node.index in self.writable,
            )
            for value, leaf in outputs
        ]

    def _tensors(self, arg: Node | Scalar) -> list[Tensor] | Scalar:
        return self.values[arg.index] if isinstance(arg, Node) else arg

    def _execute(self, node: Node) -> None:
        computed = self.lists.compute(node, [self._tensors(arg) for arg in node.args])
        if computed is not None:
            self.values[node.index], self.buffer[node.index] = computed, node.index
            return
        out_of_place, in_place = FOREACH[node.op]
        operands = list(node.args)
        candidates = [0, 1] if node.op in COMMUTATIVE and isinstance(operands[-1], Node) else [0]
        for position in candidates:
            target = operands[position]
            assert isinstance(target, Node)
            if self._reusable(target, node):
                values = [] if len(operands) == 1 else [self._tensors(operands[1 - position])]
                in_place(self.values[target.index], *values)
                self.values[node.index], self.buffer[node.index] = self.values[target.index], self.buffer[target.index]
                return
        first = operands[0]
        assert isinstance(first, Node)
        rest = [self._tensors(arg) for arg in operands[1:]]
        self.values[node.index] = list(out_of_place(self.values[first.index], *rest))
        self.buffer[node.index] = node.index

    def _reusable(self, operand: Node, node: Node) -> bool:
        buffer = self.buffer[operand.index]
        if buffer is None or self.last_read[operand.index] != node.index or operand.index in self.kept:
            return False
        owner = self.nodes[buffer]
        if owner.op == "leaf":
            # A leaf's tensors may hold intermediates and, at the end, only its own new value.
            return node.index not in self.kept or self.replaces.get(node.index) == owner.index
        return True
