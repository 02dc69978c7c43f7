"""``python -m galorax ...``: the same as the ``galorax`` command."""

from galorax.app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
