"""The `sisa` command line: commands (`commands`), terminal rendering (`render`) and the demo (`demo`)."""


def main(*args, **kwargs):
    """The `sisa` console script (imports click and the commands only when run)."""
    from sisa.cli.commands import main as _main

    return _main(*args, **kwargs)
