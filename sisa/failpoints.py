"""Named crash points for fault-injection tests: with SISA_CRASH_AT=<name> the process SIGKILLs itself there.

Costs one dict lookup when unset. Used by tests/e2e/test_faults.py to kill a driver mid-deletion at exact steps.
"""

from __future__ import annotations

import os
import signal


def crashpoint(name: str) -> None:
    if os.environ.get("SISA_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
