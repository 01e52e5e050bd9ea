"""The command line: ``python -m torchupdates compare`` and its parts (rule specs, data, training)."""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torchupdates as updates
from torchupdates import registry
from torchupdates.cli import COMMANDS, build_parser, main
from torchupdates.cli._datasets import DataError, load_dataset
from torchupdates.cli._rulespec import DEFAULT_LEARNING_RATES, RULE_NAMES, parse_rule, parse_rules
from torchupdates.cli._training import build_mlp, training_step

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIMINGS = {"seconds", "steps_per_s"}

# A tiny configuration: 400 digits (320 training, 80 validation), 2 epochs, small batches.
TINY = ["--epochs", "2", "--limit", "400", "--batch-size", "16", "--hidden", "32", "--quiet"]


def run_compare(out: Path, *options: str) -> dict[str, Any]:
    """Run the compare command in-process; return its results.json."""
    assert main(["compare", *TINY, "--out", str(out), *options]) == 0
    return json.loads((out / "results.json").read_text())


def without_timings(document: dict[str, Any]) -> dict[str, Any]:
    document = copy.deepcopy(document)
    for rule in document["rules"].values():
        for key in TIMINGS:
            rule.pop(key)
    return document


# --- the command, end to end -------------------------------------------------------------------


def test_compare_runs_end_to_end_and_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_compare(tmp_path / "out", "--rules", "sgd,nesterov(rmsprop)")
    stdout = capsys.readouterr().out

    assert list(result["rules"]) == ["sgd", "nesterov(rmsprop)"]
    assert result["config"]["epochs"] == 2
    assert result["config"]["num_train"] + result["config"]["num_val"] == 400
    for label, rule in result["rules"].items():
        curves = rule["curves"]
        assert curves["epoch"] == [1, 2]
        assert len(curves["train_loss"]) == len(curves["val_loss"]) == len(curves["val_accuracy"]) == 2
        assert rule["final_train_loss"] == curves["train_loss"][-1]
        assert rule["val_accuracy"] == curves["val_accuracy"][-1]
        assert curves["train_loss"][1] < curves["train_loss"][0] < math.log(10) + 0.5  # it learns
        assert 0.3 < rule["val_accuracy"] <= 1.0  # well above chance (0.1) after 2 short epochs
        assert rule["seconds"] > 0 and rule["steps_per_s"] > 0
        assert rule["steps"] == 2 * math.ceil(result["config"]["num_train"] / 16)
        assert not rule["diverged"]
        assert label in stdout
    assert result["rules"]["nesterov(rmsprop)"]["learning_rate"] == pytest.approx(
        DEFAULT_LEARNING_RATES["rmsprop"] / 10
    )
    assert result["best"] in result["rules"]
    assert "val accuracy" in stdout and "steps/s" in stdout

    png = (tmp_path / "out" / "compare.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_same_seed_gives_identical_numbers(tmp_path: Path) -> None:
    options = ["--rules", "adam,momentum(adagrad)", "--seed", "3"]
    first = run_compare(tmp_path / "a", *options)
    second = run_compare(tmp_path / "b", *options)
    assert without_timings(first) == without_timings(second)

    other_seed = run_compare(tmp_path / "c", "--rules", "adam,momentum(adagrad)", "--seed", "4")
    assert other_seed["rules"]["adam"]["curves"] != first["rules"]["adam"]["curves"]


def test_every_rule_starts_from_the_same_weights_and_batches(tmp_path: Path) -> None:
    # A rule's numbers do not depend on which rules ran before it.
    alone = run_compare(tmp_path / "alone", "--rules", "adam")
    after_others = run_compare(tmp_path / "after", "--rules", "sgd,rmsprop,adam")
    assert alone["rules"]["adam"]["curves"] == after_others["rules"]["adam"]["curves"]


def test_engines_agree(tmp_path: Path) -> None:
    reference = run_compare(tmp_path / "r", "--rules", "adam", "--engine", "reference")
    foreach = run_compare(tmp_path / "f", "--rules", "adam", "--engine", "foreach")
    assert reference["config"]["engine"] == "reference"
    ours, theirs = reference["rules"]["adam"]["curves"], foreach["rules"]["adam"]["curves"]
    assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)


def test_max_norm_and_clip_change_training(tmp_path: Path) -> None:
    plain = run_compare(tmp_path / "plain", "--rules", "sgd")
    constrained = run_compare(tmp_path / "constrained", "--rules", "sgd", "--max-norm", "0.5", "--clip", "0.1")
    assert constrained["config"]["max_norm"] == 0.5 and constrained["config"]["clip"] == 0.1
    assert constrained["rules"]["sgd"]["curves"] != plain["rules"]["sgd"]["curves"]
    assert constrained["rules"]["sgd"]["final_train_loss"] > plain["rules"]["sgd"]["final_train_loss"]


def test_max_norm_and_clip_inside_the_step_equal_the_update_dictionary(tmp_path: Path) -> None:
    options = ("--rules", "momentum(adam)", "--max-norm", "0.5", "--clip", "0.1")
    inside = run_compare(tmp_path / "inside", *options)
    edited = run_compare(tmp_path / "edited", *options, "--via-dictionary")
    assert inside["config"]["via_dictionary"] is False and edited["config"]["via_dictionary"] is True
    assert inside["rules"]["momentum(adam)"]["curves"] == edited["rules"]["momentum(adam)"]["curves"]


def test_learning_rate_override_and_divergence_give_valid_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["compare", *TINY, "--out", str(out), "--rules", "sgd:1e38,adam:0.01"]) == 0
    text = (out / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    result = json.loads(text)
    blown_up = result["rules"]["sgd:1e+38"]
    assert blown_up["learning_rate"] == 1e38
    assert blown_up["diverged"] and blown_up["final_train_loss"] is None
    assert len(blown_up["curves"]["epoch"]) == 1  # stopped after the first epoch
    assert result["rules"]["adam:0.01"]["learning_rate"] == 0.01
    assert result["best"] == "adam:0.01"
    assert "diverged" in capsys.readouterr().out


# --- bad options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--rules", "adamm"], "unknown rule 'adamm' (did you mean 'adam'?); valid rules: sgd, momentum"),
        (["--rules", "nesterov(foo)"], "unknown rule 'foo'"),
        (["--rules", "lookahead(adam)"], "unknown modifier 'lookahead'"),
        (["--rules", "momentum(adam"], "cannot parse rule"),
        (["--rules", "sgd,,adam"], "empty rule name"),
        (["--rules", "sgd,sgd"], "given more than once"),
        (["--rules", "adam:fast"], "bad learning rate 'fast'"),
        (["--rules", "adam:-1"], "must be a positive number"),
        (["--epochs", "0"], "--epochs: expected a positive integer, got '0'"),
        (["--batch-size", "many"], "--batch-size: expected a positive integer"),
        (["--seed", "-1"], "--seed: expected an integer >= 0"),
        (["--engine", "turbo"], "invalid choice: 'turbo'"),
        (["--max-norm", "-3"], "--max-norm: expected a positive number"),
        (["--clip", "nan"], "--clip: expected a positive number"),
        (["--val-fraction", "1.5"], "--val-fraction: expected a number between 0 and 1"),
        (["--hidden", "128,x"], "--hidden: expected a positive integer"),
        (["--data", "/no/such/mnist"], "no such file or directory: /no/such/mnist"),
        (["--unknown"], "unrecognized arguments: --unknown"),
    ],
)
def test_bad_options_exit_2_with_a_message(
    options: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["compare", "--quiet", "--out", str(out), *options]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""
    assert not out.exists()  # nothing trained, nothing written


def test_out_must_be_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["compare", *TINY, "--rules", "sgd", "--out", str(a_file)]) == 2
    assert "cannot create the output directory" in capsys.readouterr().err


def test_unknown_command_and_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench-everything"]) == 2
    assert "invalid choice: 'bench-everything'" in capsys.readouterr().err
    assert main([]) == 2
    assert "compare" in capsys.readouterr().err


def test_missing_demo_dependencies_are_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["compare", *TINY, "--rules", "sgd", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'torchupdates[demo]'" in err


def test_quiet_runs_without_tqdm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main(["compare", *TINY, "--rules", "sgd", "--out", str(tmp_path / "quiet")]) == 0
    noisy = [option for option in TINY if option != "--quiet"]
    assert main(["compare", *noisy, "--rules", "sgd", "--out", str(tmp_path / "noisy")]) == 1
    assert "needs tqdm" in capsys.readouterr().err


# --- help, entry points --------------------------------------------------------------------------


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "compare" in out and "train the same MLP with every update rule" in out


def test_compare_help_documents_rule_syntax_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--rules", "--epochs", "--batch-size", "--seed", "--engine", "--max-norm", "--clip", "--out"):
        assert option in out
    assert "nesterov(RULE)" in out and ":LR" in out
    assert all(f"{name} {DEFAULT_LEARNING_RATES[name]:g}" in out for name in RULE_NAMES)


def test_commands_slot_in_beside_compare() -> None:
    from torchupdates.cli._command import Command

    calls: list[str] = []

    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("word")

    def run(args: argparse.Namespace) -> int:
        calls.append(args.word)
        return 0

    parser = build_parser([*COMMANDS, Command("echo", "print a word", "Print a word.", configure, run)])
    args = parser.parse_args(["echo", "hi"])
    assert args.command.run(args) == 0 and calls == ["hi"]
    assert "echo" in parser.format_help() and "compare" in parser.format_help()


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "torchupdates", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "compare" in done.stdout


# --- rule specifications ---------------------------------------------------------------------


def test_the_rule_table_is_the_registry_with_a_tuned_learning_rate_each() -> None:
    assert RULE_NAMES == registry.RULE_NAMES
    assert set(DEFAULT_LEARNING_RATES) == set(RULE_NAMES)
    assert all(rate > 0 for rate in DEFAULT_LEARNING_RATES.values())


def test_rule_specs_parse_names_wrappers_and_learning_rates() -> None:
    spec = parse_rule(" Apply_Nesterov_Momentum( apply_momentum(adam) ) ")
    assert (spec.rule, spec.wrappers) == ("adam", ("momentum", "nesterov"))
    assert spec.learning_rate == pytest.approx(DEFAULT_LEARNING_RATES["adam"] / 100)
    assert spec.label == "nesterov(momentum(adam))"
    assert parse_rule("nesterov_momentum(sgd):0.05").label == "nesterov(sgd):0.05"
    assert [s.label for s in parse_rules("sgd, momentum(rmsprop):1e-3")] == ["sgd", "momentum(rmsprop):0.001"]


def test_rule_specs_build_the_named_chain() -> None:
    params = [torch.zeros(3, requires_grad=True)]
    assert parse_rule("nesterov(momentum(adam))").build(params).rule_name == (
        "apply_nesterov_momentum(apply_momentum(adam))"
    )
    for name in RULE_NAMES:
        optimizer = parse_rule(name).build([torch.zeros(3, requires_grad=True)], engine="reference")
        assert optimizer.param_groups[0]["lr"] == DEFAULT_LEARNING_RATES[name]
        assert optimizer.engine == "reference"


def test_composed_momentum_of_sgd_is_the_momentum_rule() -> None:
    def trajectory(spec: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_mlp(5, [4], 3, seed=0)
        optimizer = parse_rule(spec).build(list(model.parameters()))
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        for _ in range(5):
            optimizer.step(F.cross_entropy(model(x), y))
        return [p.detach().clone() for p in model.parameters()]

    for composed, rule in [("momentum(sgd):0.1", "momentum:0.1"), ("nesterov(sgd):0.1", "nesterov_momentum:0.1")]:
        for ours, theirs in zip(trajectory(composed), trajectory(rule), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# --- the training step's constraints ---------------------------------------------------------


def test_training_step_applies_max_norm_through_the_update_dictionary() -> None:
    x, y = torch.randn(16, 10) * 10, torch.randint(0, 4, (16,))

    def one_step(max_norm: float | None) -> list[torch.Tensor]:
        model = build_mlp(10, [20], 4, seed=0)
        params = list(model.parameters())
        weights = [p for p in params if p.dim() == 2]
        training_step(updates.sgd(params, learning_rate=1.0), F.cross_entropy(model(x), y), params, weights, max_norm)
        return [p.detach() for p in params]

    free, bounded = one_step(None), one_step(0.25)
    assert max(float(w.norm(dim=1).max()) for w in free if w.dim() == 2) > 0.25  # the bound binds
    for weight in (p for p in bounded if p.dim() == 2):
        assert float(weight.norm(dim=1).max()) <= 0.25 + 1e-6  # one norm per output unit
    for free_bias, bias in zip(free[1::2], bounded[1::2], strict=True):
        torch.testing.assert_close(free_bias, bias, rtol=0, atol=0)  # biases are not constrained


def test_training_step_clips_the_total_gradient_norm() -> None:
    model = build_mlp(10, [20], 4, seed=0)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    optimizer = updates.sgd(params, learning_rate=1.0)
    x, y = torch.randn(16, 10) * 100, torch.randint(0, 4, (16,))
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    assert torch.cat([g.flatten() for g in grads]).norm() > 1.0
    training_step(optimizer, loss, params, clip=0.5)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before, strict=True)]).norm()
    assert moved == pytest.approx(0.5, rel=1e-4)  # sgd with lr 1 moves by the clipped gradient


# --- MNIST-style data ------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


def fake_mnist(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 6x6 'images': the label is the row holding the bright stripe."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count).astype(np.uint8)
    images = rng.integers(0, 60, (count, 6, 6)).astype(np.uint8)
    images[np.arange(count), labels * 2, :] = 255
    return images, labels


def test_compare_reads_mnist_idx_files(tmp_path: Path) -> None:
    data = tmp_path / "mnist"
    data.mkdir()
    images, labels = fake_mnist(120, seed=0)
    (data / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (data / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    test_images, test_labels = fake_mnist(30, seed=1)
    (data / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(test_images))
    (data / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(test_labels)))  # mixed is fine

    result = run_compare(tmp_path / "out", "--data", str(data), "--rules", "adam", "--epochs", "3", "--limit", "1000")
    config = result["config"]
    assert (config["num_train"], config["num_val"], config["layers"]) == (120, 30, [36, 32, 3])
    assert result["rules"]["adam"]["val_accuracy"] > 0.9


def test_compare_reads_an_npz_and_a_single_idx_file(tmp_path: Path) -> None:
    images, labels = fake_mnist(100, seed=2)
    np.savez(tmp_path / "data.npz", x=images, y=labels)
    result = run_compare(tmp_path / "npz", "--data", str(tmp_path / "data.npz"), "--rules", "sgd")
    assert (result["config"]["num_train"], result["config"]["num_val"]) == (80, 20)

    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    result = run_compare(tmp_path / "idx", "--data", str(tmp_path / "train-images-idx3-ubyte"), "--rules", "sgd")
    assert result["config"]["layers"][0] == 36


def test_idx_reader_handles_big_endian_values(tmp_path: Path) -> None:
    images = (np.arange(2 * 3 * 2).reshape(2, 3, 2) - 1.5).astype(">f4")
    labels = np.array([0, 1], dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    data = load_dataset(tmp_path, seed=0, val_fraction=0.5)
    rows = sorted([*data.x_train.tolist(), *data.x_val.tolist()])
    expected = (images.reshape(2, 6).astype(np.float32) / images.max()).tolist()
    np.testing.assert_allclose(np.array(rows), np.array(sorted(expected)), rtol=1e-6)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"train-images-idx3-ubyte": b"not idx at all"}, "not an idx file"),
        ({"train-images-idx3-ubyte": idx_bytes(np.zeros((4, 2, 2), np.uint8))}, "no labels file"),
        (
            {
                "train-images-idx3-ubyte": idx_bytes(np.zeros((4, 2, 2), np.uint8)),
                "train-labels-idx1-ubyte": idx_bytes(np.zeros(5, np.uint8)),
            },
            "4 inputs but labels of shape (5,)",
        ),
        ({"data.npz": b"PK nonsense"}, "cannot read"),
        ({"train-images-idx3-ubyte.gz": b"\x1f\x8b broken gzip"}, "cannot read"),
    ],
)
def test_bad_data_files_are_reported(
    files: dict[str, bytes], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    target = tmp_path / "data.npz" if "data.npz" in files else tmp_path
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(target, seed=0)
    assert main(["compare", "--quiet", "--out", str(tmp_path / "out"), "--data", str(target)]) == 2
    assert message in capsys.readouterr().err
