"""What each recorded operation computes: on one tensor (:data:`ELEMENTWISE`) and on lists of
tensors (:data:`FOREACH`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._sqrt import sqrt_list, sqrt_list_

ELEMENTWISE: dict[str, Callable[..., Tensor]] = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "maximum": torch.maximum,
    "neg": torch.neg,
    "abs": torch.abs,
    "sqrt": torch.sqrt,
}
"""Every recorded operation (:attr:`Node.op <torchupdates.formula.Node>`, all but ``"leaf"``) as
the plain single-tensor torch function that computes it: ``ELEMENTWISE[node.op](*operands)``,
operands being tensors for node arguments and the scalars as recorded. ``out=`` works with
each. One caveat: on CPU, torch's own float32 ``sqrt`` is not correctly rounded; eager code
replaying ``"sqrt"`` there should use :func:`~torchupdates.formula.sqrt` (compiled kernels'
square roots are correctly rounded)."""

FOREACH: dict[str, tuple[Callable[..., Sequence[Tensor]], Callable[..., None]]] = {
    "add": (torch._foreach_add, torch._foreach_add_),
    "sub": (torch._foreach_sub, torch._foreach_sub_),
    "mul": (torch._foreach_mul, torch._foreach_mul_),
    "div": (torch._foreach_div, torch._foreach_div_),
    "maximum": (torch._foreach_maximum, torch._foreach_maximum_),
    "neg": (torch._foreach_neg, torch._foreach_neg_),
    "abs": (torch._foreach_abs, torch._foreach_abs_),
    "sqrt": (sqrt_list, sqrt_list_),
}
"""Every recorded operation as its pair of multi-tensor kernels (out of place, in place) over
lists of tensors of one device and dtype; square roots correctly rounded."""

COMMUTATIVE = frozenset({"add", "mul"})
"""Operations whose operands may swap: IEEE ``a + b == b + a`` and ``a * b == b * a``, bit for bit."""
