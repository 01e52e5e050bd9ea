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


ScalarKind = tuple[torch.dtype, torch.device] | None
"""How eager torch sees a scalar operand: a Python number (``None``) or a 0-d tensor of this
dtype and device. Eager 16-bit arithmetic rounds a scalar differently by kind (and by
operation and device), so engines that must round as eager does ask per kind."""


def scalar_kind(scalar: object) -> ScalarKind:
    """The :data:`ScalarKind` of ``scalar``."""
    return (scalar.dtype, scalar.device) if isinstance(scalar, Tensor) else None


def probe_operands(dtype: torch.dtype, device: torch.device, kind: ScalarKind) -> tuple[Tensor, float | Tensor]:
    """Operands on which the ways of rounding a scalar operand of a 16-bit operation give
    different results: 4,097 values of ``dtype`` on ``device`` and the scalar 0.3
    (representable in neither 16-bit format) of the given kind. An engine compares its
    variant with eager torch on them, once per process."""
    tensor = torch.linspace(-3.0, 3.0, 4097, device=device).to(dtype) + 0.5
    scalar: float | Tensor = PROBE_SCALAR if kind is None else torch.tensor(PROBE_SCALAR, dtype=kind[0], device=kind[1])
    return tensor, scalar


PROBE_SCALAR = 0.3
"""The scalar of :func:`probe_operands`."""
