"""torchupdates against torch.optim: equal where the math coincides, and where it does not, how.

Same initial values, same gradient sequence, float64, 50 steps. torch.optim's steps are
fed through ``.grad``, ours as a list. Both torch implementations (single-tensor
``foreach=False`` and multi-tensor ``foreach=True``) and both of our engines are used.

Nothing here is bitwise: torch.optim writes the same formulas in another order and with
fused kernels (``add_(x, alpha=a)`` and ``addcdiv_`` round once where we round twice;
momentum keeps ``b = mu*b + g`` and multiplies by the learning rate afterwards, we keep
``v = mu*v - lr*g``). Measured worst element-wise relative errors over 50 steps (all four
implementation pairs): 3e-15 sgd, 4e-14 momentum, 6e-14 nesterov (the velocity recursion
amplifies rounding), 3e-16 adadelta, 4e-15 adamax with epsilon 0, 5e-15 rmsprop+momentum
with epsilon 0, 6e-16 adagrad, rmsprop, adam and amsgrad with epsilon 0; and 7e-8 adamax with
epsilon 1e-8, which is math, not rounding (see below). Each tolerance is 14-300x the worst.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch

import torchupdates

SHAPES: list[tuple[int, ...]] = [(), (5,), (3, 4), (2, 3, 2, 2)]
GRAD_SCALES = [1e-3, 1.0, 10.0, 0.1]
STEPS = 50

Build = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def make_problem(seed: int, steps: int = STEPS) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """float64 initial values and gradients; no exact zeros (epsilon=0 runs divide by |g|)."""
    rng = np.random.default_rng(seed)
    init = [torch.tensor(rng.standard_normal(s)) for s in SHAPES]
    grads = [
        [torch.tensor(rng.standard_normal(s) * scale) for s, scale in zip(SHAPES, GRAD_SCALES, strict=True)]
        for _ in range(steps)
    ]
    return init, grads


def run_both(
    make_torch: Build, make_ours: Build, seed: int = 0, steps: int = STEPS
) -> tuple[torch.optim.Optimizer, list[torch.Tensor], torch.optim.Optimizer, list[torch.Tensor], list[torch.Tensor]]:
    init, grads = make_problem(seed, steps)
    pt = [p.clone().requires_grad_(True) for p in init]
    po = [p.clone().requires_grad_(True) for p in init]
    theirs, ours = make_torch(pt), make_ours(po)
    for g in grads:
        for p, x in zip(pt, g, strict=True):
            p.grad = x.clone()
        theirs.step()
        ours.step(g)
    for p, p0 in zip(po, init, strict=True):
        assert not torch.equal(p.detach(), p0), "the problem must move every parameter"
    return theirs, pt, ours, po, init


def rel_error(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """The largest element-wise relative difference over a list of tensors."""
    return max(float(((x.detach() - y.detach()).abs() / y.detach().abs()).max()) for x, y in zip(a, b, strict=True))


def assert_params_close(ours: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor], rtol: float) -> None:
    for i, (x, y) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=rtol, atol=0.0, msg=lambda m, i=i: f"param {i}: {m}")


ENGINES = ["reference", "foreach"]
TORCH_IMPL = [False, True]  # torch.optim's foreach flag


# --- where the math coincides ------------------------------------------------------------------

# name -> (torch.optim builder given foreach, our builder given engine, rtol)
AGREE: dict[str, tuple[Callable[[bool], Build], Callable[[str], Build], float]] = {
    # torch: p.add_(g, alpha=-lr) rounds once (fused); ours rounds lr*g, then the difference.
    "sgd": (
        lambda fe: lambda p: torch.optim.SGD(p, lr=0.1, foreach=fe),
        lambda en: lambda p: torchupdates.sgd(p, 0.1, engine=en),
        1e-13,
    ),
    # torch: b = mu*b + g (b = g at the first step), p -= lr*b; ours: v = mu*v - lr*g, p += v.
    "momentum": (
        lambda fe: lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0, foreach=fe),
        lambda en: lambda p: torchupdates.momentum(p, 0.1, momentum=0.9, engine=en),
        2e-12,
    ),
    # torch: b = mu*b + g, p -= lr*(g + mu*b); ours: v = mu*v - lr*g, p += mu*v - lr*g.
    "nesterov_momentum": (
        lambda fe: lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0, nesterov=True, foreach=fe),
        lambda en: lambda p: torchupdates.nesterov_momentum(p, 0.1, momentum=0.9, engine=en),
        2e-12,
    ),
    # The same formula (torch's rho default is 0.9, ours 0.95: given explicitly); torch uses
    # addcmul and computes sqrt(s+eps)/sqrt(a+eps) before multiplying by g.
    "adadelta": (
        lambda fe: lambda p: torch.optim.Adadelta(p, lr=0.7, rho=0.95, eps=1e-6, foreach=fe),
        lambda en: lambda p: torchupdates.adadelta(p, 0.7, rho=0.95, epsilon=1e-6, engine=en),
        1e-13,
    ),
    # With epsilon 0 the formulas coincide (torch: m by lerp, step by addcdiv).
    "adamax(epsilon=0)": (
        lambda fe: lambda p: torch.optim.Adamax(p, lr=0.02, betas=(0.9, 0.999), eps=0.0, foreach=fe),
        lambda en: lambda p: torchupdates.adamax(p, 0.02, 0.9, 0.999, epsilon=0.0, engine=en),
        1e-13,
    ),
    # torch adds eps inside the max, u = max(b2*u, |g| + eps), and divides by u; ours
    # u = max(b2*u, |g|) and divides by u + eps. By induction u_ours <= u_torch <= u_ours + eps,
    # so each step differs relatively by at most eps/u: 1e-8/1e-3 = 1e-5 for the smallest
    # gradients here on the first step, far less later. Parameters differ by up to ~1e-7 relatively.
    "adamax(epsilon=1e-8)": (
        lambda fe: lambda p: torch.optim.Adamax(p, lr=0.02, betas=(0.9, 0.999), eps=1e-8, foreach=fe),
        lambda en: lambda p: torchupdates.adamax(p, 0.02, 0.9, 0.999, epsilon=1e-8, engine=en),
        1e-6,
    ),
    # apply_momentum(rmsprop) is torch's RMSprop with momentum when epsilon is 0 (torch's eps sits
    # outside the root): torch b = mu*b + g/sqrt(a), p -= lr*b; ours v = mu*v + (p - lr*g/sqrt(a)) - p.
    "apply_momentum(rmsprop, epsilon=0)": (
        lambda fe: lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=0.0, momentum=0.8, foreach=fe),
        lambda en: (
            lambda p: torchupdates.apply_momentum(
                torchupdates.rmsprop(p, 0.01, rho=0.9, epsilon=0.0, engine=en), momentum=0.8
            )
        ),
        1e-12,
    ),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("torch_foreach", TORCH_IMPL, ids=["torch-single", "torch-foreach"])
@pytest.mark.parametrize("name", list(AGREE))
def test_agrees_with_torch_optim(name: str, torch_foreach: bool, engine: str) -> None:
    make_torch, make_ours, rtol = AGREE[name]
    _, pt, _, po, _ = run_both(make_torch(torch_foreach), make_ours(engine))
    assert_params_close(po, pt, rtol)


@pytest.mark.parametrize("nesterov", [False, True])
def test_velocity_is_minus_lr_times_torch_buffer(nesterov: bool) -> None:
    # The state agrees too: our velocity is -lr times torch's momentum buffer.
    lr = 0.1
    rule = torchupdates.nesterov_momentum if nesterov else torchupdates.momentum
    theirs, pt, ours, po, _ = run_both(
        lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=nesterov, foreach=False),
        lambda p: rule(p, lr, momentum=0.9),
    )
    for x, y in zip(po, pt, strict=True):
        torch.testing.assert_close(
            ours.state[x]["velocity"], -lr * theirs.state[y]["momentum_buffer"], rtol=1e-12, atol=0
        )


def test_adadelta_state_agrees() -> None:
    theirs, pt, ours, po, _ = run_both(*(AGREE["adadelta"][0](False), AGREE["adadelta"][1]("foreach")))
    for x, y in zip(po, pt, strict=True):
        torch.testing.assert_close(ours.state[x]["accu"], theirs.state[y]["square_avg"], rtol=1e-13, atol=0)
        torch.testing.assert_close(ours.state[x]["delta_accu"], theirs.state[y]["acc_delta"], rtol=1e-12, atol=0)


def test_adamax_epsilon_inside_the_max() -> None:
    # torch's infinity norm carries eps (it is inside the max): u_ours <= u_torch <= u_ours + eps.
    eps = 1e-8
    theirs, pt, ours, po, _ = run_both(
        lambda p: torch.optim.Adamax(p, lr=0.02, eps=eps, foreach=False), lambda p: torchupdates.adamax(p, 0.02)
    )
    for x, y in zip(po, pt, strict=True):
        u_ours, u_torch = ours.state[x]["u"], theirs.state[y]["exp_inf"]
        slack = 1e-15 * u_ours.abs().max()
        assert bool((u_torch >= u_ours - slack).all())
        assert bool((u_torch <= u_ours + eps + slack).all())
        assert bool((u_torch > u_ours).any()), "torch's eps must show in its state"
    assert rel_error(po, pt) > 1e-12, "epsilon 1e-8 should make a difference larger than rounding"


# --- where the math differs: epsilon placement --------------------------------------------------

# name -> (torch.optim builder given eps, our builder given eps)
DIFFER: dict[str, tuple[Callable[[float], Build], Callable[[float], Build]]] = {
    # torch: p -= lr*g/(sqrt(a) + eps); ours: p -= lr*g/sqrt(a + eps). torch's defaults differ too
    # (eps 1e-10, lr 0.01); initial_accumulator_value and lr_decay are torch-only, both 0 here,
    # which is Lasagne's zero-initialised accumulator without decay.
    "adagrad": (
        lambda eps: (
            lambda p: torch.optim.Adagrad(
                p, lr=0.5, lr_decay=0.0, initial_accumulator_value=0.0, eps=eps, foreach=False
            )
        ),
        lambda eps: lambda p: torchupdates.adagrad(p, 0.5, epsilon=eps),
    ),
    # torch's alpha is our rho; eps outside the root in torch, inside in ours.
    "rmsprop": (
        lambda eps: lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=eps, foreach=False),
        lambda eps: lambda p: torchupdates.rmsprop(p, 0.01, rho=0.9, epsilon=eps),
    ),
    # torch: p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)  (eps on the bias-corrected root);
    # ours:  p -= lr*sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps), i.e. torch's with eps/sqrt(1-b2^t).
    "adam": (
        lambda eps: lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.999), eps=eps, foreach=False),
        lambda eps: lambda p: torchupdates.adam(p, 0.01, 0.9, 0.999, epsilon=eps),
    ),
    "amsgrad": (
        lambda eps: lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.999), eps=eps, amsgrad=True, foreach=False),
        lambda eps: lambda p: torchupdates.amsgrad(p, 0.01, 0.9, 0.999, epsilon=eps),
    ),
}


@pytest.mark.parametrize("name", list(DIFFER))
def test_epsilon_placement_differs_from_torch(name: str) -> None:
    make_torch, make_ours = DIFFER[name]
    _, pt, _, po, _ = run_both(make_torch(0.1), make_ours(0.1))
    # With a large epsilon the difference is the math, not rounding (~1e-15): at least 1e-3.
    assert rel_error(po, pt) > 1e-3


@pytest.mark.parametrize("name", list(DIFFER))
def test_epsilon_zero_agrees_with_torch(name: str) -> None:
    make_torch, make_ours = DIFFER[name]
    _, pt, _, po, _ = run_both(make_torch(0.0), make_ours(0.0))
    assert_params_close(po, pt, rtol=1e-13)


@pytest.mark.parametrize("name", ["adam", "amsgrad"])
def test_adam_epsilon_is_torchs_divided_by_root_bias_correction(name: str) -> None:
    # One step pins the placement down exactly: at t = 1 ours with eps is torch's with eps/sqrt(1 - b2).
    make_torch, make_ours = DIFFER[name]
    eps, beta2 = 0.1, 0.999
    _, pt, _, po, _ = run_both(make_torch(eps / (1 - beta2) ** 0.5), make_ours(eps), steps=1)
    assert_params_close(po, pt, rtol=1e-14)
    _, pt, _, po, _ = run_both(make_torch(eps), make_ours(eps), steps=1)
    assert rel_error(po, pt) > 1e-3
