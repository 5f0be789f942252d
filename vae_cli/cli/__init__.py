"""The command line: one module per command, the shared Typer app (`app.py`) and stdout formatting
(`output.py`). Commands import the layers below inside their bodies, so `vae --help` never imports torch."""

from vae_cli.cli import calibrate, classify, embed, eval, export, info, plot, sample, train  # noqa: F401  (each registers its command)
from vae_cli.cli.app import app
from vae_cli.cli.main import main

__all__ = ["app", "main"]
