"""``python -m medlake`` and the ``medlake`` console script.

This module imports nothing at load. Worker processes started with ``spawn`` begin
by importing again the module that started the program; from here that costs them
nothing, where ``medlake.cli.main`` would bring Typer and Rich into every worker.
"""

from __future__ import annotations


def main() -> None:
    """Run the command line."""
    from medlake.cli.main import run

    run()


if __name__ == "__main__":
    main()
