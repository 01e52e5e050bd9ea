"""The language update formulas are written in, and its recording.

A rule's formula is a Python function written once with ordinary operators and :func:`sqrt`,
:func:`square` and :func:`maximum` (``rho * acc + (1 - rho) * square(g)``). Given tensors it
computes the step at once, one eager torch call per operator. Given :class:`Symbol` operands it
computes nothing: each operator appends a :class:`Node` (an operation, its operands, its index)
to a :class:`Graph`, and an engine then runs the nodes its own way, over many parameters at once.
Every operation is one elementwise IEEE operation per element, in the order written, and means
the same thing everywhere (:data:`ELEMENTWISE`), so every engine computes the same bits.

This package imports nothing else of torchupdates; the rest of the library builds on it.

* :mod:`._graph`: :class:`Node`, :class:`Symbol` (the handle a formula computes on, which
  records into its graph), :class:`Graph` (the nodes in order; named leaves and results) and
  :class:`ScalarTape` (a graph keeping only the scalars: a known chain's new coefficients).
* :mod:`._ops`: what each operation computes, on a tensor (:data:`ELEMENTWISE`) and on lists
  of tensors (:data:`FOREACH`).
* :mod:`._math`: :func:`sqrt`, :func:`square` and :func:`maximum` for numbers, tensors and symbols.
* :mod:`._sqrt`: correctly rounded square roots of float32/16 tensors on CPU.
* :mod:`._foreach`: :class:`ForeachGraph`, a graph whose leaves are lists of tensors, run by
  ``torch._foreach_*`` kernels with buffers reused.
* :mod:`._tensor`: :class:`TensorGraph`, a graph whose leaves are single tensors, run one eager
  call per operation (the reference engine's run).

Examples
--------
Record ``p - lr * g / sqrt(a + eps)`` on symbolic operands and name its result:

>>> import torch
>>> from torchupdates.formula import ELEMENTWISE, Graph, Node, sqrt
>>> graph = Graph()
>>> p, g, a = graph.leaf("param"), graph.leaf("grad"), graph.leaf("a")
>>> lr, eps = 0.5, 1e-8
>>> graph.output("param", p - lr * g / sqrt(a + eps))
%7 = sub(%0, %6)
>>> graph
%0 = leaf('param')
%1 = leaf('grad')
%2 = leaf('a')
%3 = mul(%1, 0.5)
%4 = add(%2, 1e-08)
%5 = sqrt(%4)
%6 = div(%3, %5)
%7 = sub(%0, %6)
param = %7

``lr * g`` was recorded as ``mul(g, lr)``: IEEE multiplication is commutative, bit for bit.
A node refers to its operands, nodes or scalars, and holds no values:

>>> node = graph.nodes[6]
>>> node.op, node.args[0] is graph.nodes[3], node.args[1].index
('div', True, 5)

An engine gives each leaf a value and runs the nodes in order. The simplest run, one eager
call per node (the reference engine's, :class:`TensorGraph`); the foreach engine does the same
with multi-tensor kernels (:class:`ForeachGraph`) or, on CPU, a generated program of these
calls with ``out=`` over cache-sized chunks; the compiled engine generates one line of kernel
source per node (``v6 = op_div(v3, v5)``) and lets ``torch.compile`` fuse them:

>>> inputs = {"param": torch.tensor([1.0, 2.0]), "grad": torch.tensor([0.5, -1.0]), "a": torch.tensor([4.0, 0.25])}
>>> values = []
>>> for node in graph.nodes:
...     if node.op == "leaf":
...         values.append(inputs[node.name])
...     else:
...         operands = [values[arg.index] if isinstance(arg, Node) else arg for arg in node.args]
...         values.append(ELEMENTWISE[node.op](*operands))
>>> {name: values[node.index] for name, node in graph.outputs.items()}
{'param': tensor([0.8750, 3.0000])}

The same formula on the tensors themselves gives the same values, computed at once. (Not quite
always: eager torch rounds a 16-bit tensor times a 0-d tensor by operand order, and the
recording holds the scalar second; see :mod:`torchupdates.formula._tensor`.)

>>> inputs["param"] - lr * inputs["grad"] / sqrt(inputs["a"] + eps)
tensor([0.8750, 3.0000])
"""

from ._foreach import ForeachGraph
from ._graph import Graph, Node, Scalar, ScalarTape, Symbol, is_scalar
from ._math import Array, Value, maximum, sqrt, square
from ._ops import COMMUTATIVE, ELEMENTWISE, FOREACH, PROBE_SCALAR, ScalarKind, probe_operands, scalar_kind
from ._sqrt import needs_wide_sqrt, numpy_sqrt, sqrt_tensor
from ._tensor import TensorGraph

__all__ = [
    "COMMUTATIVE",
    "ELEMENTWISE",
    "FOREACH",
    "PROBE_SCALAR",
    "Array",
    "ForeachGraph",
    "Graph",
    "Node",
    "Scalar",
    "ScalarKind",
    "ScalarTape",
    "Symbol",
    "TensorGraph",
    "Value",
    "is_scalar",
    "maximum",
    "needs_wide_sqrt",
    "numpy_sqrt",
    "probe_operands",
    "scalar_kind",
    "sqrt",
    "sqrt_tensor",
    "square",
]
