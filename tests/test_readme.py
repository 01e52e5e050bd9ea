"""The README's Python examples run as written (all but the first, which needs a model)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run_and_train() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 5
    namespace: dict[str, object] = {}
    exec(blocks[1], namespace)  # quick start: trains a model
    loss = namespace["loss"]
    assert isinstance(loss, torch.Tensor)
    assert loss.item() < 0.5 * math.log(3)  # well below chance level on 3 classes
    for block in blocks[2:]:
        exec(block, namespace)
    weight = namespace["weight"]
    assert isinstance(weight, torch.Tensor)
    assert bool((weight.detach().norm(dim=1) <= 3.0 + 1e-5).all())
    eta = namespace["eta"]
    assert isinstance(eta, torch.Tensor)
    assert math.isclose(eta.item(), 0.001, rel_tol=1e-6)
