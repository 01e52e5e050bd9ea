"""One ``torch.addcdiv`` call for two or three recorded operations, where it rounds the same.

On the CPU, torch's float32 and float64 ``addcdiv(a, b, d, value=c)`` computes each element as
``a + c * b / d`` in that order: three IEEE operations, each rounded once (the product, the
quotient, the sum). No fused multiply-add can join the product and the sum: the quotient lies
between them. So one call gives, bit for bit,

* ``a + c*b``, ``c*b + a`` and ``a - c*b``, with ``d`` a 0-d one (``x / 1 == x`` exactly, and
  IEEE defines ``a - y`` as ``a + (-y)``, where ``(-c)*b == -(c*b)``);
* ``a + (c*b)/d`` and ``a - (c*b)/d``;
* ``a + b/d`` and ``a - b/d`` (``value`` 1 or -1: ``1*b == b``).

A chunked program makes one pass over its chunk per call, so each call saved is a pass saved:
SGD's step becomes one call instead of two, momentum's six calls four, Adam's twelve eight.
Whether this torch's kernels round so is checked once per process and dtype
(:func:`addcdiv_rounds_each_operation`): where they do not, programs keep the recorded operations.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..formula import Graph, Node

__all__ = ["Instruction", "Place", "addcdiv_rounds_each_operation", "instructions"]

Place = tuple[int, int]
"""A scalar operand by where it was recorded: (node index, operand position)."""


@dataclass(frozen=True)
class Instruction:
    """One call of a program, computing the value of node ``index``.

    ``op`` is the node's own operation with ``args`` its operands (scalars by :data:`Place`), or
    ``"addcdiv"`` standing for the node and the product or quotient it absorbed: ``args`` is
    ``(a, b, d)``, ``d`` being ``None`` for a one; ``value`` is the place of the scalar ``c``
    (``None``: 1) and ``negate`` whether it enters negated.
    """

    index: int
    op: str
    args: tuple[Node | Place | None, ...]
    value: Place | None = None
    negate: bool = False


def instructions(graph: Graph, results: Iterable[int], fuse: bool) -> list[Instruction]:
    """The calls computing every operation of ``graph``, in order: one per operation, or with
    ``fuse``, one ``addcdiv`` in place of each sum or difference and the product or quotient
    that only it reads. ``results`` are the nodes read after the program (its outputs):
    they are never absorbed."""
    operations = [node for node in graph.nodes if node.op != "leaf"]
    fused: dict[int, Instruction] = {}
    absorbed: set[int] = set()
    if fuse:
        uses = Counter(arg.index for node in operations for arg in node.args if isinstance(arg, Node))
        uses.update(results)
        for node in operations:
            found = _addcdiv(node, uses)
            if found is not None:
                fused[node.index], inner = found
                absorbed.update(inner)
    return [
        fused.get(node.index) or Instruction(node.index, node.op, _places(node))
        for node in operations
        if node.index not in absorbed
    ]


def _places(node: Node) -> tuple[Node | Place, ...]:
    return tuple(arg if isinstance(arg, Node) else (node.index, position) for position, arg in enumerate(node.args))


def _addcdiv(node: Node, uses: Counter[int]) -> tuple[Instruction, list[int]] | None:
    """``node`` (``a + x``, ``x + a`` or ``a - x``) as one ``addcdiv`` absorbing ``x``, and the
    nodes absorbed; ``None`` where ``x`` is no product or quotient read by ``node`` alone."""
    if node.op not in ("add", "sub"):
        return None
    positions = (1, 0) if node.op == "add" else (1,)
    for position in positions:
        term, other = node.args[position], node.args[1 - position]
        if not isinstance(term, Node) or not isinstance(other, Node) or uses[term.index] != 1:
            continue
        found = _scaled(term, uses)
        if found is not None:
            b, value, d, inner = found
            return Instruction(node.index, "addcdiv", (other, b, d), value, node.op == "sub"), inner
    return None


def _scaled(term: Node, uses: Counter[int]) -> tuple[Node, Place | None, Node | None, list[int]] | None:
    """``term`` as ``c*b/d``: ``(b, place of c or None, d or None, nodes absorbed)``."""
    product = _product(term)
    if product is not None:
        return product[0], product[1], None, [term.index]
    if term.op != "div" or not all(isinstance(arg, Node) for arg in term.args):
        return None
    numerator, d = term.args
    assert isinstance(numerator, Node) and isinstance(d, Node)
    product = _product(numerator) if uses[numerator.index] == 1 else None
    if product is not None:
        return product[0], product[1], d, [term.index, numerator.index]
    return numerator, None, d, [term.index]


def _product(node: Node) -> tuple[Node, Place] | None:
    """``node`` as ``c*b`` with ``c`` a scalar: ``(b, place of c)``."""
    if node.op != "mul":
        return None
    for position in (1, 0):
        scalar, b = node.args[position], node.args[1 - position]
        if isinstance(b, Node) and not isinstance(scalar, Node):
            return b, (node.index, position)
    return None


@functools.cache
def addcdiv_rounds_each_operation(dtype: torch.dtype) -> bool:
    """Whether this process's CPU ``addcdiv`` of ``dtype`` gives the bits of the operations it
    stands for, on operands where a fused multiply-add would not (tried once per dtype)."""
    a = torch.linspace(-3.0, 3.0, 4097, dtype=dtype) + 0.5
    b = a.flip(0) * 1.7 - 0.3
    d = a.abs() + 0.7
    c = torch.tensor(0.3, dtype=dtype)
    one = torch.ones((), dtype=dtype)
    value = c.item()
    return (
        torch.equal(torch.addcdiv(a, b, one, value=value), a + b * c)
        and torch.equal(torch.addcdiv(a, b, one, value=-value), a - b * c)
        and torch.equal(torch.addcdiv(a, b, d, value=-value), a - b * c / d)
        and torch.equal(torch.addcdiv(a, b, d, value=1), a + b / d)
    )
