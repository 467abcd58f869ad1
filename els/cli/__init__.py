"""The `els` command: collect, train, run and generate in `main`; tune, serve, eval and judge-check in `eval`."""

from els.cli.main import app

__all__ = ["app"]
