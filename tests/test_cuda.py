"""The engines on a CUDA device: the compiled engine (Triton kernels) against the eager CUDA engines.

Triton contracts ``a * b + c`` into one FMA and divides approximately by default, where eager
CUDA rounds every multiply, add and divide on its own; the compiled engine turns both off, so
float32 results must equal the eager CUDA engines bit for bit, and float64 results within an
ulp. Every test here skips on a machine without CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

import torchupdates
from test_exactness import CHAIN_IDS, CHAINS, SHAPES, Chain, assert_bitwise_equal, make_problem
from torchupdates import apply_updates
from torchupdates.registry import RULE_NAMES as RULES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Tensors longer than one Triton block, and one whose length is not a multiple of it.
CUDA_SHAPES: list[tuple[int, ...]] = [*SHAPES, (300, 300), (70001,)]
ENGINES = ("reference", "foreach", "compiled")


def cuda_problem(seed: int, steps: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    init, grads = make_problem(seed, steps=steps, dtype=dtype, shapes=CUDA_SHAPES)
    return [p.cuda() for p in init], [[g.cuda() for g in step] for step in grads]


def run_engines(
    chain: Chain, dtype: torch.dtype, steps: int = 20
) -> list[tuple[torchupdates.Optimizer, list[torch.Tensor]]]:
    init, grads = cuda_problem(3, steps, dtype)
    runs = []
    for engine in ENGINES:
        params = [p.clone().requires_grad_(True) for p in init]
        opt = chain.build(params, engine)
        for g in grads:
            opt.step([x.clone() for x in g])
        runs.append((opt, params))
    return runs


def tensors_of(opt: torchupdates.Optimizer, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach() for p in params] + [t for p in params for t in opt.state.get(p, {}).values()]


@pytest.mark.parametrize("chain", CHAINS, ids=CHAIN_IDS)
def test_float32_engines_agree_bitwise(chain: Chain) -> None:
    runs = run_engines(chain, torch.float32)
    for opt, params in runs[1:]:
        assert_bitwise_equal(*runs[0], opt, params)


@pytest.mark.parametrize("chain", CHAINS[: len(RULES)], ids=CHAIN_IDS[: len(RULES)])
def test_float64_compiled_within_one_ulp(chain: Chain) -> None:
    (reference, ref_params), _, (compiled, params) = run_engines(chain, torch.float64, steps=10)
    for want, got in zip(tensors_of(reference, ref_params), tensors_of(compiled, params), strict=True):
        if not want.is_floating_point():  # step counters
            assert torch.equal(want, got)
            continue
        one_ulp = torch.nextafter(want.abs(), torch.tensor(float("inf"), dtype=want.dtype, device=want.device))
        assert bool(((got - want).abs() <= one_ulp - want.abs()).all()), f"more than one ulp apart: {chain.id}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", ["momentum", "adagrad", "adam", "adamax", "amsgrad"])
def test_16_bit_parameters_round_like_eager_cuda(rule: str, dtype: torch.dtype) -> None:
    chain = CHAINS[RULES.index(rule)]
    init, grads = cuda_problem(4, 5, dtype)
    runs = []
    for engine in ("reference", "compiled"):
        params = [p.clone().requires_grad_(True) for p in init]
        opt = chain.build(params, engine)
        for g in grads:
            opt.step([x.clone() for x in g])
        # Bit patterns: the same NaNs (float16 Adam's epsilon rounds to zero) must come out.
        runs.append([t.view(torch.int16) if t.dtype == dtype else t for t in tensors_of(opt, params)])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("chain", [CHAINS[RULES.index("adam")], CHAINS[-1]], ids=["adam", CHAIN_IDS[-1]])
def test_compiled_step_equals_apply_updates(chain: Chain) -> None:
    init, grads = cuda_problem(5, 6, torch.float32)
    pa = [p.clone().requires_grad_(True) for p in init]
    pb = [p.clone().requires_grad_(True) for p in init]
    a, b = chain.build(pa, "compiled"), chain.build(pb, "compiled")
    for g in grads:
        a.step(g)
        apply_updates(b.updates(g))
    assert_bitwise_equal(a, pa, b, pb)


@pytest.mark.parametrize("set_to_none", [False, True], ids=["grads kept", "new grads"])
def test_training_loop_with_grad(set_to_none: bool) -> None:
    runs = []
    for engine in ENGINES:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).cuda()
        opt = torchupdates.apply_momentum(torchupdates.amsgrad(model.parameters(), 0.01, engine=engine))
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)).cuda()
        for _ in range(5):
            opt.zero_grad(set_to_none=set_to_none)
            model(x).pow(2).mean().backward()
            opt.step()
        runs.append((opt, list(model.parameters())))
    for opt, params in runs[1:]:
        assert_bitwise_equal(*runs[0], opt, params)


def compiled_step_trajectory(engine: str, compiled: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).cuda()
    opt = torchupdates.adam(model.parameters(), 0.01, engine=engine)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)).cuda()

    def train_step() -> None:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    step = torch.compile(train_step) if compiled else train_step
    for _ in range(4):
        step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("engine", ENGINES)
def test_torch_compile_of_a_training_step(engine: str) -> None:
    # A user's compiled training step follows the eager one on the same engine.
    eager, traced = (compiled_step_trajectory(engine, compiled) for compiled in (False, True))
    for want, got in zip(eager, traced, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_compiled_steps_copy_nothing_to_the_gpu() -> None:
    # A step's coefficients (learning rate, bias correction, ...) reach the kernel as
    # arguments: a host-to-device copy per step would also make the host wait for the GPU.
    params = [torch.randn(300, 300, device="cuda", requires_grad=True) for _ in range(3)]
    opt = torchupdates.apply_momentum(torchupdates.adam(params, 0.01, engine="compiled"))
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(3):
            opt.step()
        torch.cuda.synchronize()
    names = [event.name for event in profile.events()]
    assert any("triton" in name for name in names), names
    assert not [name for name in names if "HtoD" in name], names
