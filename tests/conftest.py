"""Shared test configuration. Its directory is on ``sys.path`` (pytest's default import mode),
so the helpers beside it (``compiler``, ``numpy_reference``) import from any test folder."""
