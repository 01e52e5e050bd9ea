"""Reporting a comparison: the text table, the JSON document and the PNG plot."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._training import RunResult

__all__ = ["best_result", "format_rows", "format_table", "results_document", "save_plot", "write_json"]


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def best_result(results: Sequence[RunResult]) -> RunResult | None:
    """The result with the highest final validation accuracy (ties: lower training loss).

    Diverged runs are never the best; returns ``None`` when every run diverged.
    """
    candidates = [r for r in results if not r.diverged and math.isfinite(r.final_val_accuracy)]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r.final_val_accuracy, -r.final_train_loss))


def format_table(results: Sequence[RunResult]) -> str:
    """A plain-text table: rule, learning rate, final training loss, validation accuracy, time.

    Examples
    --------
    >>> run = RunResult("adam", "adam", 0.003, [0.5, 0.1], [0.3, 0.2], [0.9, 0.975], 2.0, 90, False)
    >>> print(format_table([run]))
    rule  learning rate  train loss  val accuracy  seconds  steps/s
    ----  -------------  ----------  ------------  -------  -------
    adam          0.003      0.1000        97.50%     2.00       45
    """
    header = ("rule", "learning rate", "train loss", "val accuracy", "seconds", "steps/s")
    rows = []
    for r in results:
        loss = "diverged" if r.diverged or not math.isfinite(r.final_train_loss) else f"{r.final_train_loss:.4f}"
        accuracy = f"{100 * r.final_val_accuracy:.2f}%" if math.isfinite(r.final_val_accuracy) else "-"
        rows.append((r.label, f"{r.learning_rate:g}", loss, accuracy, f"{r.seconds:.2f}", f"{r.steps_per_second:.0f}"))
    return format_rows(header, rows)


def format_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned.

    Examples
    --------
    >>> print(format_rows(("rule", "GB/s"), [("sgd", "9.5"), ("adam", "12.0")]))
    rule  GB/s
    ----  ----
    sgd    9.5
    adam  12.0
    """
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def results_document(results: Sequence[RunResult], config: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-ready record of a comparison.

    Parameters
    ----------
    results : sequence of RunResult
        One per rule, in the order run.
    config : mapping
        The settings of the run (data, model, epochs, ...), stored under ``"config"``.

    Returns
    -------
    dict
        ``{"config": ..., "best": label or None, "rules": {label: {...}}}``; each rule has
        ``rule``, ``learning_rate``, ``final_train_loss``, ``val_accuracy``, ``seconds``,
        ``steps``, ``steps_per_s``, ``diverged`` and ``curves`` (per epoch: ``epoch``,
        ``train_loss``, ``val_loss``, ``val_accuracy``). Numbers that are not finite
        become ``None`` (JSON ``null``).
    """
    best = best_result(results)
    rules: dict[str, Any] = {}
    for r in results:
        rules[r.label] = {
            "rule": r.expression,
            "learning_rate": r.learning_rate,
            "final_train_loss": _finite_or_none(r.final_train_loss),
            "val_accuracy": _finite_or_none(r.final_val_accuracy),
            "seconds": r.seconds,
            "steps": r.steps,
            "steps_per_s": _finite_or_none(r.steps_per_second),
            "diverged": r.diverged,
            "curves": {
                "epoch": list(range(1, len(r.train_loss) + 1)),
                "train_loss": [_finite_or_none(v) for v in r.train_loss],
                "val_loss": [_finite_or_none(v) for v in r.val_loss],
                "val_accuracy": [_finite_or_none(v) for v in r.val_accuracy],
            },
        }
    return {"config": dict(config), "best": None if best is None else best.label, "rules": rules}


def write_json(document: Mapping[str, Any], path: Path) -> None:
    """Write ``document`` as strict JSON (no NaN or Infinity), indented, with a final newline."""
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def save_plot(results: Sequence[RunResult], path: Path, title: str) -> None:
    """Save training loss and validation accuracy curves, one line per rule, as a PNG.

    Uses matplotlib's object API with the Agg canvas: no window, no global pyplot state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(13, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes, legend_axes = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 0.38]})
    styles = ("-", "--", ":", "-.")
    for index, r in enumerate(results):
        epochs = list(range(1, len(r.train_loss) + 1))
        style = {"color": f"C{index % 10}", "linestyle": styles[(index // 10) % len(styles)]}
        label = f"{r.expression} ({r.learning_rate:g})"
        loss_axes.plot(epochs, [v if math.isfinite(v) and v > 0 else math.nan for v in r.train_loss], **style)
        accuracy_axes.plot(epochs, [100 * v for v in r.val_accuracy], label=label, **style)
    loss_axes.set_yscale("log")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("training loss (cross-entropy, log scale)")
    loss_axes.set_title("Training loss")
    loss_axes.grid(True, which="both", alpha=0.3)
    accuracy_axes.set_xlabel("epoch")
    accuracy_axes.set_ylabel("validation accuracy (%)")
    accuracy_axes.set_title("Validation accuracy")
    accuracy_axes.grid(True, alpha=0.3)
    finite = [100 * v for r in results for v in r.val_accuracy[len(r.val_accuracy) // 2 :] if math.isfinite(v)]
    if finite:  # zoom on where the rules end up, not on the first epoch
        accuracy_axes.set_ylim(max(0.0, min(finite) - 2.0), 100.5)
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    legend_axes.axis("off")
    handles, labels = accuracy_axes.get_legend_handles_labels()
    legend_axes.legend(handles, labels, loc="center left", frameon=False, title="rule (learning rate)")
    figure.suptitle(title)
    figure.savefig(path, dpi=110)
