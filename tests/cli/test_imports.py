"""The command line is a layer on top: the core never imports it or the demo's packages."""

from __future__ import annotations

import json
import subprocess
import sys

SIDE = ("torchupdates.cli", "matplotlib", "tqdm", "sklearn")


def imported_by(statement: str) -> list[str]:
    """The modules a fresh interpreter has loaded after ``statement``."""
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    modules: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return modules


def side_modules(modules: list[str]) -> list[str]:
    return [name for name in modules if any(name == side or name.startswith(f"{side}.") for side in SIDE)]


def test_import_torchupdates_loads_no_cli_and_no_demo_package() -> None:
    modules = imported_by("import torchupdates")
    assert "torchupdates" in modules and "torchupdates.rules" in modules
    assert not [name for name in modules if name.startswith("torchupdates.cli")]
    # torch itself may import tqdm (torch.hub does): count only what torchupdates adds
    assert side_modules(modules) == side_modules(imported_by("import torch"))


def test_the_command_line_is_its_own_subpackage() -> None:
    modules = imported_by("import torchupdates.cli")
    for name in ("torchupdates.cli.compare", "torchupdates.cli.bench", "torchupdates.cli._rulespec"):
        assert name in modules
    # its demo dependencies load only when a command runs
    assert not {"matplotlib", "sklearn"} & set(modules)
