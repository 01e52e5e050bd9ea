"""The update rules: each formula written once, and the function that builds its optimizer.

Every formula keeps the operation order of the specification (Lasagne's ``updates.py``), so
results agree with a float64 transcription of it to rounding, and the engines agree with
each other bit for bit.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec

from ._docs import fill
from .formula import Array, Scalar, maximum, sqrt, square
from .modifiers import MOMENTUM, NESTEROV_MOMENTUM
from .optimizer import Optimizer, ParamsT, StepOptions
from .transform import NON_NEGATIVE, UNIT_INTERVAL, Hyperparameter, Transform

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "adadelta",
    "adagrad",
    "adam",
    "adamax",
    "amsgrad",
    "momentum",
    "nesterov_momentum",
    "rmsprop",
    "sgd",
]

State = dict[str, Array]


def _learning_rate(default: float | None) -> Hyperparameter:
    return Hyperparameter("learning_rate", default, NON_NEGATIVE)


def _epsilon(default: float) -> Hyperparameter:
    return Hyperparameter("epsilon", default, NON_NEGATIVE)


def _decay(name: str, default: float) -> Hyperparameter:
    return Hyperparameter(name, default, UNIT_INTERVAL)


def _sgd(param: Array, grad: Array, state: State, t: None, *, learning_rate: Scalar) -> tuple[Array, State]:
    return param - learning_rate * grad, {}


def _adagrad(
    param: Array, grad: Array, state: State, t: None, *, learning_rate: Scalar, epsilon: Scalar
) -> tuple[Array, State]:
    accu = state["accu"] + square(grad)
    return param - learning_rate * grad / sqrt(accu + epsilon), {"accu": accu}


def _rmsprop(
    param: Array, grad: Array, state: State, t: None, *, learning_rate: Scalar, rho: Scalar, epsilon: Scalar
) -> tuple[Array, State]:
    accu = rho * state["accu"] + (1 - rho) * square(grad)
    return param - learning_rate * grad / sqrt(accu + epsilon), {"accu": accu}


def _adadelta(
    param: Array, grad: Array, state: State, t: None, *, learning_rate: Scalar, rho: Scalar, epsilon: Scalar
) -> tuple[Array, State]:
    accu = rho * state["accu"] + (1 - rho) * square(grad)
    delta = grad * sqrt(state["delta_accu"] + epsilon) / sqrt(accu + epsilon)
    delta_accu = rho * state["delta_accu"] + (1 - rho) * square(delta)
    return param - learning_rate * delta, {"accu": accu, "delta_accu": delta_accu}


def _bias_corrected_rate(learning_rate: Scalar, beta1: Scalar, beta2: Scalar, t: int) -> Scalar:
    return learning_rate * sqrt(1 - beta2**t) / (1 - beta1**t)


def _first_moment(state: State, grad: Array, beta1: Scalar) -> Array:
    return beta1 * state["m"] + (1 - beta1) * grad


def _second_moment(state: State, grad: Array, beta2: Scalar) -> Array:
    return beta2 * state["v"] + (1 - beta2) * square(grad)


def _adam(
    param: Array,
    grad: Array,
    state: State,
    t: int,
    *,
    learning_rate: Scalar,
    beta1: Scalar,
    beta2: Scalar,
    epsilon: Scalar,
) -> tuple[Array, State]:
    a = _bias_corrected_rate(learning_rate, beta1, beta2, t)
    m = _first_moment(state, grad, beta1)
    v = _second_moment(state, grad, beta2)
    return param - a * m / (sqrt(v) + epsilon), {"m": m, "v": v}


def _adamax(
    param: Array,
    grad: Array,
    state: State,
    t: int,
    *,
    learning_rate: Scalar,
    beta1: Scalar,
    beta2: Scalar,
    epsilon: Scalar,
) -> tuple[Array, State]:
    a = learning_rate / (1 - beta1**t)
    m = _first_moment(state, grad, beta1)
    u = maximum(beta2 * state["u"], abs(grad))
    return param - a * m / (u + epsilon), {"m": m, "u": u}


def _amsgrad(
    param: Array,
    grad: Array,
    state: State,
    t: int,
    *,
    learning_rate: Scalar,
    beta1: Scalar,
    beta2: Scalar,
    epsilon: Scalar,
) -> tuple[Array, State]:
    a = _bias_corrected_rate(learning_rate, beta1, beta2, t)
    m = _first_moment(state, grad, beta1)
    v = _second_moment(state, grad, beta2)
    v_hat = maximum(state["v_hat"], v)
    return param - a * m / (sqrt(v_hat) + epsilon), {"m": m, "v": v, "v_hat": v_hat}


SGD = Transform("sgd", (_learning_rate(None),), (), _sgd, accepts_sparse=True)
ADAGRAD = Transform("adagrad", (_learning_rate(1.0), _epsilon(1e-6)), ("accu",), _adagrad)
RMSPROP = Transform("rmsprop", (_learning_rate(1.0), _decay("rho", 0.9), _epsilon(1e-6)), ("accu",), _rmsprop)
ADADELTA = Transform(
    "adadelta", (_learning_rate(1.0), _decay("rho", 0.95), _epsilon(1e-6)), ("accu", "delta_accu"), _adadelta
)
_ADAM_FAMILY = (_decay("beta1", 0.9), _decay("beta2", 0.999), _epsilon(1e-8))
ADAM = Transform("adam", (_learning_rate(0.001), *_ADAM_FAMILY), ("m", "v"), _adam, counts_steps=True)
ADAMAX = Transform("adamax", (_learning_rate(0.002), *_ADAM_FAMILY), ("m", "u"), _adamax, counts_steps=True)
AMSGRAD = Transform("amsgrad", (_learning_rate(0.001), *_ADAM_FAMILY), ("m", "v", "v_hat"), _amsgrad, counts_steps=True)


# --- what every rule function shares: parameter documentation and torch.optim's spellings ---

SHARED_PARAMETERS: dict[str, str] = {
    "params": """\
params : iterable of Tensor or of dict
    Parameters to optimize, or param groups: dicts with ``"params"`` and any hyperparameter
    of this rule to override for that group (``"lr"`` is an alias of ``"learning_rate"``;
    in the Adam family, ``"betas"`` is torch's pair of ``beta1`` and ``beta2``).""",
    "lr": """\
lr : float or 0-d Tensor, optional, keyword only
    torch.optim's name for ``learning_rate``, accepted as its alias. Giving both is a
    ``TypeError``.""",
    "betas": """\
betas : pair of float or 0-d Tensor, optional, keyword only
    torch.optim's ``(beta1, beta2)``, accepted instead of the two keywords. Giving
    ``betas`` and ``beta1`` or ``beta2`` is a ``TypeError``, and so is anything but a
    tuple or list of two values.""",
    "engine": """\
engine : {"foreach", "reference", "compiled"}, optional, keyword only
    How the formula runs; the three agree bit for bit in float32.

    - ``"foreach"`` (default): eager, each operation of the formula over many tensors at
      once, over flat buffers that the parameters and state (on CUDA their ``.grad`` too)
      become views of after the first step; on CPU in cache-sized chunks, reading each
      gradient where it is. Needs nothing but torch (no compiler).
    - ``"reference"``: eager, one tensor at a time: the readable specification.
    - ``"compiled"``: one fused ``torch.compile`` kernel per step (per batch of tensors)
      over flat buffers of parameters, gradients and state. Needs a C++ compiler on CPU
      and Triton on CUDA; checked when the optimizer is built, which raises a
      ``RuntimeError`` naming what is missing. Its first step compiles.""",
    "state_dtype": """\
state_dtype : torch.dtype, optional, keyword only
    Keep state (and the arithmetic) in this dtype, e.g. ``torch.float32`` for bfloat16
    parameters. Default: the parameter's dtype.""",
    "skip_nonfinite": """\
skip_nonfinite : bool, optional, keyword only
    Skip a step whose gradients (after any clipping) hold a NaN or an infinity: it writes
    nothing (parameters, state, step counters), and ``opt.skipped_steps`` counts it (saved
    in the state dict). One check per step. Default False, as Lasagne.""",
    "max_grad_norm": """\
max_grad_norm : float or 0-d Tensor, optional, keyword only
    Clip the gradients before the rule: rescale them all together exactly as
    ``total_norm_constraint(grads, max_grad_norm)`` does (over every parameter the step
    updates; for FSDP2's DTensors, over every rank's shards). ``opt.grad_norm`` holds the
    norm before clipping of the last step, a 0-d tensor. Default None (no clipping).""",
    "adam_family": r"""beta1 : float or 0-d Tensor, optional
    Decay :math:`\beta_1` in [0, 1) of the first-moment estimate. Default 0.9.
beta2 : float or 0-d Tensor, optional
    Decay :math:`\beta_2` in [0, 1) of the second-moment estimate. Default 0.999.
epsilon : float or 0-d Tensor, optional
    :math:`\epsilon >= 0`, for numerical stability. Default 1e-8. In float16 arithmetic
    (float16 parameters without ``state_dtype``) 1e-8 is 0, so where the rest of the
    denominator is 0 (a gradient that was zero so far; for Adam and AMSGrad also one too
    small for :math:`(1 - \beta_2) g^2` to be a float16, below about 5e-3 with the defaults)
    the step divides by zero and the parameter becomes NaN or infinite, as with
    ``torch.optim.Adam`` at zero gradients. The formula is kept as written: for float16
    parameters use ``state_dtype=torch.float32``. bfloat16 holds 1e-8.""",
}
"""Numpydoc entries of the parameters that several rule functions take, written once.

A line ``{name}`` alone in a rule's docstring is replaced by the entry, indented as the line;
``{options}`` by the entries of every keyword-only parameter of the rule's signature."""

TORCH_SPELLINGS: dict[str, str] = {"eps": "epsilon", "alpha": "rho"}
"""torch.optim's keywords that are spelt differently here (Lasagne's names), to say so."""

_P = ParamSpec("_P")


def _with_step_options(signature: inspect.Signature) -> inspect.Signature:
    """``signature`` with its ``**options`` spelt out as :class:`Optimizer`'s keywords, defaults
    included, so that ``help()``, Sphinx and argument binding see every keyword by name."""
    own = [parameter for parameter in signature.parameters.values() if parameter.kind is not parameter.VAR_KEYWORD]
    optimizer_parameters = inspect.signature(Optimizer.__init__).parameters
    return signature.replace(parameters=[*own, *(optimizer_parameters[name] for name in StepOptions.__annotations__)])


def _fill_shared_docs(doc: str, signature: inspect.Signature) -> str:
    keyword_only = [
        name for name, parameter in signature.parameters.items() if parameter.kind is parameter.KEYWORD_ONLY
    ]
    return fill(doc, lambda name: [SHARED_PARAMETERS[each] for each in (keyword_only if name == "options" else [name])])


def _public(function: Callable[_P, Optimizer]) -> Callable[_P, Optimizer]:
    """A rule function: its signature spelt out with the step options, its docstring completed
    with :data:`SHARED_PARAMETERS`, and torch.optim's ``lr=`` (and ``betas=`` where the rule
    has ``beta1`` and ``beta2``) resolved to the rule's own keywords before it runs."""
    signature = _with_step_options(inspect.signature(function))
    function.__doc__ = _fill_shared_docs(function.__doc__ or "", signature)
    name = function.__name__
    target: Callable[..., Optimizer] = function

    @functools.wraps(function)
    def rule(*args: _P.args, **kwargs: _P.kwargs) -> Optimizer:
        for torch_name, ours in TORCH_SPELLINGS.items():
            if torch_name in kwargs and ours in signature.parameters:
                raise TypeError(
                    f"{name}() got an unexpected keyword argument {torch_name!r}: here it is {ours!r} (Lasagne's name)"
                )
        try:
            given = signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{name}() {error}") from None
        arguments = given.arguments
        lr = arguments.pop("lr", None)
        if lr is not None:
            if arguments.get("learning_rate") is not None:
                raise TypeError(
                    f"{name}() got learning_rate={arguments['learning_rate']!r} and its alias "
                    f"lr={lr!r}: give one of them"
                )
            arguments["learning_rate"] = lr
        betas = arguments.pop("betas", None)
        if betas is not None:
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise TypeError(f"{name}() takes betas as a pair (beta1, beta2), got {betas!r}")
            both = [key for key in ("beta1", "beta2") if key in arguments]
            if both:
                raise TypeError(
                    f"{name}() got betas={tuple(betas)!r} and {' and '.join(both)}: give betas or beta1/beta2"
                )
            arguments["beta1"], arguments["beta2"] = betas
        return target(*given.args, **given.kwargs)

    rule.__signature__ = signature  # type: ignore[attr-defined]
    return rule


@_public
def sgd(
    params: ParamsT,
    learning_rate: Scalar | None = None,
    *,
    lr: Scalar | None = None,
    **options: Unpack[StepOptions],
) -> Optimizer:
    r"""Stochastic gradient descent.

    .. math:: p \leftarrow p - \eta\, g

    Parameters
    ----------
    {params}
    learning_rate : float or 0-d Tensor
        Step size :math:`\eta >= 0`, required (or given as ``lr``). A tensor is read at
        every step, so changing it in place changes the next step.
    {options}

    Returns
    -------
    Optimizer
        A ``torch.optim.Optimizer``. Sparse gradients are accepted.

    References
    ----------
    .. [1] Robbins, H. and Monro, S. (1951): A stochastic approximation method.
       The Annals of Mathematical Statistics, 22(3):400-407.
    """
    return Optimizer(params, SGD, learning_rate=learning_rate, **options)


@_public
def momentum(
    params: ParamsT,
    learning_rate: Scalar | None = None,
    momentum: Scalar = 0.9,
    *,
    lr: Scalar | None = None,
    **options: Unpack[StepOptions],
) -> Optimizer:
    r"""SGD with (heavy-ball) momentum: :func:`sgd` followed by :func:`apply_momentum`.

    With :math:`u = p - \eta g` the plain SGD proposal and :math:`\mu` the momentum:

    .. math::
        x &= \mu v + u \\
        v &\leftarrow x - p \\
        p &\leftarrow x

    so that :math:`v \leftarrow \mu v - \eta g` and :math:`p \leftarrow p + v`.

    Parameters
    ----------
    {params}
    learning_rate : float or 0-d Tensor
        Step size :math:`\eta >= 0`, required (or given as ``lr``).
    momentum : float or 0-d Tensor, optional
        :math:`\mu` in [0, 1). Higher momentum smooths over more steps and also makes the
        steps larger; scaling the learning rate by ``1 - momentum`` compensates.
        Default 0.9.
    {options}

    Returns
    -------
    Optimizer
        State per parameter: ``velocity``.

    References
    ----------
    .. [1] Polyak, B. T. (1964): Some methods of speeding up the convergence of iteration
       methods. USSR Computational Mathematics and Mathematical Physics, 4(5):1-17.
    """
    base = Optimizer(params, SGD, learning_rate=learning_rate, _modifier_follows=True, **options)
    return base.compose(MOMENTUM, None, momentum=momentum)


@_public
def nesterov_momentum(
    params: ParamsT,
    learning_rate: Scalar | None = None,
    momentum: Scalar = 0.9,
    *,
    lr: Scalar | None = None,
    **options: Unpack[StepOptions],
) -> Optimizer:
    r"""SGD with Nesterov momentum: :func:`sgd` followed by :func:`apply_nesterov_momentum`.

    With :math:`u = p - \eta g` the plain SGD proposal:

    .. math::
        x &= \mu v + u - p \\
        v &\leftarrow x \\
        p &\leftarrow \mu x + u

    so that :math:`v \leftarrow \mu v - \eta g` and :math:`p \leftarrow p + \mu v - \eta g`.
    This is the reformulation that evaluates the gradient at the current parameters
    rather than at the look-ahead point [2]_.

    Parameters
    ----------
    {params}
    learning_rate : float or 0-d Tensor
        Step size :math:`\eta >= 0`, required (or given as ``lr``).
    momentum : float or 0-d Tensor, optional
        :math:`\mu` in [0, 1). Default 0.9.
    {options}

    Returns
    -------
    Optimizer
        State per parameter: ``velocity``.

    References
    ----------
    .. [1] Nesterov, Y. (1983): A method for unconstrained convex minimization problem
       with the rate of convergence O(1/k^2). Doklady AN SSSR, 269:543-547.
    .. [2] Bengio, Y., Boulanger-Lewandowski, N. and Pascanu, R. (2013): Advances in
       optimizing recurrent networks. ICASSP 2013, arXiv:1212.0901.
    """
    base = Optimizer(params, SGD, learning_rate=learning_rate, _modifier_follows=True, **options)
    return base.compose(NESTEROV_MOMENTUM, None, momentum=momentum)


@_public
def adagrad(
    params: ParamsT,
    learning_rate: Scalar = 1.0,
    epsilon: Scalar = 1e-6,
    *,
    lr: Scalar | None = None,
    **options: Unpack[StepOptions],
) -> Optimizer:
    r"""Adagrad: per-element step sizes shrinking with the accumulated squared gradients.

    .. math::
        a &\leftarrow a + g^2 \\
        p &\leftarrow p - \frac{\eta\, g}{\sqrt{a + \epsilon}}

    :math:`\epsilon` sits inside the square root (as in the specification; torch.optim
    adds it outside). The effective step size only ever decreases.

    Parameters
    ----------
    {params}
    learning_rate : float or 0-d Tensor, optional
        :math:`\eta >= 0`. Default 1.0.
    epsilon : float or 0-d Tensor, optional
        :math:`\epsilon >= 0`, for numerical stability. Default 1e-6.
    {options}

    Returns
    -------
    Optimizer
        State per parameter: ``accu`` (:math:`a`).

    References
    ----------
    .. [1] Duchi, J., Hazan, E. and Singer, Y. (2011): Adaptive subgradient methods for
       online learning and stochastic optimization. JMLR, 12:2121-2159.
    .. [2] Dyer, C.: Notes on AdaGrad. http://www.ark.cs.cmu.edu/cdyer/adagrad.pdf
    """
    return Optimizer(params, ADAGRAD, learning_rate=learning_rate, epsilon=epsilon, **options)


@_public
def rmsprop(
    params: ParamsT,
    learning_rate: Scalar = 1.0,
    rho: Scalar = 0.9,
    epsilon: Scalar = 1e-6,
    *,
    lr: Scalar | None = None,
    **options: Unpack[StepOptions],
) -> Optimizer:
    r"""RMSProp: divide the step by a moving root mean square of the gradients.

    .. math::
        a &\leftarrow \rho a + (1 - \rho) g^2 \\
        p &\leftarrow p - \frac{\eta\, g}{\sqrt{a + \epsilon}}

    Parameters
    ----------
    {params}
    learning_rate : float or 0-d Tensor, optional
        :math:`\eta >= 0`. Default 1.0.
    rho : float or 0-d Tensor, optional
        Decay :math:`\rho` in [0, 1) of the moving average: near 1 it forgets slowly.
        Default 0.9.
    epsilon : float or 0-d Tensor, optional
        :math:`\epsilon >= 0`, inside the square root. Default 1e-6.
    {options}

    Returns
    -------
    Optimizer
        State per parameter: ``accu`` (:math:`a`).

    References
    ----------
    .. [1] Tieleman, T. and Hinton, G. (2012): Neural Networks for Machine Learning,
       Lecture 6.5 - rmsprop. Coursera.
    """
    return Optimizer(params, RMSPROP, learning_rate=learning_rate, rho=rho, epsilon=epsilon, **options)


@_public
def adadelta(
    params: ParamsT,
    learning_rate: Scalar = 1.0,
    rho: Scalar = 0.95,
    epsilon: Scalar = 1e-6,
    *,
    lr: Scalar | None = None,
    **options: Unpack[StepOptions],
) -> Optimizer:
    r"""Adadelta: step sizes from the ratio of past update and gradient magnitudes.

    .. math::
        a &\leftarrow \rho a + (1 - \rho) g^2 \\
        d &= g \frac{\sqrt{s + \epsilon}}{\sqrt{a + \epsilon}} \\
        p &\leftarrow p - \eta\, d \\
        s &\leftarrow \rho s + (1 - \rho) d^2

    :math:`d` uses the *previous* :math:`s`. The paper has no learning rate
    (:math:`\eta = 1`); :math:`\epsilon` makes the very first step non-zero.

    Parameters
    ----------
    {params}
    learning_rate : float or 0-d Tensor, optional
        :math:`\eta >= 0`. Default 1.0.
    rho : float or 0-d Tensor, optional
        Decay :math:`\rho` in [0, 1). Default 0.95, as suggested in the paper.
    epsilon : float or 0-d Tensor, optional
        :math:`\epsilon >= 0`. Default 1e-6.
    {options}

    Returns
    -------
    Optimizer
        State per parameter: ``accu`` (:math:`a`) and ``delta_accu`` (:math:`s`).

    References
    ----------
    .. [1] Zeiler, M. D. (2012): ADADELTA: An adaptive learning rate method.
       arXiv:1212.5701.
    """
    return Optimizer(params, ADADELTA, learning_rate=learning_rate, rho=rho, epsilon=epsilon, **options)


@_public
def adam(
    params: ParamsT,
    learning_rate: Scalar = 0.001,
    beta1: Scalar = 0.9,
    beta2: Scalar = 0.999,
    epsilon: Scalar = 1e-8,
    *,
    lr: Scalar | None = None,
    betas: tuple[Scalar, Scalar] | None = None,
    **options: Unpack[StepOptions],
) -> Optimizer:
    r"""Adam: steps from bias-corrected moving moments of the gradient.

    With :math:`t` the 1-based step number:

    .. math::
        \alpha &= \eta \sqrt{1 - \beta_2^t} / (1 - \beta_1^t) \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        p &\leftarrow p - \frac{\alpha\, m}{\sqrt{v} + \epsilon}

    This is the paper's "efficient" form: :math:`\epsilon` is added to
    :math:`\sqrt{v}`, not to the bias-corrected :math:`\sqrt{\hat v}` as torch.optim does.
    The paper's :math:`\lambda` (only needed for a convergence proof) is omitted.

    Parameters
    ----------
    {params}
    learning_rate : float or 0-d Tensor, optional
        :math:`\eta >= 0`. Default 0.001.
    {adam_family}
    {options}

    Returns
    -------
    Optimizer
        State per parameter: ``step`` (0-d int64), ``m`` and ``v``.

    References
    ----------
    .. [1] Kingma, D. P. and Ba, J. (2014): Adam: A method for stochastic optimization.
       arXiv:1412.6980.
    """
    return Optimizer(params, ADAM, learning_rate=learning_rate, beta1=beta1, beta2=beta2, epsilon=epsilon, **options)


@_public
def adamax(
    params: ParamsT,
    learning_rate: Scalar = 0.002,
    beta1: Scalar = 0.9,
    beta2: Scalar = 0.999,
    epsilon: Scalar = 1e-8,
    *,
    lr: Scalar | None = None,
    betas: tuple[Scalar, Scalar] | None = None,
    **options: Unpack[StepOptions],
) -> Optimizer:
    r"""Adamax: the Adam variant based on the infinity norm.

    .. math::
        \alpha &= \eta / (1 - \beta_1^t) \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
        u &\leftarrow \max(\beta_2 u, |g|) \\
        p &\leftarrow p - \frac{\alpha\, m}{u + \epsilon}

    Parameters
    ----------
    {params}
    learning_rate : float or 0-d Tensor, optional
        :math:`\eta >= 0`. Default 0.002.
    {adam_family}
    {options}

    Returns
    -------
    Optimizer
        State per parameter: ``step`` (0-d int64), ``m`` and ``u``.

    References
    ----------
    .. [1] Kingma, D. P. and Ba, J. (2014): Adam: A method for stochastic optimization.
       arXiv:1412.6980, section 7.1.
    """
    return Optimizer(params, ADAMAX, learning_rate=learning_rate, beta1=beta1, beta2=beta2, epsilon=epsilon, **options)


@_public
def amsgrad(
    params: ParamsT,
    learning_rate: Scalar = 0.001,
    beta1: Scalar = 0.9,
    beta2: Scalar = 0.999,
    epsilon: Scalar = 1e-8,
    *,
    lr: Scalar | None = None,
    betas: tuple[Scalar, Scalar] | None = None,
    **options: Unpack[StepOptions],
) -> Optimizer:
    r"""AMSGrad: Adam whose step uses the running maximum of the second moment.

    .. math::
        \alpha &= \eta \sqrt{1 - \beta_2^t} / (1 - \beta_1^t) \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        \hat v &\leftarrow \max(\hat v, v) \\
        p &\leftarrow p - \frac{\alpha\, m}{\sqrt{\hat v} + \epsilon}

    Parameters
    ----------
    {params}
    learning_rate : float or 0-d Tensor, optional
        :math:`\eta >= 0`. Default 0.001.
    {adam_family}
    {options}

    Returns
    -------
    Optimizer
        State per parameter: ``step`` (0-d int64), ``m``, ``v`` and ``v_hat``.

    References
    ----------
    .. [1] Reddi, S. J., Kale, S. and Kumar, S. (2018): On the convergence of Adam and
       beyond. ICLR 2018. https://openreview.net/forum?id=ryQu7f-RZ
    """
    return Optimizer(params, AMSGRAD, learning_rate=learning_rate, beta1=beta1, beta2=beta2, epsilon=epsilon, **options)
