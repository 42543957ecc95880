"""`python -m sisa.cli`: the same as the `sisa` console script."""

from sisa.cli.commands import main

main()
