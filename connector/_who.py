"""Who does something from the command line, as the audit table records it."""

from __future__ import annotations

import getpass
import socket


def who() -> str:
    """The command line's "who" in the audit table: its user and host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli {user}@{socket.gethostname()}"
