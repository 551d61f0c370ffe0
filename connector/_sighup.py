"""SIGHUP's disposition as the ``connector`` command found it (SIG_DFL, or SIG_IGN under
nohup), before its entry point ignored it for serve's sake (connector._entry): what every
other command takes back (connector.cli). None when the entry point did not run (the
connector used as a library, or from tests)."""

from typing import Any

previous: Any = None
