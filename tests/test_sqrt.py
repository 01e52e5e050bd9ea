"""The square roots the rules use are correctly rounded (IEEE 754), on CPU, in every float dtype.

Reference: NumPy's ``sqrt``, which is IEEE (correctly rounded) in float32 and float64; for
float16 and bfloat16, NumPy's float64 root rounded once to the narrow type (float16 by NumPy's
own correctly rounded conversion, bfloat16 by round-to-nearest-even on the bits, below).
float16 and bfloat16 are checked on all 65,536 values; float32 on millions of random bit
patterns plus the cases closest to rounding boundaries: squares of floats and of the
midpoints between neighbouring floats, and their neighbours. ``TORCHUPDATES_EXHAUSTIVE=1``
also checks every float32 (minutes).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from torchupdates.engines._program import compile_program
from torchupdates.formula import Graph, _sqrt
from torchupdates.formula import sqrt as formula_sqrt

NARROW = [torch.float32, torch.float16, torch.bfloat16]


def _bits(tensor: torch.Tensor) -> np.ndarray:
    width = {2: np.uint16, 4: np.uint32, 8: np.uint64}[tensor.element_size()]
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(width)
    return tensor.numpy().view(width)


def _round_to_bfloat16_bits(wide: np.ndarray) -> np.ndarray:
    """float64 -> bfloat16 bits, correctly rounded (nearest, ties to even), NaN kept NaN."""
    bits = wide.view(np.uint64)
    sign = (bits >> 63).astype(np.uint32)
    magnitude = np.abs(wide)
    out = np.empty(wide.shape, dtype=np.uint16)
    # Work per finite value with exact float64 arithmetic: bfloat16 has 8 significant bits.
    finite = np.isfinite(magnitude) & (magnitude > 0)
    _, e = np.frexp(magnitude[finite])  # magnitude = m * 2**e, 0.5 <= m < 1
    # Normal bfloat16 exponents: e - 1 >= -126; below, the quantum is fixed at 2**-133.
    quantum_exp = np.maximum(e - 8, -133)
    scaled = np.ldexp(magnitude[finite], -quantum_exp)  # exact: a power-of-two scaling
    rounded = np.rint(scaled)  # ties to even, exact in float64
    value = np.ldexp(rounded, quantum_exp).astype(np.float32)  # exact: fits bfloat16, so float32
    out_finite = (value.view(np.uint32) >> 16).astype(np.uint16)
    out[finite] = out_finite
    out[magnitude == 0] = 0
    out[np.isinf(magnitude)] = 0x7F80
    out[np.isnan(wide)] = 0x7FC0
    return out | (sign << 15).astype(np.uint16)


def _expected_bits(x: torch.Tensor) -> np.ndarray:
    """IEEE square roots of ``x`` as bits (NaN results normalised by the comparison)."""
    if x.dtype == torch.float32:
        with np.errstate(invalid="ignore"):
            return _bits(torch.from_numpy(np.sqrt(x.numpy())))
    wide = x.double().numpy()
    with np.errstate(invalid="ignore"):
        root = np.sqrt(wide)
    if x.dtype == torch.float16:
        return root.astype(np.float16).view(np.uint16)
    return _round_to_bfloat16_bits(root)


def _assert_correctly_rounded(x: torch.Tensor, got: torch.Tensor) -> None:
    assert got.dtype == x.dtype and got.shape == x.shape
    expected, actual = _expected_bits(x), _bits(got)
    nan = torch.isnan(got).numpy()
    want_nan = torch.isnan(x).numpy() | (x < 0).numpy()
    assert np.array_equal(nan, want_nan)
    wrong = (~nan) & (expected != actual)
    assert not wrong.any(), f"{int(wrong.sum())} wrong, e.g. sqrt({x[torch.from_numpy(wrong)][:5].tolist()})"


def _every_16_bit(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)


def _float32_hard_cases(count: int, seed: int) -> torch.Tensor:
    """Squares of random floats and of midpoints between neighbours, and their neighbours."""
    rng = np.random.default_rng(seed)
    exponents = rng.integers(-75, 64, count)
    roots = np.ldexp(rng.uniform(1.0, 2.0, count), exponents).astype(np.float32).astype(np.float64)
    ulps = np.spacing(roots.astype(np.float32)).astype(np.float64)
    candidates = [roots * roots, (roots + ulps / 2) ** 2, (roots - ulps / 4) ** 2]
    values = []
    for c in candidates:
        base = c.astype(np.float32)  # nearest float32 to the square
        values += [base, np.nextafter(base, np.float32(np.inf)), np.nextafter(base, np.float32(0))]
    flat = np.concatenate(values)
    return torch.from_numpy(flat[np.isfinite(flat)].astype(np.float32))


def _float32_edges() -> torch.Tensor:
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, -1.0, -1e-45, 1.0, 2.0, 4.0, 0.25]
    tiny = np.float32(1e-45)
    denormals = [tiny, tiny * 2, tiny * 3, np.float32(1.1754942e-38), np.float32(1.1754944e-38)]
    powers = [np.ldexp(np.float32(1), k) for k in range(-149, 128)]
    largest = [np.finfo(np.float32).max, np.nextafter(np.finfo(np.float32).max, np.float32(0))]
    values = np.array(specials + denormals + powers + largest, dtype=np.float32)
    with np.errstate(over="ignore"):
        up, down = np.nextafter(values, np.float32(np.inf)), np.nextafter(values, np.float32(-np.inf))
    near = np.concatenate([values, up, down])
    return torch.from_numpy(near)


def _float32_random(count: int, seed: int) -> torch.Tensor:
    """Uniform random bit patterns of non-negative floats: every exponent alike."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 0x7F800001, count, dtype=np.uint32)
    return torch.from_numpy(bits.view(np.float32))


def _sqrts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every way the library takes a square root, on ``x``."""
    results = {"sqrt_tensor": _sqrt.sqrt_tensor(x), "formula": formula_sqrt(x)}
    out = torch.empty_like(x)
    _sqrt.sqrt_into(x, out)
    results["sqrt_into"] = out
    results["sqrt_list"] = _sqrt.sqrt_list([x])[0]
    inplace = x.clone()
    _sqrt.sqrt_list_([inplace])
    results["sqrt_list_"] = inplace
    modes = ["native"] if not _sqrt.needs_wide_sqrt(x.dtype, x.device) else ["wide"]
    if x.dtype == torch.float32 and _sqrt.numpy_sqrt() is not None:
        modes.append("numpy")
    for mode in modes:
        results[f"program ({mode})"] = _program_sqrt(x, mode)
    return results


def _program_sqrt(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The square root as the foreach engine's compiled CPU programs compute it."""
    graph = Graph()
    leaf = graph.leaf()
    root = leaf.sqrt()
    program = compile_program(graph, [leaf], [True], [(root, 0)], mode)
    register = x.clone()
    scratch = [torch.empty_like(x) for _ in range(program.scratch)]
    extra = [torch.empty(x.shape, dtype=torch.float64)] if program.wide else []
    program.run(register, *scratch, *extra, *program.constants)
    return register


def _assert_every_path_correctly_rounded(x: torch.Tensor) -> None:
    """The message names the path that failed: the bare assertion cannot tell them apart."""
    for name, got in _sqrts(x).items():
        try:
            _assert_correctly_rounded(x, got)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_roots_are_correctly_rounded_for_every_value(dtype: torch.dtype) -> None:
    _assert_every_path_correctly_rounded(_every_16_bit(dtype))


def test_float32_roots_are_correctly_rounded() -> None:
    x = torch.cat([_float32_edges(), _float32_hard_cases(200_000, 0), _float32_random(2_000_000, 1)])
    _assert_every_path_correctly_rounded(x)


def test_float64_roots_match_torch() -> None:
    # No wider type to borrow: float64 roots are torch's own, in every path.
    x = torch.from_numpy(np.random.default_rng(2).random(10_000) * 1e6)
    for got in _sqrts(x).values():
        assert torch.equal(got, torch.sqrt(x))


@pytest.mark.parametrize("dtype", NARROW)
def test_every_path_gives_the_same_bits_nans_included(dtype: torch.dtype) -> None:
    # Bitwise the same as the float64 route that defines the library's results, NaN signs too.
    x = _every_16_bit(dtype) if dtype != torch.float32 else torch.cat([_float32_edges(), -_float32_edges()])
    reference = torch.sqrt(x.double()).to(dtype)
    for name, got in _sqrts(x).items():
        assert np.array_equal(_bits(got), _bits(reference)), name


def test_native_sqrt_is_trusted_only_where_checked() -> None:
    assert not _sqrt.native_sqrt_is_exact(torch.float32)
    assert _sqrt.native_sqrt_is_exact(torch.float64)
    for dtype in (torch.float16, torch.bfloat16):
        x = _every_16_bit(dtype)
        exact = np.array_equal(_bits(torch.sqrt(x)), _bits(torch.sqrt(x.double()).to(dtype)))
        assert _sqrt.native_sqrt_is_exact(dtype) == exact
    assert _sqrt.needs_wide_sqrt(torch.float32, torch.device("cpu"))
    assert not _sqrt.needs_wide_sqrt(torch.float64, torch.device("cpu"))
    assert not _sqrt.needs_wide_sqrt(torch.float32, torch.device("meta"))


@pytest.mark.skipif(os.environ.get("TORCHUPDATES_EXHAUSTIVE") != "1", reason="set TORCHUPDATES_EXHAUSTIVE=1")
def test_every_float32_root_is_correctly_rounded() -> None:
    out = torch.empty(1 << 24)
    wide = torch.empty(1 << 24, dtype=torch.float64)
    by_numpy = _sqrt.numpy_sqrt()
    for block in range(1 << 8):
        bits = np.arange(block << 24, (block + 1) << 24, dtype=np.uint64).astype(np.uint32)
        x = torch.from_numpy(bits.view(np.float32))
        _sqrt.sqrt_into(x, out, wide)  # the float64 route
        _assert_correctly_rounded(x, out)
        if by_numpy is not None:
            reference = out.clone()
            by_numpy(x, out, wide)
            assert torch.equal(out.view(torch.int32), reference.view(torch.int32)), f"block {block}"
