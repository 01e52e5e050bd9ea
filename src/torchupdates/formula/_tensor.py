"""Running a recording on single tensors, one eager torch call per operation: the plainest run,
the one every other run must match bit for bit.

Running the recording, rather than the formula on the tensors themselves, matters for 16-bit
tensors with a 0-d tensor scalar. Eager torch on CPU computes ``g * s`` (a float16 ``g``, a
float32 0-d ``s``) in float32 from ``s`` as it is, but ``s * g`` from ``s`` first rounded to
float16, so a formula's ``learning_rate * grad`` would round as nothing else does. The
recording holds every scalar as the second operand (:class:`~torchupdates.formula.Symbol`'s
exact rewrites), which is how the multi-tensor kernels and the compiled kernels take it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from ._graph import Graph, Node, Symbol
from ._ops import ELEMENTWISE
from ._sqrt import sqrt_tensor

# torch's own CPU float32 square root is not correctly rounded; sqrt_tensor is.
_EAGER: dict[str, Callable[..., Tensor]] = {**ELEMENTWISE, "sqrt": sqrt_tensor}


class TensorGraph:
    """A :class:`Graph` whose leaves are bound to single tensors, run node by node with the
    plain torch function of :data:`~torchupdates.formula.ELEMENTWISE` (square roots correctly
    rounded). The tensors are kept here, beside the graph, not in its nodes."""

    def __init__(self) -> None:
        self.graph = Graph()
        self._tensors: dict[int, Tensor] = {}

    def leaf(self, tensor: Tensor, name: str | None = None) -> Symbol:
        """An input bound to ``tensor``."""
        symbol = self.graph.leaf(name)
        self._tensors[symbol.node.index] = tensor
        return symbol

    def run(self, outputs: Sequence[Symbol]) -> list[Tensor]:
        """Execute the recorded operations and return the tensor of each output."""
        nodes = self.graph.nodes
        last_read = self.graph.last_reads()
        kept = {value.node.index for value in outputs}
        values = dict(self._tensors)
        for node in nodes:
            if node.op == "leaf":
                continue
            values[node.index] = _EAGER[node.op](*(values[a.index] if isinstance(a, Node) else a for a in node.args))
            # Intermediates go as soon as they are read for the last time, as in the formula run
            # on tensors, so a large parameter's step holds a few temporaries, not all of them.
            for index in {arg.index for arg in node.args if isinstance(arg, Node)}:
                if last_read[index] == node.index and index not in kept:
                    del values[index]
        return [values[value.node.index] for value in outputs]
