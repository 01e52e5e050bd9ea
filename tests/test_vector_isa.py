"""Inductor's vector instruction set check, recorded by the first process and read by later ones."""

from __future__ import annotations

import json
import platform
from collections.abc import Iterator
from pathlib import Path

import pytest

from compiler import needs_compiler
from torchupdates.engines import _vector_isa
from torchupdates.engines.compiled import _configured_compiler

pytestmark = [
    needs_compiler,
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="Inductor checks these on x86 only"),
]


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty Inductor cache directory, and no answer kept in this process."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    _vector_isa._remembered.cache_clear()
    yield tmp_path
    _vector_isa._remembered.cache_clear()


def _inductor_check_must_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor import cpu_vec_isa

    def fail() -> None:
        raise AssertionError("Inductor's check ran although a record existed")

    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", fail)


def _usable_now() -> list[str]:
    from torch._inductor import cpu_vec_isa

    return sorted(str(isa) for isa in cpu_vec_isa.valid_vec_isa_list())


def test_the_first_process_records_the_check_and_a_later_one_reads_it(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._inductor import cpu_vec_isa

    compiler = _configured_compiler()
    first = _vector_isa.remembered_vector_isa_options(compiler)
    (record,) = (cache / "torchupdates").glob("vector-isa-*.json")
    saved = json.loads(record.read_text())
    assert saved["usable"] == _usable_now()
    everything_usable = saved["usable"] == _vector_isa._reported_sets(cpu_vec_isa)
    assert first == ({"cpp.vec_isa_ok": True} if everything_usable else {})

    _vector_isa._remembered.cache_clear()  # as a new process
    _inductor_check_must_not_run(monkeypatch)
    assert _vector_isa.remembered_vector_isa_options(compiler) == first


def test_a_set_that_failed_leaves_the_check_to_inductor(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiler = _configured_compiler()
    _vector_isa.remembered_vector_isa_options(compiler)
    (record,) = (cache / "torchupdates").glob("vector-isa-*.json")
    saved = json.loads(record.read_text())
    saved["usable"] = saved["usable"][1:]  # one set found unusable
    record.write_text(json.dumps(saved))
    _vector_isa._remembered.cache_clear()
    _inductor_check_must_not_run(monkeypatch)
    assert _vector_isa.remembered_vector_isa_options(compiler) == {}


def test_an_unreadable_record_is_checked_again_and_rewritten(cache: Path) -> None:
    compiler = _configured_compiler()
    expected = _vector_isa.remembered_vector_isa_options(compiler)
    (record,) = (cache / "torchupdates").glob("vector-isa-*.json")
    record.write_text("{not json")
    _vector_isa._remembered.cache_clear()
    assert _vector_isa.remembered_vector_isa_options(compiler) == expected
    assert json.loads(record.read_text())["usable"] == _usable_now()


def test_without_a_compiler_nothing_is_recorded(cache: Path) -> None:
    assert _vector_isa.remembered_vector_isa_options(None) == {}
    assert not (cache / "torchupdates").exists()


def test_the_sets_are_checked_at_once() -> None:
    # Each check compiles and loads a probe (seconds each): they run side by side, and every
    # set the CPU reports is checked before Inductor's own pass reads the answers.
    import threading
    from types import SimpleNamespace

    names = ["avx2", "avx512", "amx"]
    together = threading.Barrier(len(names), timeout=10)
    checked: list[str] = []

    class FakeSet:
        def __init__(self, name: str) -> None:
            self.name = name

        def __str__(self) -> str:
            return self.name

        def __bool__(self) -> bool:
            together.wait()  # raises BrokenBarrierError unless all checks run at once
            checked.append(self.name)
            return True

    inductor = SimpleNamespace(supported_vec_isa_list=[FakeSet(name) for name in [*names, "vsx"]])
    _vector_isa._check_concurrently(inductor, sorted(names))
    assert sorted(checked) == sorted(names)
