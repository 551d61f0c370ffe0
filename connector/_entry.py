"""The ``connector`` command's entry point, as light as it can be: a SIGHUP that reaches
``connector serve`` while it loads (a reload sent too early, a terminal's hangup) is ignored
from the first line of the connector's own code, not fatal; `serve` handles it from its
lifespan on (connector.reload). Every other command takes SIGHUP's default action back as
soon as the command line is read (connector.cli)."""

from __future__ import annotations

import signal

from connector import _sighup


def main() -> None:
    _sighup.previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from connector.cli import main as command_line

    command_line()
