"""`python -m vaecli` runs the `vae` command line."""

from vaecli.console import main

main()
