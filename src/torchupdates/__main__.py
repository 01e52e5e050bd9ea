"""``python -m torchupdates``: the command line (see :mod:`torchupdates.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
