"""Command line (filled in below)."""


def main():
    pass
