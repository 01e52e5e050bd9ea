"""``python -m torchupdates compare``: train the same network with every rule and compare.

The modern form of Lasagne's MNIST example: one multilayer perceptron, initialised once
from the seed, is trained by each update rule on the same batches; the command prints a
table (final training loss, validation accuracy, time), and writes ``results.json`` and
``compare.png`` (training loss and validation accuracy per epoch) to ``--out``.

The default data is scikit-learn's bundled digits (1,797 8x8 images), so it runs without
a network connection. ``--data`` takes MNIST-style idx files or an ``.npz``.

Only torch is needed to import this module; the command itself needs matplotlib, tqdm and
(for the digits) scikit-learn: ``pip install 'torchupdates[demo]'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..engines import ENGINES
from ._command import (
    Command,
    CommandError,
    MissingDependencyError,
    non_negative_int,
    positive_float,
    positive_int,
    torch_threads,
)
from ._datasets import DataError, Dataset, load_dataset
from ._report import best_result, format_table, results_document, save_plot, write_json
from ._rulespec import DEFAULT_LEARNING_RATES, RULE_NAMES, SYNTAX_HELP, RuleSpec, parse_rules
from ._training import RunResult, TrainConfig, build_mlp, train_rule

__all__ = ["COMMAND", "DEFAULT_OUT", "run_compare"]

DEFAULT_OUT = "torchupdates-compare"
"""Where results go when ``--out`` is not given (relative to the working directory)."""

_DEFAULT_HIDDEN = (128, 128)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (exclusive), got {text!r}")
    return value


def _rules(text: str) -> list[RuleSpec]:
    try:
        return parse_rules(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _hidden(text: str) -> tuple[int, ...]:
    if text.strip() in ("", "none"):
        return ()
    return tuple(positive_int(part.strip()) for part in text.split(","))


def _epilog() -> str:
    rates = ", ".join(f"{name} {rate:g}" for name, rate in DEFAULT_LEARNING_RATES.items())
    return (
        f"rules: {SYNTAX_HELP}.\n\n"
        f"default learning rates: {rates}; divided by 10 per momentum(...)/nesterov(...) wrapper.\n\n"
        "examples:\n"
        "  python -m torchupdates compare\n"
        "  python -m torchupdates compare --rules adam,nesterov(rmsprop),sgd:0.1 --epochs 10\n"
        "  python -m torchupdates compare --max-norm 3 --clip 10 --out results\n"
        "  python -m torchupdates compare --data ~/mnist --hidden 256 --epochs 5 --batch-size 128"
    )


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``compare`` to ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    add(
        "--rules",
        type=_rules,
        default=None,
        metavar="RULES",
        help="comma-separated rules to compare, e.g. 'adam,nesterov(rmsprop),sgd:0.1' (default: all nine rules)",
    )
    add("--epochs", type=positive_int, default=20, metavar="N", help="passes over the training set (default: 20)")
    add("--batch-size", type=positive_int, default=32, metavar="N", help="examples per step (default: 32)")
    add(
        "--seed",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="seeds the split, the initial weights (shared by all rules) and the batch order (default: 0)",
    )
    add("--engine", choices=sorted(ENGINES), default="foreach", help="how the rules' formulas run (default: foreach)")
    add(
        "--max-norm",
        type=positive_float,
        default=None,
        metavar="X",
        help="limit the norm of each unit's incoming weights to X, inside step() (default: off)",
    )
    add(
        "--clip",
        type=positive_float,
        default=None,
        metavar="X",
        help="rescale the gradients so that their total norm is at most X, inside step() (default: off)",
    )
    add(
        "--via-dictionary",
        action="store_true",
        help="apply --max-norm and --clip by editing the update dictionary, as Lasagne did, "
        "instead of inside step(); the numbers are the same",
    )
    add(
        "--out",
        type=Path,
        default=Path(DEFAULT_OUT),
        metavar="DIR",
        help=f"directory for results.json and compare.png, created if needed (default: ./{DEFAULT_OUT})",
    )
    add(
        "--data",
        type=Path,
        default=None,
        metavar="PATH",
        help="MNIST-style data instead of scikit-learn's digits: a directory with "
        "train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] (t10k-* files, if present, "
        "are the validation set), an idx images file, or an .npz with arrays x and y",
    )
    add("--limit", type=positive_int, default=None, metavar="N", help="use a random subset of N examples")
    add(
        "--val-fraction",
        type=_fraction,
        default=0.2,
        metavar="F",
        help="share of the examples held out for validation when the data has no test set (default: 0.2)",
    )
    add(
        "--hidden",
        type=_hidden,
        default=_DEFAULT_HIDDEN,
        metavar="SIZES",
        help="hidden layer sizes of the MLP, comma-separated, or 'none' (default: 128,128)",
    )
    add(
        "--threads",
        type=positive_int,
        default=1,
        metavar="N",
        help="torch CPU threads; results are reproducible for a given seed and thread count (default: 1)",
    )
    add("--quiet", action="store_true", help="no progress bars")


def _require(modules: Sequence[str]) -> None:
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        names = {"sklearn": "scikit-learn"}
        listed = ", ".join(names.get(m, m) for m in missing)
        raise MissingDependencyError(
            f"the compare command needs {listed}, which {'is' if len(missing) == 1 else 'are'} not installed; "
            "install the demo extras with: pip install 'torchupdates[demo]'"
        )


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(f"cannot create the output directory {out}: {error.strerror or error}") from None
    if not out.is_dir():
        raise CommandError(f"--out {out} is not a directory")


class _NoBar:
    """Stands in for a progress bar under ``--quiet`` (no tqdm needed)."""

    def update(self, steps: int) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(quiet: bool, total: int, label: str) -> Any:
    if quiet:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True, leave=True)


def _describe_model(data: Dataset, hidden: Sequence[int]) -> str:
    return "-".join(str(n) for n in (data.num_features, *hidden, data.num_classes))


def _warm_up(spec: RuleSpec, initial_model: torch.nn.Module, data: Dataset, config: TrainConfig) -> None:
    # The first optimizer and the first steps in a process pay one-time costs (lazy imports,
    # kernel setup); pay them here so that the first rule's timing is comparable to the others.
    warm_up = dataclasses.replace(config, epochs=1)
    subset = Dataset(
        data.name,
        data.x_train[: 3 * config.batch_size],
        data.y_train[: 3 * config.batch_size],
        data.x_val[:1],
        data.y_val[:1],
        data.num_classes,
    )
    train_rule(spec, initial_model, subset, warm_up)


def run_compare(
    specs: Sequence[RuleSpec],
    data: Dataset,
    hidden: Sequence[int],
    config: TrainConfig,
    quiet: bool = True,
) -> list[RunResult]:
    """Train one MLP per rule, all from the same initial weights, and return the results.

    Parameters
    ----------
    specs : sequence of RuleSpec
        The rules, run in this order.
    data : Dataset
        Training and validation data.
    hidden : sequence of int
        Hidden layer sizes.
    config : TrainConfig
        Epochs, batch size, seed (initial weights and batch order), engine, constraints.
    quiet : bool, optional
        Show no progress bars (default); otherwise one tqdm bar per rule, on stderr.

    Returns
    -------
    list of RunResult
    """
    initial_model = build_mlp(data.num_features, hidden, data.num_classes, seed=config.seed)
    if specs:
        _warm_up(specs[0], initial_model, data, config)
    steps_per_epoch = -(-data.x_train.shape[0] // config.batch_size)
    results = []
    for spec in specs:
        bar = _progress_bar(quiet, config.epochs * steps_per_epoch, spec.label)

        def advance(bar: Any = bar) -> None:
            bar.update(1)

        def show(epoch: int, loss: float, accuracy: float, bar: Any = bar) -> None:
            bar.set_postfix(loss=f"{loss:.4f}", val_acc=f"{100 * accuracy:.2f}%", refresh=False)

        try:
            result = train_rule(spec, initial_model, data, config, on_step=advance, on_epoch=show)
        finally:
            bar.close()
        results.append(result)
    return results


def _run(args: argparse.Namespace) -> int:
    specs: list[RuleSpec] = args.rules if args.rules is not None else parse_rules(",".join(RULE_NAMES))
    _require(["matplotlib", *([] if args.quiet else ["tqdm"]), *(["sklearn"] if args.data is None else [])])
    config = TrainConfig(
        args.epochs, args.batch_size, args.seed, args.engine, args.max_norm, args.clip, args.via_dictionary
    )
    with torch_threads(args.threads):
        try:
            data = load_dataset(args.data, seed=args.seed, val_fraction=args.val_fraction, limit=args.limit)
        except DataError as error:
            raise CommandError(str(error)) from None
        _prepare_out(args.out)  # before training, so that a bad --out does not waste a run
        model = _describe_model(data, args.hidden)
        summary = (
            f"{model} MLP on {data.name} ({data.x_train.shape[0]} training / {data.x_val.shape[0]} validation "
            f"examples), {args.epochs} epochs, batch size {args.batch_size}, seed {args.seed}, engine {args.engine}"
        )
        extras = [f"max-norm {args.max_norm:g}" if args.max_norm else "", f"clip {args.clip:g}" if args.clip else ""]
        summary += "".join(f", {extra}" for extra in extras if extra)
        if not args.quiet:
            print(f"Training a {summary}", file=sys.stderr)
        results = run_compare(specs, data, args.hidden, config, quiet=args.quiet)
    document = results_document(
        results,
        {
            "data": data.name,
            "num_train": int(data.x_train.shape[0]),
            "num_val": int(data.x_val.shape[0]),
            "limit": args.limit,
            "val_fraction": args.val_fraction,
            "layers": [data.num_features, *args.hidden, data.num_classes],
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "engine": args.engine,
            "max_norm": args.max_norm,
            "clip": args.clip,
            "via_dictionary": args.via_dictionary,
            "threads": args.threads,
            "torch": torch.__version__,
        },
    )
    json_path, png_path = args.out / "results.json", args.out / "compare.png"
    write_json(document, json_path)
    save_plot(results, png_path, summary)
    print(format_table(results))
    best = best_result(results)
    if best is not None:
        print(f"\nbest: {best.label} with {100 * best.final_val_accuracy:.2f}% validation accuracy")
    print(f"wrote {json_path} and {png_path}")
    return 0


COMMAND = Command(
    name="compare",
    summary="train the same MLP with every update rule and compare them",
    description=(
        "Train the same multilayer perceptron (same initial weights, same batches) with each update rule "
        "on scikit-learn's digits or MNIST-style data; print a table of final training loss, validation "
        "accuracy and speed; write DIR/results.json and DIR/compare.png (loss and accuracy curves)."
    ),
    configure=configure,
    run=_run,
    epilog=_epilog(),
)
"""The ``compare`` subcommand, listed by :mod:`torchupdates.cli`."""
