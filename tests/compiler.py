"""Whether this machine can run ``engine="compiled"``: tests of it skip, saying why, when not."""

from __future__ import annotations

import pytest

from torchupdates.engines.compiled import CompilerMissingError, require_compiler


def compiler_available() -> bool:
    try:
        require_compiler({"cpu"})
    except CompilerMissingError:
        return False
    return True


needs_compiler = pytest.mark.skipif(
    not compiler_available(), reason='engine="compiled" needs a C++ compiler (e.g. g++) and none was found'
)
