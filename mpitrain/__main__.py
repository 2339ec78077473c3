"""`python -m mpitrain` is the `mpitrain` command."""

from mpitrain.cli import main

main()
