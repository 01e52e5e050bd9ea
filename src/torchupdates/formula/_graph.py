"""The recording graph: :class:`Node` (what was recorded), :class:`Symbol` (what formulas compute
on) and :class:`Graph` (the nodes of one recording, in order, with its named results), and
:class:`ScalarTape`, which keeps only a recording's scalars.

A formula applied to symbols runs no arithmetic: each operator appends a node to the graph and
returns a new symbol standing for its result. An engine then reads the nodes and runs them its
own way (:mod:`torchupdates.formula` shows one run). Nodes hold no values: what a leaf stands
for at run time is the engine's business.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from numbers import Real
from typing import TypeGuard

from torch import Tensor

from ._ops import scalar_kind

Scalar = float | int | Tensor
"""A hyperparameter or coefficient: a Python number or a 0-d tensor."""


def is_scalar(value: object) -> TypeGuard[float | Tensor]:
    """Whether ``value`` can be a scalar operand of a recorded operation."""
    if type(value) is float or type(value) is int:  # the common case, without an ABC check
        return True
    if isinstance(value, Tensor):
        return value.dim() == 0
    return isinstance(value, Real) and not isinstance(value, bool)


@dataclass(frozen=True, eq=False, repr=False)
class Node:
    """One recorded operation, or a leaf (an input).

    Attributes
    ----------
    op : str
        ``"leaf"``, or the operation: a key of :data:`~torchupdates.formula.ELEMENTWISE`.
    args : tuple
        The operands in the order the operation takes them: earlier nodes and scalars
        (:data:`Scalar`).
    index : int
        The node's position in :attr:`Graph.nodes`; an operand's index is always smaller.
    name : str or None
        A leaf's name (``"param"``, ``"grad"``, a state key), when it was given one.
    """

    op: str
    args: tuple[Node | Scalar, ...]
    index: int
    name: str | None = None

    def __repr__(self) -> str:
        if self.op == "leaf":
            return f"%{self.index} = leaf({self.name!r})"
        operands = ", ".join(f"%{arg.index}" if isinstance(arg, Node) else repr(arg) for arg in self.args)
        return f"%{self.index} = {self.op}({operands})"


def _operand_wiring(arg: Node | Scalar) -> Hashable:
    """An operand's place in a graph's wiring: its node's index, or its scalar's kind."""
    return arg.index if isinstance(arg, Node) else (scalar_kind(arg),)


class Graph:
    """The operations of one recording, in the order they were written.

    Attributes
    ----------
    nodes : list of Node
        Every leaf and operation; ``nodes[i].index == i``.
    outputs : dict of str to Node
        The named results (:meth:`output`), in the order they were named.
    """

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.outputs: dict[str, Node] = {}

    def leaf(self, name: str | None = None) -> Symbol:
        """A new input, optionally named (the name shows in generated code)."""
        return self.record("leaf", (), name)

    def record(self, op: str, args: tuple[Node | Scalar, ...], name: str | None = None) -> Symbol:
        """Append a node and return the symbol that stands for its result."""
        node = Node(op, args, len(self.nodes), name)
        self.nodes.append(node)
        return Symbol(self, node)

    def last_reads(self) -> list[int]:
        """For each node, the index of the last node that reads it (-1: none does). A run may
        free or reuse a node's memory once that node has executed."""
        last = [-1] * len(self.nodes)
        for node in self.nodes:
            for arg in node.args:
                if isinstance(arg, Node):
                    last[arg.index] = node.index
        return last

    def wiring(self) -> tuple[Hashable, ...]:
        """The recording without its scalars' values: each node's operation, name, and which
        node or kind of scalar (:func:`scalar_kind`) each operand is, plus the named results.
        Two recordings with equal wiring differ at most in the values of :meth:`scalars`, so
        code generated from one serves the other."""
        nodes = tuple((node.op, node.name, tuple(_operand_wiring(arg) for arg in node.args)) for node in self.nodes)
        return nodes, tuple((name, node.index) for name, node in self.outputs.items())

    def scalars(self) -> tuple[Scalar, ...]:
        """Every scalar operand, node by node and operand by operand."""
        return tuple(arg for node in self.nodes for arg in node.args if not isinstance(arg, Node))

    def output(self, name: str, value: Symbol) -> Node:
        """Name ``value`` a result of the recording (``"param"``, a state key) and return its node."""
        if value.graph is not self:
            raise ValueError("a result must be recorded in the graph it is named in")
        self.outputs[name] = value.node
        return value.node

    def __repr__(self) -> str:
        lines = [repr(node) for node in self.nodes]
        lines += [f"{name} = %{node.index}" for name, node in self.outputs.items()]
        return "\n".join(lines)


_UNRECORDED = Node("leaf", (), -1)


class ScalarTape(Graph):
    """A graph that keeps only the scalar operands of what is recorded on it, in the order of
    :meth:`Graph.scalars`: no nodes, no wiring.

    An engine that kept what it made from a recording of a chain (a program whose inputs are
    the recording's scalars) runs the chain again on a tape at the next step to read the new
    scalars (a bias correction that depends on the step number), in a fraction of the time of
    a recording. That holds while the chain's wiring is the same, which the engine's key
    ensures: formulas use the step number only in scalar arithmetic, never to branch.
    """

    def __init__(self) -> None:
        super().__init__()
        self._scalars: list[Scalar] = []
        self._result = Symbol(self, _UNRECORDED)  # every result alike: nothing reads its node

    def record(self, op: str, args: tuple[Node | Scalar, ...], name: str | None = None) -> Symbol:
        for arg in args:
            if not isinstance(arg, Node):
                self._scalars.append(arg)
        return self._result

    def scalars(self) -> tuple[Scalar, ...]:
        return tuple(self._scalars)

    def wiring(self) -> tuple[Hashable, ...]:
        raise TypeError("a ScalarTape keeps no wiring")


class Symbol:
    """What a formula computes on while it is recorded: a handle on one node of a graph.

    Its operators (``+ - * /``, unary ``-``, ``abs()``) and methods (:meth:`sqrt`,
    :meth:`maximum`) record a node and return the symbol of the result; the other operand is a
    symbol of the same graph or a scalar (:data:`Scalar`). Each is one IEEE operation per
    element; the only rewrites are those IEEE arithmetic makes exact (operands of ``+`` and
    ``*`` swapped, ``x - s`` as ``x + (-s)``, ``s - x`` as ``(-x) + s``).
    """

    __slots__ = ("graph", "node")

    def __init__(self, graph: Graph, node: Node) -> None:
        self.graph = graph
        self.node = node

    def __repr__(self) -> str:
        return f"Symbol({self.node!r})"

    def _record(self, op: str, *args: Symbol | Scalar) -> Symbol:
        operands: list[Node | Scalar] = [self.node]
        for arg in args:
            if isinstance(arg, Symbol):
                if arg.graph is not self.graph:
                    raise ValueError("symbols of different graphs cannot be combined")
                operands.append(arg.node)
            else:
                operands.append(arg)
        return self.graph.record(op, tuple(operands))

    def __add__(self, other: object) -> Symbol:
        if isinstance(other, Symbol) or is_scalar(other):
            return self._record("add", other)
        return NotImplemented

    __radd__ = __add__  # IEEE addition is commutative

    def __sub__(self, other: object) -> Symbol:
        if isinstance(other, Tensor) and other.dim() == 0:
            # No Tensor overload of _foreach_sub; x - s and x + (-s) are the same IEEE result.
            return self._record("add", -other)
        if isinstance(other, Symbol) or is_scalar(other):
            return self._record("sub", other)
        return NotImplemented

    def __rsub__(self, other: object) -> Symbol:
        if is_scalar(other):
            # s - x is defined by IEEE as s + (-x); negation is exact.
            return self._record("neg")._record("add", other)
        return NotImplemented

    def __mul__(self, other: object) -> Symbol:
        if isinstance(other, Symbol) or is_scalar(other):
            return self._record("mul", other)
        return NotImplemented

    __rmul__ = __mul__  # IEEE multiplication is commutative

    def __truediv__(self, other: object) -> Symbol:
        if isinstance(other, Symbol) or is_scalar(other):
            return self._record("div", other)
        return NotImplemented

    def __neg__(self) -> Symbol:
        return self._record("neg")

    def __abs__(self) -> Symbol:
        return self._record("abs")

    def sqrt(self) -> Symbol:
        return self._record("sqrt")

    def maximum(self, other: Symbol) -> Symbol:
        return self._record("maximum", other)
