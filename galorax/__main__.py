"""``python -m galorax ...``: the same as the ``galorax`` command."""

from galorax.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
