"""norm_constraint and total_norm_constraint against a float64 NumPy transcription of docs/design.md,
section 3 "The math", with PyTorch's default axes (every axis but 0; see that section's "Constraints")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchupdates as updates

EPS = 1e-7


def np_norm_constraint(x, max_norm, axes, epsilon=EPS):
    x = np.asarray(x, dtype=np.float64)
    n = np.sqrt(np.sum(x**2, axis=axes, keepdims=True))
    return x * (np.clip(n, 0, max_norm) / (epsilon + n))


def np_total_norm_constraint(xs, max_norm, epsilon=EPS):
    xs = [np.asarray(x, dtype=np.float64) for x in xs]
    n = np.sqrt(sum(np.sum(x**2) for x in xs))
    return [x * (np.clip(n, 0, max_norm) / (epsilon + n)) for x in xs], n


def slice_scaled(shape, axis, dtype=torch.float64, seed=0):
    """Random entries, the slices along ``axis`` scaled by 10**-2 ... 10**2 (shuffled): some
    slices are far under a bound of order 1, some far over."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    exponents = torch.linspace(-2, 2, shape[axis], dtype=torch.float64)
    factors = 10 ** exponents[torch.randperm(shape[axis], generator=gen)]
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return (x * factors.reshape(view)).to(dtype)


SHAPES = [(6, 4), (5, 3, 2), (4, 3, 2, 2), (3, 2, 2, 2, 2)]
TOL = {torch.float64: {"rtol": 1e-12, "atol": 1e-15}, torch.float32: {"rtol": 2e-6, "atol": 1e-7}}


def torch_norms(x, axes):
    return torch.sqrt((x.double() ** 2).sum(dim=axes, keepdim=True))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_default_axes_are_all_but_axis_0(shape, dtype):
    x = slice_scaled(shape, 0, dtype)
    axes = tuple(range(1, len(shape)))
    result = updates.norm_constraint(x, 1.0)
    assert result.dtype == dtype and result.shape == x.shape
    expected = np_norm_constraint(x.double().numpy(), 1.0, axes)
    np.testing.assert_allclose(result.double().numpy(), expected, **TOL[dtype])
    # both regimes are present, so the test can tell axis conventions apart
    norms = torch_norms(x, axes).flatten()
    assert (norms > 1).any() and (norms < 1).any()
    assert not np.allclose(result.double().numpy(), np_norm_constraint(x.double().numpy(), 1.0, (0,)))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lasagne_layout_with_norm_axes_0(shape):
    x = slice_scaled(shape, 1)
    result = updates.norm_constraint(x, 2.5, norm_axes=(0,))
    np.testing.assert_allclose(result.numpy(), np_norm_constraint(x.numpy(), 2.5, (0,)), **TOL[torch.float64])


def test_lasagne_dense_layer_case_by_hand():
    # Lasagne DenseLayer weight (inputs, units) = (2, 2); per-unit norms are the column norms 5 and 0.5
    w = torch.tensor([[3.0, 0.3], [4.0, 0.4]], dtype=torch.float64)
    result = updates.norm_constraint(w, 1.0, norm_axes=(0,), epsilon=0.0)
    expected = torch.tensor([[0.6, 0.3], [0.8, 0.4]], dtype=torch.float64)
    torch.testing.assert_close(result, expected, rtol=1e-15, atol=1e-15)
    # nn.Linear weight (units, inputs) = the transpose; the default axes do the same per unit
    torch.testing.assert_close(updates.norm_constraint(w.T, 1.0, epsilon=0.0), expected.T, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("axes", [(-1,), (-2, -1), (0, -1)])
def test_negative_axes(shape, axes):
    x = slice_scaled(shape, 0)
    positive = tuple(a % len(shape) for a in axes)
    result = updates.norm_constraint(x, 1.0, norm_axes=axes)
    assert torch.equal(result, updates.norm_constraint(x, 1.0, norm_axes=positive))
    np.testing.assert_allclose(result.numpy(), np_norm_constraint(x.numpy(), 1.0, positive), **TOL[torch.float64])


def test_1d_tensor_with_norm_axes():
    x = torch.tensor([3.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(updates.norm_constraint(x, 1.0, norm_axes=(0,), epsilon=0.0), x / 5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("max_norm", [0.0, 0.05, 1.0, 30.0])
def test_result_norms_bounded_and_small_rows_nearly_unchanged(shape, max_norm):
    x = slice_scaled(shape, 0)
    axes = tuple(range(1, len(shape)))
    result = updates.norm_constraint(x, max_norm)
    before, after = torch_norms(x, axes), torch_norms(result, axes)
    assert (after <= max_norm * (1 + 1e-12)).all()
    assert (after <= before).all()
    under = (before < max_norm).expand_as(x)
    # slices under the bound are only multiplied by n / (eps + n)
    ratio = (result[under] / x[under]).numpy()
    np.testing.assert_allclose(ratio, 1.0, rtol=0, atol=EPS / 0.009)
    over = (before > max_norm).flatten()
    if max_norm > 0:
        # slices over the bound end at max_norm * n / (eps + n)
        n = before.flatten()[over]
        np.testing.assert_allclose(after.flatten()[over].numpy(), (max_norm * n / (EPS + n)).numpy(), rtol=1e-12)


def test_max_norm_as_0d_tensor_and_epsilon():
    x = slice_scaled((6, 4), 0)
    assert torch.equal(
        updates.norm_constraint(x, torch.tensor(1.5, dtype=torch.float64)), updates.norm_constraint(x, 1.5)
    )
    result = updates.norm_constraint(x, 1.5, epsilon=0.1)
    np.testing.assert_allclose(result.numpy(), np_norm_constraint(x.numpy(), 1.5, (1,), epsilon=0.1), rtol=1e-12)


def test_zero_slices_stay_zero():
    x = torch.zeros(3, 4, dtype=torch.float64)
    x[1] = 10.0
    result = updates.norm_constraint(x, 1.0)
    assert torch.isfinite(result).all()
    assert not result[0].any() and not result[2].any()


def test_input_is_not_modified():
    x = slice_scaled((5, 3, 2), 0)
    before = x.clone()
    updates.norm_constraint(x, 0.1)
    updates.total_norm_constraint([x], 0.1)
    assert torch.equal(x, before)


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_total_norm_constraint_against_numpy(max_norm, dtype):
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in [(3, 4), (5,), (2, 2, 2), ()]]
    expected, expected_norm = np_total_norm_constraint([x.double().numpy() for x in xs], max_norm)
    result, norm = updates.total_norm_constraint(xs, max_norm, return_norm=True)
    assert isinstance(result, list) and len(result) == len(xs)
    assert norm.dim() == 0
    np.testing.assert_allclose(float(norm), expected_norm, rtol=TOL[dtype]["rtol"])
    for r, e, x in zip(result, expected, xs, strict=True):
        assert r.dtype == dtype and r.shape == x.shape
        np.testing.assert_allclose(r.double().numpy(), e, **TOL[dtype])
    plain = updates.total_norm_constraint(xs, max_norm)
    assert isinstance(plain, list)
    for a, b in zip(plain, result, strict=True):
        assert torch.equal(a, b)
    joint = float(torch.sqrt(sum((r.double() ** 2).sum() for r in result)))
    assert joint <= max_norm * (1 + 1e-6)
    if expected_norm < max_norm:
        assert joint == pytest.approx(expected_norm, rel=1e-6)


def test_total_norm_constraint_by_hand():
    clipped, norm = updates.total_norm_constraint(
        [torch.tensor([3.0], dtype=torch.float64), torch.tensor([[4.0]], dtype=torch.float64)],
        1.0,
        epsilon=0.0,
        return_norm=True,
    )
    assert float(norm) == 5.0
    torch.testing.assert_close(clipped[0], torch.tensor([0.6], dtype=torch.float64))
    torch.testing.assert_close(clipped[1], torch.tensor([[0.8]], dtype=torch.float64))


def test_norm_constraint_is_differentiable():
    x = slice_scaled((4, 3), 0).requires_grad_()
    norms = torch_norms(x.detach(), (1,)).flatten()
    assert ((norms - 1.0).abs() > 1e-3).all()  # stay off the kink of the clip
    assert torch.autograd.gradcheck(lambda t: updates.norm_constraint(t, 1.0), (x,))
    assert torch.autograd.gradcheck(lambda t: updates.norm_constraint(t, 1.0, norm_axes=(0,)), (x,))
    # an unclipped slice has (almost) identity Jacobian, a clipped slice does not
    updates.norm_constraint(x, 1.0).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_total_norm_constraint_is_differentiable():
    gen = torch.Generator().manual_seed(2)
    xs = tuple(torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in [(3,), (2, 2)])
    for max_norm in (0.5, 100.0):
        assert torch.autograd.gradcheck(lambda *ts, m=max_norm: tuple(updates.total_norm_constraint(ts, m)), xs)
    clipped, norm = updates.total_norm_constraint(xs, 0.5, return_norm=True)
    (sum(c.sum() for c in clipped) + norm).backward()
    assert all(x.grad is not None for x in xs)


@pytest.mark.parametrize("rule", ["sgd", "adam", "momentum"])
@pytest.mark.parametrize("engine", ["foreach", "reference"])
def test_constraint_on_the_update_dictionary(rule, engine):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4).double()
    with torch.no_grad():
        model.weight.mul_(20)  # per-unit (row) norms well above 3
    twin = torch.nn.Linear(6, 4).double()
    twin.load_state_dict(model.state_dict())
    kwargs = {"learning_rate": 0.1, "engine": engine}
    opt = getattr(updates, rule)(model.parameters(), **kwargs)
    twin_opt = getattr(updates, rule)(twin.parameters(), **kwargs)
    x = torch.randn(8, 6, dtype=torch.float64)
    W = model.weight
    for _ in range(3):
        upd = opt.updates(model(x).pow(2).mean())
        assert W in upd
        proposal = upd[W].clone()
        upd[W] = updates.norm_constraint(upd[W], 3.0)
        updates.apply_updates(upd)
        assert (W.detach().norm(dim=1) <= 3.0 * (1 + 1e-12)).all()
        assert torch.equal(W.detach(), updates.norm_constraint(proposal, 3.0))
        # the rest of the dictionary (bias, state) is written as the rule proposed
        twin_opt.step(twin(x).pow(2).mean())
        assert torch.equal(model.bias, twin.bias)
        with torch.no_grad():
            twin.weight.copy_(W)  # keep the twins in sync for the next step
    if rule == "adam":
        assert int(opt.state[W]["step"]) == 3


# --- no overflow where the norm itself is representable -------------------------------------


@pytest.mark.parametrize(
    ("dtype", "value"),
    [(torch.float16, 300.0), (torch.bfloat16, 1e38), (torch.float32, 1e20), (torch.float64, 1e160)],
)
def test_norm_constraint_rows_whose_squares_overflow(dtype: torch.dtype, value: float) -> None:
    # Squaring overflows the dtype although the norm (2 * value for 4 equal elements) does not;
    # the result must be the rescaled row, as computed in float64 by NumPy, not zeros.
    row = np.array([value, -value, value, value])
    tensor = torch.tensor(np.stack([row, np.ones(4)]), dtype=dtype)
    got = updates.norm_constraint(tensor, max_norm=1.0, epsilon=0.0).to(torch.float64).numpy()
    exact = tensor.to(torch.float64).numpy()
    norms = np.sqrt((exact**2).sum(axis=1, keepdims=True)) if dtype != torch.float64 else np.array([[2 * value], [2.0]])
    expected = exact * (np.minimum(norms, 1.0) / norms)
    np.testing.assert_allclose(got, expected, rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6)


def test_total_norm_constraint_whose_squares_overflow_float16() -> None:
    # Three float16 tensors of 1000 each: squares of 1e6 overflow float16 (max 65504), the norm
    # sqrt(3) * 1000 = 1732.05 does not.
    tensors = [torch.full((1,), 1000.0, dtype=torch.float16) for _ in range(3)]
    clipped, norm = updates.total_norm_constraint(tensors, 1.0, epsilon=0.0, return_norm=True)
    assert float(norm) == pytest.approx(1000 * np.sqrt(3), rel=1e-3)
    for tensor in clipped:
        assert float(tensor) == pytest.approx(1 / np.sqrt(3), rel=1e-3)


def test_overflow_guard_keeps_gradients_finite() -> None:
    weight = torch.tensor([[1e-3, 2.0], [3.0, 4.0]], requires_grad=True)
    updates.norm_constraint(weight, 1.0).sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


# --- the joint norm's sum over many tensors -----------------------------------------------


def _defined_sum_of_squares(tensors):
    """The joint norm's sum as defined: torch.sum(t * t) per tensor, added in order as 0-d tensors."""
    total = torch.sum(tensors[0] * tensors[0])
    for t in tensors[1:]:
        total = total + torch.sum(t * t)
    return total


def _mixed_tensors(dtype, seed=0):
    """Small tensors of a few shapes in several runs (stacked by rows), short ones of a shape
    seen once, long ones, transposed, 0-d and empty ones, at scales from 1e-3 to 1e3."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4096,), (33,), (7, 5), (4096,), (33,), (20000,), (1,), (), (0,), (7, 5), (3, 70001), (33,)]
    shapes += [(4096,)] * 70 + [(16384,), (16385,), (16384,)] + [(32790,)] * 3  # summed on two threads alone
    scales = [10 ** (6 * torch.rand((), generator=gen) - 3) for _ in shapes]
    tensors = [torch.randn(s, generator=gen, dtype=dtype) * scale for s, scale in zip(shapes, scales, strict=True)]
    tensors.append(torch.randn(5, 7, generator=gen, dtype=dtype).t())  # (7, 5), not contiguous
    return tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_joint_sum_over_many_tensors_is_one_sum_per_tensor_added_in_order(dtype):
    from torchupdates._host_sums import _sums, host_sum_of_squares
    from torchupdates.constraints import _sum_of_squares

    for seed in range(3):
        tensors = _mixed_tensors(dtype, seed)
        assert _sums(tensors, _sum_of_squares) == [torch.sum(t * t).item() for t in tensors]
        got = host_sum_of_squares(tensors, _sum_of_squares)
        assert got is not None and got.dtype == dtype
        assert torch.equal(got, _defined_sum_of_squares(tensors))
        expected_norm = torch.sqrt(_defined_sum_of_squares(tensors))
        assert torch.equal(updates.total_norm_constraint(tensors, 1.0, return_norm=True)[1], expected_norm)


@pytest.mark.parametrize("flush", [False, True])
def test_joint_sum_with_subnormal_overflowing_and_nonfinite_parts(flush):
    from torchupdates._host_sums import host_sum_of_squares
    from torchupdates.constraints import _sum_of_squares

    cases = {
        "subnormal squares": [torch.full((4096,), 1e-23), torch.full((4096,), 2e-23), torch.full((33,), 1e-22)],
        "overflowing squares": [torch.full((4096,), 1e20), torch.ones(4096), torch.full((10,), 3e19)],
        "an infinity": [torch.ones(4096), torch.tensor([1.0, float("inf")]), torch.ones(4096)],
        "a NaN": [torch.ones(4096), torch.tensor([float("nan")]), torch.ones(33)],
    }
    torch.set_flush_denormal(flush)
    try:
        for name, tensors in cases.items():
            got = host_sum_of_squares(tensors, _sum_of_squares)
            expected = _defined_sum_of_squares(tensors)
            if got is None:
                assert name == "subnormal squares" and not flush  # the tensors add them instead
            else:
                assert torch.equal(got, expected) or (got.isnan() and expected.isnan()), name
            norm = updates.total_norm_constraint(tensors, 1.0, return_norm=True)[1]
            if name != "overflowing squares":  # (those take the rescaling pass, checked elsewhere)
                assert torch.equal(norm, torch.sqrt(expected)) or (norm.isnan() and expected.isnan()), name
    finally:
        torch.set_flush_denormal(False)


def test_joint_sum_takes_a_few_calls_for_many_small_tensors():
    from torch.utils._python_dispatch import TorchDispatchMode

    from torchupdates._host_sums import host_sum_of_squares
    from torchupdates.constraints import _sum_of_squares

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(100, generator=gen) for _ in range(1000)] + [torch.randn(300, 300, generator=gen)]
    with Count():
        got = host_sum_of_squares(tensors, _sum_of_squares)
    assert torch.equal(got, _defined_sum_of_squares(tensors))
    assert Count.calls < 30  # one sum per tensor would be 2,000 calls and more


def test_joint_norm_of_tensors_that_need_gradients_stays_differentiable():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(50, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(5)]
    _, norm = updates.total_norm_constraint(tensors, 1.0, return_norm=True)
    norm.backward()
    for t in tensors:
        torch.testing.assert_close(t.grad, t.detach() / norm.detach(), rtol=1e-12, atol=0)


def test_joint_norm_first_taken_in_inference_mode_works_outside_it():
    # The stacking buffer is kept per thread: made in inference mode, it would refuse writes after.
    import threading

    def first_inside_then_outside(results):
        tensors = [torch.full((100,), 0.5) for _ in range(5)]
        with torch.inference_mode():
            inside = updates.total_norm_constraint(tensors, 1.0, return_norm=True)[1]
        outside = updates.total_norm_constraint(tensors, 1.0, return_norm=True)[1]
        results += [inside.item(), outside.item()]

    results: list[float] = []
    thread = threading.Thread(target=first_inside_then_outside, args=(results,))  # a thread's first use
    thread.start()
    thread.join()
    assert results == [pytest.approx(0.5 * 500**0.5, rel=1e-6)] * 2
