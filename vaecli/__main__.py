"""`python -m vaecli` runs the `vae` command line."""

from vaecli.cli import run

run()
