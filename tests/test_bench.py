"""The ``bench`` command measures every implementation and reports honest byte counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchupdates.bench import CASES
from torchupdates.cli import main

TINY = ["--numel", "2000", "--tensors", "4", "--repeat", "1"]


def test_bench_writes_a_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--rules", "sgd,adam", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "sgd" in table and "adam" in table and "torch foreach GB/s" in table
    document = json.loads(out.read_text())
    results = {r["rule"]: r for r in document["results"]}
    assert set(results) == {"sgd", "adam"}
    # Adam moves p, g, m, v in and p, m, v out: 7 float32 tensors of 2000 elements.
    assert results["adam"]["bytes_per_step"] == 7 * 4 * 2000
    assert results["sgd"]["bytes_per_step"] == 3 * 4 * 2000
    for result in results.values():
        assert {"torch foreach", "foreach", "reference"} <= set(result["gb_per_s"])
        assert all(rate > 0 for rate in result["gb_per_s"].values())
    # m and v in float32, 8 bytes per element, like torch.optim.Adam (plus the tiny step counters).
    state = results["adam"]["state_bytes_per_element"]
    assert state["foreach"] == pytest.approx(8.0, abs=0.05)
    assert state["foreach"] == pytest.approx(state["torch foreach"], abs=0.05)
    assert results["sgd"]["state_bytes_per_element"]["foreach"] == 0


def test_every_rule_has_a_case() -> None:
    rules = {"sgd", "momentum", "nesterov_momentum", "adagrad", "rmsprop", "adadelta", "adam", "adamax", "amsgrad"}
    assert set(CASES) == rules


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--rules", "bogus"], "unknown rule"),
        (["--engines", "turbo"], "unknown engine"),
        (["--numel", "2", "--tensors", "4"], "smaller than --tensors"),
        (["--repeat", "0"], "positive integer"),
    ],
)
def test_bad_options_exit_2_with_a_message(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", *TINY, *options]) == 2
    assert message in capsys.readouterr().err
