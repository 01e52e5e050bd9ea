"""The examples and the migration guide's code run as written."""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "migrating_from_lasagne.md"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_mlp_trains_with_every_idiom(capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("digits_mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a scheduler complaining about the step order
        accuracy = example.main(["--epochs", "3", "--max-norm", "1.5", "--clip", "1.0"])
    assert accuracy > 0.9
    out = capsys.readouterr().out
    assert len(re.findall(r"^epoch +\d", out, flags=re.M)) == 3
    assert re.search(r"clipped steps +[1-9]", out), "the clipping bound should bind at the start"
    largest = re.search(r"largest incoming-weight norm of a unit: ([\d.]+)", out)
    assert largest is not None and float(largest.group(1)) == pytest.approx(
        1.5, abs=1e-3
    )  # the max-norm bound binds and holds
    lrs = [float(v) for v in re.findall(r"next lr ([\d.e+-]+)", out)]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == 0.0  # the cosine schedule ran


def guide_blocks(tag: str) -> list[str]:
    return re.findall(rf"^```{tag}\n(.*?)^```", GUIDE.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_migration_guide_pairs_every_lasagne_idiom_with_running_code() -> None:
    text = GUIDE.read_text(encoding="utf-8")
    for idiom in (
        "Update dictionaries",
        "Shared-variable",
        "apply_momentum",
        "Max-norm",
        "Total-norm",
        "norm_axes=(0,)",
    ):
        assert idiom in text
    lasagne, ours = guide_blocks("python"), guide_blocks("python torchupdates")
    assert len(lasagne) >= 6
    assert len(ours) == len(lasagne) + 1  # the setup block, then one beside each Lasagne block
    namespace: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for index, block in enumerate(ours):
            exec(compile(block, f"{GUIDE.name} [torchupdates block {index}]", "exec"), namespace)
    eta = namespace["eta"]
    assert isinstance(eta, torch.Tensor) and eta.item() == pytest.approx(1e-6)  # three in-place decays
    norm = namespace["norm"]
    assert isinstance(norm, torch.Tensor) and norm.item() > 0
