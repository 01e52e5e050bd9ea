"""``engine="compiled"``: layouts, replaced tensors, checkpoints and recompilation.

The exactness of every rule and composition on this engine is tested with the others (in
``test_exactness.py``: float64 against the NumPy transcription, float32 bit for bit against the
eager engines). Here the things only this engine can get wrong: its flat buffers must follow
whatever the user or a framework does to parameters, gradients and state between steps, and a
changed hyperparameter must not compile a new kernel. The eager foreach engine is the yardstick:
float32 results must equal its results bit for bit.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from typing import cast

import pytest
import torch

import torchupdates
from compiler import needs_compiler

pytestmark = needs_compiler

Build = Callable[..., torchupdates.Optimizer]
CHAINS: dict[str, Build] = {
    "adam": lambda p, **k: torchupdates.adam(p, 0.01, **k),
    "nesterov(rmsprop)": lambda p, **k: torchupdates.apply_nesterov_momentum(torchupdates.rmsprop(p, 0.01, **k)),
    "momentum(adadelta, subset)": lambda p, **k: torchupdates.apply_momentum(torchupdates.adadelta(p, **k), p[1:3]),
}


def make_params(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """One tensor of each layout: plain, channels_last, a transposed (non-contiguous) leaf,
    0-d, empty, and complex."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype)

    tensors = [
        randn(3, 4),
        randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        randn(5, 3).t(),
        randn(),
        randn(0, 3),
        randn(4, dtype=torch.complex64 if dtype == torch.float32 else torch.complex128),
    ]
    return [t.detach().requires_grad_(True) for t in tensors]


def gradients(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]


def assert_same(a: torchupdates.Optimizer, pa: list[torch.Tensor], b: torchupdates.Optimizer, pb: list[torch.Tensor]):
    for i, (x, y) in enumerate(zip(pa, pb, strict=True)):
        assert x.dtype == y.dtype and torch.equal(x.detach(), y.detach()), f"param {i}"
        assert set(a.state[x]) == set(b.state[y]), f"param {i} state keys"
        for key, value in a.state[x].items():
            assert torch.equal(value, b.state[y][key]), f"param {i} state {key}"


@pytest.mark.parametrize("chain", CHAINS)
def test_every_layout_equals_foreach(chain: str) -> None:
    runs = []
    for engine in ("foreach", "compiled"):
        params = make_params()
        opt = CHAINS[chain](params, engine=engine)
        for k in range(4):
            for p, g in zip(params, gradients(params, k), strict=True):
                p.grad = g
            opt.step()
        runs.append((opt, params))
    assert_same(*runs[0], *runs[1])
    compiled_params = runs[1][1]
    assert compiled_params[1].is_contiguous(memory_format=torch.channels_last)
    assert compiled_params[2].stride() == (1, 3)


def test_low_precision_parameters_with_float32_state() -> None:
    runs = []
    for engine in ("foreach", "compiled"):
        params = [p.detach().to(torch.bfloat16).requires_grad_(True) for p in make_params()[:4]]
        opt = torchupdates.apply_momentum(torchupdates.adam(params, 0.01, engine=engine, state_dtype=torch.float32))
        for k in range(3):
            opt.step(gradients(params, k))
        runs.append((opt, params))
    assert_same(*runs[0], *runs[1])
    assert runs[1][0].state[runs[1][1][0]]["m"].dtype == torch.float32


def test_sparse_gradients() -> None:
    runs = []
    for engine in ("foreach", "compiled"):
        params = make_params()[:1]
        opt = torchupdates.momentum(params, 0.1, engine=engine)
        for k in range(3):
            opt.step([gradients(params, k)[0].to_sparse()])
        runs.append((opt, params))
    assert_same(*runs[0], *runs[1])


def replace_things(step: int, model: torch.nn.Module, opt: torchupdates.Optimizer) -> None:
    """What users and frameworks do between steps; the same on both engines. The last two
    leave tensors the compiled engine cannot hold as views of its buffers (other strides),
    so that every earlier one comes after a step that made them views."""
    weight = model[0].weight
    if step == 1:
        opt.zero_grad()  # .grad becomes None; backward makes new tensors
    elif step == 2:
        opt.zero_grad(set_to_none=False)  # zeroed in place: backward accumulates into them
    elif step == 3:
        weight.data = weight.data.clone()  # a new storage for one parameter
    elif step == 4:
        weight.grad = weight.grad.clone()  # a new gradient tensor, set by hand
    elif step == 5:
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # state tensors replaced
    elif step == 6:
        state = opt.state[model[2].weight]
        state["m"] = state["m"].clone()  # one state tensor replaced by hand
    elif step == 7:
        model[2].bias.requires_grad_(False)  # frozen, its old .grad kept: left as it is
    elif step == 8:
        for p in model.parameters():
            p.grad = p.grad.t().contiguous().t() if p.dim() == 2 else p.grad  # other strides
    elif step == 9:
        model.to(memory_format=torch.channels_last)  # p.data reassigned, with new strides


def test_replaced_gradients_parameters_and_state(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchupdates import optimizer

    repeated: list[bool] = []
    original = optimizer.step_again

    def spy(opt: torchupdates.Optimizer, given: object = None) -> bool:
        stepped = original(opt, given)  # type: ignore[arg-type]
        if opt.engine == "compiled":
            repeated.append(stepped)
        return stepped

    monkeypatch.setattr(optimizer, "step_again", spy)
    runs = []
    for engine in ("foreach", "compiled"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 2), torch.nn.Flatten(), torch.nn.Linear(12, 1))
        opt = torchupdates.apply_nesterov_momentum(torchupdates.adam(model.parameters(), 0.01, engine=engine))
        x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
        for step in range(11):
            replace_things(step, model, opt)
            model(x).pow(2).mean().backward()
            opt.step()
        runs.append((opt, list(model.parameters())))
    assert_same(*runs[0], *runs[1])
    # The steady state stepped where only gradients were new (copied in) or kept, and gave
    # way to the ordinary step after every other replacement.
    assert repeated == [False, True, True, False, True, False, False, False, True, False, False]


def test_checkpoint_resume_is_exact() -> None:
    def run(steps: range, params: list[torch.Tensor], opt: torchupdates.Optimizer) -> None:
        for k in steps:
            opt.step(gradients(params, k))

    straight = make_params()
    straight_opt = CHAINS["nesterov(rmsprop)"](straight, engine="compiled")
    run(range(6), straight, straight_opt)

    first = make_params()
    first_opt = CHAINS["nesterov(rmsprop)"](first, engine="compiled")
    run(range(3), first, first_opt)
    saved = copy.deepcopy(first_opt.state_dict())
    resumed = [p.detach().clone().requires_grad_(True) for p in first]
    resumed_opt = CHAINS["nesterov(rmsprop)"](resumed, engine="compiled")
    resumed_opt.load_state_dict(saved)
    run(range(3, 6), resumed, resumed_opt)
    assert_same(straight_opt, straight, resumed_opt, resumed)


def test_no_recompilation_when_hyperparameters_change() -> None:
    from torch._dynamo.utils import counters

    params = make_params()[:3]
    momentum = torch.tensor(0.9, dtype=torch.float64)
    opt = torchupdates.apply_momentum(torchupdates.rmsprop(params, 0.01, engine="compiled"), momentum=momentum)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(gradients(params, 0))
    graphs = counters["stats"]["unique_graphs"]
    before = [p.detach().clone() for p in params]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(1, 4):
            scheduler.step()  # group["lr"], a new Python float each time
            opt.param_groups[0]["rho"] = 0.5 + 0.1 * k  # set by hand
            momentum.mul_(0.9)  # a 0-d tensor changed in place
            opt.step(gradients(params, k))
    assert counters["stats"]["unique_graphs"] == graphs
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, params, strict=True))


def test_equal_and_recurring_coefficients_neither_recompile_nor_mix_up() -> None:
    # Coefficient tensors are reused from step to step; equal values at different places of
    # one call must stay different tensors, or torch.compile would guard on the aliasing.
    params, twins = make_params()[:3], make_params()[:3]
    compiled = torchupdates.rmsprop(params, 0.5, rho=0.5, engine="compiled")
    eager = torchupdates.rmsprop(twins, 0.5, rho=0.5)
    settings = [(0.5, 0.5), (0.25, 0.75), (0.5, 0.5), (0.25, 0.75)]  # lr, rho: 1 - rho == lr
    for k, (lr, rho) in enumerate(settings):
        for opt in (compiled, eager):
            opt.param_groups[0].update(lr=lr, rho=rho)
        grads = gradients(params, k)
        eager.step(grads)
        with torch._dynamo.config.patch(error_on_recompile=k > 0):
            compiled.step(grads)
        assert_same(compiled, params, eager, twins)


def repeat_results(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each call of the compiled engine's steady state (``run_repeat``) returns, in order."""
    from torchupdates.engines.compiled import CompiledEngine

    results: list[bool] = []
    original = CompiledEngine.run_repeat

    def spy(self: CompiledEngine, *args: object) -> bool:
        results.append(original(self, *args))  # type: ignore[arg-type]
        return results[-1]

    monkeypatch.setattr(CompiledEngine, "run_repeat", spy)
    return results


@pytest.mark.parametrize("count", [3, 70])  # counters read whole, or by their bounds
def test_step_counters_written_between_steps_are_read(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    # Counters written between steady-state steps are read at the next step: all reset
    # alike, then one alone (a batch of its own step count).
    repeated = repeat_results(monkeypatch)
    params, twins = (
        [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(count)] for _ in "ab"
    )
    for p in params + twins:
        p.requires_grad_(True)
    compiled = torchupdates.adam(params, 0.1, engine="compiled")
    eager = torchupdates.adam(twins, 0.1)
    edits = {
        3: lambda opt, ps: [opt.state[p]["step"].zero_() for p in ps],
        5: lambda opt, ps: opt.state[ps[1]]["step"].fill_(40),
    }
    for k in range(8):
        for opt, ps in ((compiled, params), (eager, twins)):
            if k in edits:
                edits[k](opt, ps)
            for p, g in zip(ps, gradients(ps, k), strict=True):
                p.grad = g
            opt.step()
        assert_same(compiled, params, eager, twins)
    assert [int(compiled.state[p]["step"]) for p in params] == [5, 43] + [5] * (count - 2)
    assert repeated.count(True) >= 4  # the edited steps, and others, ran the steady state


def test_float32_kernels_on_the_cpu_take_coefficients_rounded_as_eager_torch_rounds_them() -> None:
    from torchupdates.engines.compiled import _coefficients

    # Eager float32 arithmetic rounds a scalar operand to float32 first: so may the engine,
    # once, instead of the kernel converting a float64 in every iteration of its loop.
    values = [0.1, torch.tensor(1 / 3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float32), 1e-300]
    rounded = _coefficients(values, torch.device("cpu"), torch.float32)
    assert [c.dtype for c in rounded] == [torch.float32] * 4
    x = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float32)
    for value, coefficient in zip(values, rounded, strict=True):
        assert torch.equal(x * value, x * coefficient)
    # Other working dtypes keep float64 numbers (16-bit kernels round scalars their own way).
    for work in (torch.float64, torch.float16, torch.bfloat16):
        assert _coefficients([0.1], torch.device("cpu"), work)[0].dtype == torch.float64


def test_coefficient_tensors_keep_the_sign_of_zero() -> None:
    from torchupdates.engines.compiled import _coefficients

    # Each place sees both zeros in turn: 0.0 == -0.0, yet they multiply differently.
    for values in ([0.0, -0.0, 1.5], [-0.0, 0.0, 1.5], [0.0, -0.0, -1.5]):
        for work in (torch.float64, torch.float32):
            coefficients = _coefficients(values, torch.device("cpu"), work)
            assert [math.copysign(1.0, float(c)) for c in coefficients] == [math.copysign(1.0, v) for v in values]


def test_missing_compiler_is_a_clear_error_before_any_step() -> None:
    from torch._inductor import config

    params = make_params()[:2]
    with (
        config.patch({"cpp.cxx": ("/nonexistent/g++",)}),
        pytest.raises(RuntimeError, match=r'C\+\+ compiler.*g\+\+.*engine="foreach"'),
    ):
        torchupdates.adam(params, engine="compiled")
    # The default engine needs no compiler.
    torchupdates.adam(params).step(gradients(params, 0))


@pytest.mark.parametrize(
    "options",
    [{}, {"max_grad_norm": 0.05, "skip_nonfinite": True}, {"max_norm": 0.3}],
    ids=["plain", "clipped and checked", "norm constraint last"],
)
@pytest.mark.parametrize("set_to_none", [False, True], ids=["grads kept", "new grads"])
def test_steady_state_steps_skip_the_slots_and_stay_exact(
    monkeypatch: pytest.MonkeyPatch, set_to_none: bool, options: dict[str, object]
) -> None:
    # A training loop steps through the engine's repeat (no per-parameter slots) with the same
    # numbers: in place when it keeps its .grad tensors, copying them in when backward makes
    # new ones (torch's default zero_grad()); with the guards too, the clipping factor then
    # applied inside the kernel.
    repeated = repeat_results(monkeypatch)
    runs = []
    for engine in ("foreach", "compiled"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        rule_options = {k: v for k, v in options.items() if k != "max_norm"}
        opt = torchupdates.apply_momentum(torchupdates.amsgrad(model.parameters(), 0.01, engine=engine, **rule_options))
        if "max_norm" in options:  # the constraint runs on the written parameters
            opt = torchupdates.apply_norm_constraint(opt, options["max_norm"], params=[model[0].weight])
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
        for _ in range(5):
            opt.zero_grad(set_to_none=set_to_none)
            model(x).pow(2).mean().backward()
            opt.step()
        runs.append((opt, list(model.parameters())))
    assert_same(*runs[0], *runs[1])
    assert repeated == [True] * 8  # both engines keep flat buffers; the first step builds them
    if "max_norm" in options:
        assert float(runs[1][1][0].detach().norm(dim=1).max()) <= 0.3 + 1e-6  # the constraint held
    if "max_grad_norm" in options:
        norms = [cast(torch.Tensor, opt.grad_norm) for opt, _ in runs]
        assert torch.equal(norms[0], norms[1]) and float(norms[1]) > 0.05  # the same norm, and clipping acted


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", ["momentum", "adagrad", "adam", "adamax", "amsgrad"])
def test_16_bit_parameters_round_like_eager_torch(rule: str, dtype: torch.dtype) -> None:
    # Eager torch computes a 16-bit operation in float32, with Python scalars unrounded, and
    # rounds each result once; the fused kernel must round operation by operation the same way.
    # Eager torch on CPU also rounds the scalar of an add or a subtraction to 16 bits first
    # (epsilon here), not that of a product or a quotient. Compared as bit patterns: in
    # float16, Adam's default epsilon (1e-8) rounds to zero, so a zero gradient gives 0/0,
    # and the NaNs must be the same NaNs.
    hyper = {"learning_rate": 0.01} if rule == "momentum" else {}
    runs = []
    for epsilon, engine in itertools.product((None, 1e-4), ("reference", "compiled")):
        extra = {} if epsilon is None or rule == "momentum" else {"epsilon": epsilon}
        long = torch.randn(20_000, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        params = [p.detach().to(dtype).requires_grad_(True) for p in [*make_params()[:4], long]]
        opt = getattr(torchupdates, rule)(params, engine=engine, **hyper, **extra)
        for k in range(5):
            opt.step(gradients(params, k))
        tensors = [p.detach() for p in params] + [t for p in params for t in opt.state[p].values()]
        runs.append([t.view(torch.int16) if t.dtype == dtype else t for t in tensors])
    for eager, compiled in (runs[:2], runs[2:]):
        assert all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True))


def test_new_large_gradients_are_read_where_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    # A loop that makes new gradients every step (torch's default zero_grad()): on the CPU the
    # kernel reads a large new .grad where it is, one call for its member, instead of copying
    # it into the bucket. Here "large" is 8 elements or more. Copied instead: a gradient laid
    # out otherwise than its parameter, and small ones (which lie together after the large
    # members: one call for them all).
    from torchupdates.engines import compiled

    monkeypatch.setattr(compiled, "GRADIENTS_IN_PLACE_FROM", 8)
    read_in_place: list[list[int]] = []
    original = compiled.CompiledEngine._run_kernel_in_pieces

    def spy(self: compiled.CompiledEngine, *args: object) -> None:
        read_in_place.append(sorted(cast(dict, args[-1])))
        original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(compiled.CompiledEngine, "_run_kernel_in_pieces", spy)
    repeated = repeat_results(monkeypatch)
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype)

    channels_last = torch.channels_last
    tensors = [
        randn(3, 4),  # 0: read in place
        randn(),  # 1: small: copied
        randn(2, 3, 4, 5).to(memory_format=channels_last),  # 2: read in place
        randn(2, 3, 4, 5).to(memory_format=channels_last),  # 3: read in place
        randn(2, 3, 4, 5).to(memory_format=channels_last),  # 4: its gradients contiguous: copied
        randn(5, 3).t(),  # 5: transposed, its gradient too: read in place
        randn(8, dtype=torch.complex64),  # 6: in a bucket of its own (another dtype): read in place
        randn(4),  # 7: small: copied
        randn(3, 4),  # 8: read in place
        randn(),  # 9: small: copied
    ]

    def new_grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        made = torch.Generator().manual_seed(100 + step)
        grads = [torch.randn(p.shape, generator=made, dtype=p.dtype) for p in params]
        grads[2], grads[3] = (g.to(memory_format=channels_last) for g in grads[2:4])
        if step == 0:
            grads[4] = grads[4].to(memory_format=channels_last)
        grads[5] = torch.randn(5, 3, generator=made).t()
        return grads

    runs = []
    for engine in ("foreach", "compiled"):
        params = [t.detach().clone().requires_grad_(True) for t in tensors]
        opt = torchupdates.apply_nesterov_momentum(torchupdates.adam(params, 0.01, engine=engine))
        grads: list[torch.Tensor] = []
        for step in range(6):
            previous, grads = grads, new_grads(params, step)
            if step == 4:  # a small gradient kept from the last step: made the bucket's view
                grads[7] = previous[7]
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            # One kernel serves every piece and the whole buffers: nothing compiles again.
            with torch._dynamo.config.patch(error_on_recompile=True):
                opt.step()
            if engine == "compiled" and step > 0:
                assert all(params[i].grad is grads[i] for i in (0, 2, 3, 5, 6, 8)), "read in place, not re-pointed"
                assert (params[7].grad is grads[7]) == (step != 4), "re-pointed once it was kept"
        runs.append((opt, params))
    assert_same(*runs[0], *runs[1])
    # Members 0, 2, 3, 5 and 8 (its 7th) of the first bucket, and 4 at the first step (its
    # first gradient is laid out as it is); 6 in its own. The first step reads them in place too.
    assert read_in_place == [[0, 2, 3, 4, 5, 7], [0]] + [[0, 2, 3, 5, 7], [0]] * 5
    # Every step after the first repeats, on both engines, although the compiled engine cannot
    # make every .grad its view (member 4's are laid out otherwise).
    assert repeated == [True] * 10


def test_pieces_cover_the_buffers_and_are_never_one_element_long() -> None:
    # A kernel run in pieces (gradients of members read where they are) covers every element
    # once, and no stretch between those members is one element long (a kernel with dynamic
    # shapes compiles again for length 1): a member whose piece would leave one is dropped.
    from torchupdates.engines._flat import FlatBucket

    def pieces(bucket: FlatBucket, outside: list[int]) -> list[tuple[str, int]]:
        grads = {i: torch.zeros(bucket.spans[i].shape) for i in bucket.keep_pieces_long(outside)}
        made = []
        for piece in bucket.pieces("grad", grads):
            index = next((i for i, g in grads.items() if g.data_ptr() == piece[1].data_ptr()), None)
            assert len({t.numel() for t in piece}) == 1
            made.append(("stretch" if index is None else f"member {index}", piece[0].numel()))
        assert sum(n for _, n in made) == bucket.buffers["param"].numel()
        return made

    def bucket(shapes: list[tuple[int, ...]], large_first_from: int | None) -> FlatBucket:
        params = [torch.zeros(shape) for shape in shapes]
        roles = {"param": torch.float32, "grad": torch.float32}
        made = FlatBucket(params, roles, torch.device("cpu"), 1 << 16, large_first_from)
        made.take("param", params)
        return made

    shapes: list[tuple[int, ...]] = [(4,), (), (3,), (5,), ()]
    # In the members' order, member 2 would leave member 1 alone, member 3 member 4 at the end.
    assert pieces(bucket(shapes, None), [0, 2, 3]) == [("member 0", 4), ("stretch", 10)]
    large_first = bucket(shapes, 3)  # ranges of members 0, 2 and 3, then of 1 and 4
    assert large_first.memory_order == [0, 2, 3, 1, 4]
    assert pieces(large_first, [0, 2, 3]) == [("member 0", 4), ("member 2", 3), ("member 3", 5), ("stretch", 2)]
    assert pieces(bucket([(4,), (3,), ()], 3), [0, 1]) == [("member 0", 4), ("stretch", 4)]


@pytest.mark.parametrize("given", ["list", "loss", "the same list"])
def test_gradients_passed_to_step_take_the_steady_state(monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    # step(grads) and step(loss), Lasagne's way, repeat as a loop over .grad does (no slots per
    # parameter), with the same numbers as the reference engine; .grad is left as it is, and
    # a bad gradient is still refused before anything is written.
    repeated = repeat_results(monkeypatch)
    runs = []
    for engine in ("reference", "foreach", "compiled"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        params = list(model.parameters())
        opt = torchupdates.apply_momentum(torchupdates.adam(params, 0.01, engine=engine), params[:2])
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
        kept = [torch.full_like(p, 0.1) for p in params]  # the caller's: never made .grad
        own = [torch.zeros_like(p) for p in params]  # .grad, which a step given gradients ignores
        for p, g in zip(params, own, strict=True):
            p.grad = g
        for _ in range(5):
            loss = model(x).pow(2).mean()
            if given == "the same list":
                opt.step(kept)
            else:
                opt.step(loss if given == "loss" else list(torch.autograd.grad(loss, params)))
            assert all(p.grad is g for p, g in zip(params, own, strict=True))
        before = [p.detach().clone() for p in params]
        bad = [torch.zeros_like(p) for p in params]
        bad[2] = torch.zeros(3, 8)
        with pytest.raises(ValueError, match=r"gradient of parameter 2 .* has shape \(3, 8\)"):
            opt.step(bad)
        assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
        runs.append((opt, params))
    assert_same(*runs[0], *runs[1])
    assert_same(*runs[0], *runs[2])
    assert repeated == [True] * 8  # steps 2 to 5 of the foreach and compiled engines
