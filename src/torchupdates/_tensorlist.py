"""Lists of tensors whose arithmetic is recorded, then run by ``torch._foreach_*`` kernels.

Being replaced by :mod:`torchupdates.formula` (:class:`~torchupdates.formula.ForeachGraph`),
which keeps node, handle and values apart; the foreach engine still runs this one.

Rule formulas are written once with ordinary operators (``rho * acc + (1 - rho) * g2``).
Given plain tensors they run one parameter at a time; given :class:`TensorList` operands the
same expression is recorded in a :class:`Graph` and :meth:`Graph.run` executes it over many
parameters per kernel. Recording first lets the run reuse memory: an operation whose operand
is read by nothing later writes its result into that operand's buffer, and in a step the
buffers of the parameters and state being replaced serve once their old values are read for
the last time. Every operator is one elementwise IEEE operation per element, in the order
written, whatever buffer receives it, so results are bitwise those of the plain-tensor run.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .formula._graph import Scalar
from .formula._graph import is_scalar as _is_scalar
from .formula._ops import COMMUTATIVE as _COMMUTATIVE
from .formula._ops import ELEMENTWISE, FOREACH

__all__ = ["ELEMENTWISE", "Graph", "Scalar", "TensorList"]

_KERNELS = FOREACH


class Graph:
    """The operations recorded on the tensor lists of one batch, in the order written."""

    def __init__(self) -> None:
        self.nodes: list[TensorList] = []

    def leaf(self, tensors: Sequence[Tensor], writable: bool = False) -> TensorList:
        """An input. ``writable``: its tensors are replaced by an output of this run, so once
        read for the last time they may hold intermediate values and that output."""
        node = TensorList(self, "leaf", ())
        node.tensors = list(tensors)
        node.writable = writable
        node.buffer = node.index if writable else None
        return node

    def run(self, outputs: Sequence[tuple[TensorList, TensorList | None]]) -> list[tuple[list[Tensor], bool]]:
        """Execute the recorded operations and return each output's tensors.

        ``outputs`` pairs each wanted node with the leaf it replaces (``None``: it replaces
        nothing here). Each result comes with whether it already lies in that leaf's tensors
        (written in place); otherwise the caller writes it.
        """
        last_read = [-1] * len(self.nodes)
        for node in self.nodes:
            for arg in node.args:
                if isinstance(arg, TensorList):
                    last_read[arg.index] = node.index
        kept = {node.index for node, _ in outputs}
        replaces = {node.index: leaf.index for node, leaf in outputs if leaf is not None and leaf.writable}
        for node in self.nodes:
            if node.op != "leaf":
                self._execute(node, last_read, kept, replaces)
        return [
            (node.tensors, leaf is not None and node.buffer == leaf.index and leaf.writable) for node, leaf in outputs
        ]

    def _execute(self, node: TensorList, last_read: list[int], kept: set[int], replaces: dict[int, int]) -> None:
        out_of_place, in_place = _KERNELS[node.op]
        operands = list(node.args)
        candidates = [0, 1] if node.op in _COMMUTATIVE and isinstance(operands[-1], TensorList) else [0]
        for position in candidates:
            target = operands[position]
            assert isinstance(target, TensorList)
            if self._reusable(target, node, last_read, kept, replaces):
                other = operands[1 - position] if len(operands) == 2 else None
                values = [] if other is None else [other.tensors if isinstance(other, TensorList) else other]
                in_place(target.tensors, *values)
                node.tensors, node.buffer = target.tensors, target.buffer
                return
        first = operands[0]
        assert isinstance(first, TensorList)
        rest = [arg.tensors if isinstance(arg, TensorList) else arg for arg in operands[1:]]
        node.tensors = list(out_of_place(first.tensors, *rest))
        node.buffer = node.index

    def _reusable(
        self, operand: TensorList, node: TensorList, last_read: list[int], kept: set[int], replaces: dict[int, int]
    ) -> bool:
        if operand.buffer is None or last_read[operand.index] != node.index or operand.index in kept:
            return False
        owner = self.nodes[operand.buffer]
        if owner.op == "leaf":
            # A leaf's tensors may hold intermediates and, at the end, only its own new value.
            return node.index not in kept or replaces.get(node.index) == owner.index
        return True


class TensorList:
    """Tensors of one device and dtype, combined elementwise; operations are recorded."""

    __slots__ = ("args", "buffer", "graph", "index", "op", "tensors", "writable")

    def __init__(self, graph: Graph, op: str, args: tuple[TensorList | Scalar, ...]) -> None:
        self.graph = graph
        self.op = op
        self.args = args
        self.index = len(graph.nodes)
        self.tensors: list[Tensor] = []
        self.writable = False
        self.buffer: int | None = None
        graph.nodes.append(self)

    def __repr__(self) -> str:
        return f"TensorList({self.op}, node {self.index})"

    def _record(self, op: str, *args: TensorList | Scalar) -> TensorList:
        for arg in args:
            if isinstance(arg, TensorList) and arg.graph is not self.graph:
                raise ValueError("tensor lists of different graphs cannot be combined")
        return TensorList(self.graph, op, (self, *args))

    def __add__(self, other: object) -> TensorList:
        if isinstance(other, TensorList) or _is_scalar(other):
            return self._record("add", other)
        return NotImplemented

    __radd__ = __add__  # IEEE addition is commutative

    def __sub__(self, other: object) -> TensorList:
        if isinstance(other, Tensor) and other.dim() == 0:
            # No Tensor overload of _foreach_sub; x - s and x + (-s) are the same IEEE result.
            return self._record("add", -other)
        if isinstance(other, TensorList) or _is_scalar(other):
            return self._record("sub", other)
        return NotImplemented

    def __rsub__(self, other: object) -> TensorList:
        if _is_scalar(other):
            # s - x is defined by IEEE as s + (-x); negation is exact.
            return self._record("neg")._record("add", other)
        return NotImplemented

    def __mul__(self, other: object) -> TensorList:
        if isinstance(other, TensorList) or _is_scalar(other):
            return self._record("mul", other)
        return NotImplemented

    __rmul__ = __mul__  # IEEE multiplication is commutative

    def __truediv__(self, other: object) -> TensorList:
        if isinstance(other, TensorList) or _is_scalar(other):
            return self._record("div", other)
        return NotImplemented

    def __neg__(self) -> TensorList:
        return self._record("neg")

    def __abs__(self) -> TensorList:
        return self._record("abs")

    def sqrt(self) -> TensorList:
        return self._record("sqrt")

    def maximum(self, other: TensorList) -> TensorList:
        return self._record("maximum", other)
