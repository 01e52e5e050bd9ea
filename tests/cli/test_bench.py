"""The ``bench`` command measures every implementation and reports honest byte counts.

Tiny sizes only and no timing assertions: the machine is shared and noisy. The one test
that spawns the compile-time processes (cold, then warm Inductor cache) takes about 15 s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from compiler import needs_compiler
from torchupdates.cli import _bench_probes, main
from torchupdates.cli._bench_cases import CASES, Workload, interleaved_medians
from torchupdates.cli._bench_probes import EAGER_CEILING, ScalingPair
from torchupdates.cli._command import torch_threads
from torchupdates.cli.bench import _busy_note, run_bench
from torchupdates.registry import RULE_NAMES

TINY = ["--numel", "2000", "--tensors", "4", "--repeat", "1"]
QUICK = [*TINY, "--no-compile-times", "--no-scaling"]
COMPOSITIONS = ["apply_momentum(adam)", "apply_nesterov_momentum(rmsprop)"]


@needs_compiler
def test_bench_reports_every_section_in_the_table_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scaling checks on tiny layouts: 2,000 elements in 2 vs 20 tensors, 1,000 in 1 vs 10.
    tiny_pairs = (ScalingPair((2, None), (20, None), 1.2), ScalingPair((1, 1000), (10, 1000), 2.0))
    monkeypatch.setattr(_bench_probes, "SCALING", tiny_pairs)
    out = tmp_path / "bench.json"
    rules = "sgd,adam,apply_momentum(adam)"
    assert main(["bench", *TINY, "--rules", rules, "--engines", "foreach,compiled", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for text in (
        "torch single",
        "torch foreach",
        "torch fused",
        "compiled / torch foreach",
        "compiled / fused Adam",
        "fused Adam = torch.optim.Adam(fused=True)",
        "ceiling: compiled 4-read/3-write kernel",
        'adam, engine="compiled"',
        "cold (empty Inductor cache)",
        "warm (the cold run's cache)",
        "2,000 elements in 20 tensors",
        "1,000 elements in 10 tensors",
        "compiled adam",
        "torch fused Adam",
    ):
        assert text in table, text
    # Everything could be measured: no note but, on a busy machine, the one about the load.
    assert all(line.startswith("note: the load average") for line in table.splitlines() if "note:" in line)
    document = json.loads(out.read_text())
    results = {r["rule"]: r for r in document["results"]}
    assert list(results) == ["sgd", "adam", "apply_momentum(adam)"]
    # Adam moves p, g, m, v in and p, m, v out: 7 float32 tensors of 2000 elements.
    assert results["adam"]["bytes_per_step"] == 7 * 4 * 2000
    assert results["sgd"]["bytes_per_step"] == 3 * 4 * 2000
    for rule in ("sgd", "adam"):
        result = results[rule]
        assert set(result["gb_per_s"]) == {"torch single", "torch foreach", "torch fused", "foreach", "compiled"}
        assert all(rate > 0 for rate in result["gb_per_s"].values())
        assert set(result["vs_torch_foreach"]) == set(result["vs_torch_fused_adam"]) == {"foreach", "compiled"}
        speed = result["gb_per_s"]
        assert result["vs_torch_foreach"]["compiled"] == pytest.approx(speed["compiled"] / speed["torch foreach"])
    composed = results["apply_momentum(adam)"]
    assert set(composed["gb_per_s"]) == {"foreach", "compiled"} and composed["vs_torch_foreach"] == {}
    assert document["torch_fused_adam_gb_per_s"] == results["adam"]["gb_per_s"]["torch fused"]
    # Each row's yardstick is torch's fused Adam stepped in that row's rounds (adam's own column in its row).
    assert results["adam"]["fused_adam_gb_per_s"] == results["adam"]["gb_per_s"]["torch fused"]
    for result in results.values():
        yardstick = result["fused_adam_gb_per_s"]
        assert yardstick > 0
        assert result["vs_torch_fused_adam"]["compiled"] == pytest.approx(result["gb_per_s"]["compiled"] / yardstick)
    # m and v in float32, 8 bytes per element, like torch.optim.Adam (plus the tiny step counters).
    state = results["adam"]["state_bytes_per_element"]
    assert state["foreach"] == pytest.approx(8.0, abs=0.05)
    assert state["compiled"] == pytest.approx(8.0, abs=0.05)
    assert state["foreach"] == pytest.approx(state["torch foreach"], abs=0.05)
    assert results["sgd"]["state_bytes_per_element"]["foreach"] == 0
    # The ceiling kernel ran, in the same rounds as adam, with Adam's 28 bytes per element.
    ceiling = document["ceiling"]
    assert ceiling["kernel"].startswith("compiled") and ceiling["bytes_per_element"] == 28 and ceiling["gb_per_s"] > 0
    assert set(ceiling["adam_vs_ceiling"]) == {"torch fused", "foreach", "compiled"}
    assert ceiling["adam_gb_per_s"]["compiled"] == results["adam"]["gb_per_s"]["compiled"]
    times = document["compile_times"]
    assert times["rule"] == "adam" and times["cold_s"] > 0 and times["warm_s"] > 0
    assert times["targets_s"] == {"cold": 10.0, "warm": 2.5}
    scaling = document["scaling"]
    assert [(layout["tensors"], layout["numel"]) for layout in scaling["layouts"]] == [
        (2, 2000),
        (20, 2000),
        (1, 1000),
        (10, 1000),
    ]
    assert [pair["target"] for pair in scaling["ratios"]] == [1.2, 2.0]
    for layout in scaling["layouts"]:
        assert set(layout["seconds"]) == {"compiled adam", "torch fused Adam"}
    first = scaling["ratios"][0]
    seconds = {layout["label"]: layout["seconds"] for layout in scaling["layouts"]}
    expected = seconds[first["many"]]["compiled adam"] / seconds[first["few"]]["compiled adam"]
    assert first["ratio"]["compiled adam"] == pytest.approx(expected)
    assert document["device"] == "cpu" and document["numel"] == 2000 and document["tensors"] == 4
    assert document["shapes"] == [[4, [500]]]
    assert all(note.startswith("the load average") for note in document["notes"])
    assert len(document["load_average"]) in (0, 2) and document["cpu_count"] >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compositions_count_the_velocity_read_and_written(dtype: torch.dtype) -> None:
    report = run_bench(COMPOSITIONS, ["foreach"], Workload.equal(1000, 4), 1, dtype, warmup=1)
    results = {r.rule: r for r in report.results}
    size = 8 if dtype == torch.float64 else 4
    # apply_momentum(adam): p, g, m, v, velocity read; p, m, v, velocity written.
    assert results["apply_momentum(adam)"].bytes_per_step == 9 * size * 1000
    # apply_nesterov_momentum(rmsprop): p, g, accumulator, velocity read; p, accumulator, velocity written.
    assert results["apply_nesterov_momentum(rmsprop)"].bytes_per_step == 7 * size * 1000
    assert results["apply_momentum(adam)"].state_bytes_per_element["foreach"] == pytest.approx(3 * size, abs=0.05)
    assert results["apply_nesterov_momentum(rmsprop)"].state_bytes_per_element["foreach"] == pytest.approx(2 * size)
    # No torch.optim equivalent: only our engines, compared with torch fused Adam measured in the run.
    assert all(set(r.gb_per_s) == {"foreach"} for r in report.results)
    assert report.torch_fused_adam_gb_per_s is not None and report.ceiling is not None


def test_missing_compiler_shows_a_dash_and_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torch._inductor import config

    out = tmp_path / "bench.json"
    options = ["--rules", "adam", "--engines", "foreach,compiled", "--no-scaling", "--compile-times"]
    # config.patch, not monkeypatch.setattr(config.cpp, "cxx", ...): pytest 9.2's undo of
    # that deletes the setting (Inductor then hides it), breaking every later compile.
    with config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
        assert main(["bench", *TINY, *options, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("rule (GB/s)"))
    adam_row = next(line for line in table.splitlines() if line.startswith("adam "))
    end = header.index(" compiled ") + len(" compiled")  # columns are right-aligned
    assert adam_row[:end].split()[-1] == "-"
    notes = [line for line in table.splitlines() if line.startswith("note: ")]
    assert any(line.startswith('note: compiled: "-" because') and "C++ compiler" in line for line in notes)
    assert any("compile times: not measured" in line for line in notes)
    assert "eager in-place triad" in table
    document = json.loads(out.read_text())
    assert document["ceiling"]["kernel"] == EAGER_CEILING
    assert "compiled" not in document["results"][0]["gb_per_s"]
    assert document["compile_times"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *QUICK, "--device", "cuda"]) == 2
    error = capsys.readouterr().err
    assert "--device cuda: no cuda device is available" in error and "--device cpu" in error


def test_shapes_issue_is_the_issue_workload() -> None:
    workload = Workload.parse("issue")
    assert workload.shapes == ((1024, 1024),) * 12 + ((4096,),) * 188
    assert workload.numel == 13_352_960
    assert "12 of 1024x1024 + 188 of 4096" in workload.description
    assert Workload.parse("2:3x4,1:5").shapes == ((3, 4), (3, 4), (5,))


def test_shapes_workload_on_the_command_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    options = ["--shapes", "2:16x16,3:100", "--repeat", "1", "--rules", "sgd", "--engines", "foreach"]
    assert main(["bench", *options, "--no-compile-times", "--no-scaling", "--json", str(out)]) == 0
    assert "812 elements in 5 tensors (2 of 16x16 + 3 of 100)" in capsys.readouterr().out
    document = json.loads(out.read_text())
    assert document["shapes"] == [[2, [16, 16]], [3, [100]]]
    assert document["results"][0]["bytes_per_step"] == 3 * 4 * 812


def test_interleaved_medians_time_each_stepper_once_per_round() -> None:
    calls: list[str] = []
    medians = interleaved_medians(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 2, torch.device("cpu")
    )
    assert calls == ["a", "b"] * 5 and set(medians) == {"a", "b"}


def test_a_busy_machine_gets_a_note() -> None:
    cpu, cpus = torch.device("cpu"), os.cpu_count() or 1
    with torch_threads(1):
        note = _busy_note([cpus + 1.0], cpu)
        assert note is not None and "--threads" in note and "OMP_WAIT_POLICY=PASSIVE" in note
        assert _busy_note([0.0], cpu) is None
        assert _busy_note([], cpu) is None  # no load average on this platform
        assert _busy_note([cpus + 1.0], torch.device("cuda")) is None


def test_every_rule_and_composition_has_a_case() -> None:
    options = ["adam[max_grad_norm]", "adam[skip_nonfinite]", "apply_norm_constraint(adam)"]
    assert list(CASES) == [*RULE_NAMES, *COMPOSITIONS, *options]
    # bytes moved per element / element size: read p, g and each state; write p and each state
    moved = {"sgd": 3, "momentum": 5, "nesterov_momentum": 5, "adagrad": 5, "rmsprop": 5, "adadelta": 7, "adam": 7}
    moved |= {"adamax": 7, "amsgrad": 9, "apply_momentum(adam)": 9, "apply_nesterov_momentum(rmsprop)": 7}
    moved |= dict.fromkeys(options, 7)  # Adam's traffic: the options' cost shows as lower GB/s
    assert {name: case.moved for name, case in CASES.items()} == moved
    assert [name for name, case in CASES.items() if case.torch_optim is None] == [*COMPOSITIONS, "adam[skip_nonfinite]"]


@pytest.mark.parametrize("case", ["adam[max_grad_norm]", "apply_norm_constraint(adam)"])
def test_torch_equivalents_of_the_step_options_take_the_same_step(case: str) -> None:
    # The bench sets the options beside torch's own way to them (clip_grad_norm_, renorm_):
    # the same steps up to their epsilons (1e-6 in clip_grad_norm_, and rows within the
    # bound left as they are by renorm_), so that their times compare like with like.
    generator = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (3, 2, 2), (7,)]
    ours = [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    ours_opt = CASES[case].build(ours, "foreach")
    factory = CASES[case].torch_optim
    assert factory is not None
    theirs_opt = factory(theirs, fused=True)
    for scale in (10.0, 0.05, 3.0):  # clipped, not clipped, clipped: Adam sees the difference
        grads = [scale * torch.randn(shape, generator=generator) for shape in shapes]
        for params, opt in ((ours, ours_opt), (theirs, theirs_opt)):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()
            opt.step()
    for mine, torchs in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, torchs, rtol=1e-5, atol=1e-6)
    # ... and the options acted: gradients above the clipping norm, rows held at the max-norm
    if case == "adam[max_grad_norm]":
        assert float(ours_opt.grad_norm) > 1.0  # type: ignore[arg-type]
    else:
        assert float(ours[0].detach().norm(dim=1).max()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--rules", "bogus"], "unknown rule"),
        (["--engines", "turbo"], "unknown engine"),
        (["--numel", "2", "--tensors", "4"], "smaller than --tensors"),
        (["--repeat", "0"], "positive integer"),
        (["--shapes", "12:1024y3"], "bad shape entry"),
        (["--shapes", "issue"], "leave out --numel and --tensors"),
        (["--device", "nonsense"], "is not a device"),
    ],
)
def test_bad_options_exit_2_with_a_message(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", *QUICK, *options]) == 2
    assert message in capsys.readouterr().err


def test_a_case_the_workload_cannot_take_is_one_note_naming_why() -> None:
    # Vectors only: nothing for a max-norm constraint on weights, on any implementation.
    vectors = Workload.equal(1000, 4)
    report = run_bench(["apply_norm_constraint(adam)"], ["foreach"], vectors, 1, torch.float32, warmup=1)
    (result,) = report.results
    assert result.gb_per_s == {}
    (note,) = [line for line in report.notes if "not measured" in line]
    assert "torch single, torch foreach, torch fused, foreach" in note
    assert "no 2-D to 5-D parameters" in note


def test_each_engine_steps_parameters_of_its_own() -> None:
    # Two engines keeping parameters in flat buffers of their own (the compiled engine, and
    # the foreach engine on a GPU) would take shared ones from each other at every step.
    from torchupdates.cli import bench

    received: dict[str, list[torch.Tensor]] = {}

    def builder(label: str):
        def build(params: list[torch.Tensor]) -> torch.optim.Optimizer:
            received[label] = params
            return torch.optim.SGD(params, 0.1)

        return build

    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    for p in params:
        p.grad = torch.full((3,), 0.5)
    labels = ["foreach", "compiled", "reference", "torch foreach", "torch fused"]
    bench._measure(CASES["sgd"], {label: builder(label) for label in labels}, params, 1, 1, torch.device("cpu"), [])
    seen = {id(p) for p in params}
    for label in ("foreach", "compiled", "reference"):
        ids = {id(p) for p in received[label]}
        assert not ids & seen, label
        seen |= ids
        assert all(torch.equal(p.grad, torch.full((3,), 0.5)) for p in received[label])
    assert received["torch foreach"] is params and received["torch fused"] is params
