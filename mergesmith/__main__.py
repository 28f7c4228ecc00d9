"""The ``mergesmith`` command and ``python -m mergesmith``: interrupts are handled from the first instruction.

Importing typer, rich and (for a merge) torch takes a while; until ``mergesmith.cli.main`` installs its own
handlers, Ctrl-C or SIGTERM ends the process with one line and the signal's exit status: nothing has been
written yet, so there is nothing to clean up.
"""

from __future__ import annotations

import os
import signal
import sys


def _early_interrupt(number: int, _frame: object) -> None:
    name = "Ctrl-C" if number == signal.SIGINT else signal.Signals(number).name
    sys.stderr.write(f"error: interrupted ({name}) while starting; nothing was written\n")
    sys.stderr.flush()
    os._exit(128 + number)


def run() -> None:
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _early_interrupt)
    from mergesmith.cli import main

    main()


if __name__ == "__main__":
    run()
