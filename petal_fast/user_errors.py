"""How a ``petal-fast`` command ends on a user error: one line naming the problem and exit status 2
(a failed run: status 1), no traceback unless the ``debug`` setting asks for one."""
from __future__ import annotations

import pickle
import sys
from typing import Any, Callable

from petal_fast import settings

# User mistakes and bad input: wrong config values (ConfigError), malformed data (RecordIOError, …),
# unreadable checkpoints, missing files. Their messages name the key or file; a traceback adds nothing.
USER_ERRORS = (ValueError, OSError, pickle.UnpicklingError)


def report_errors(prog: str, fn: Callable[..., int], *args: Any) -> int:
    """``fn(*args)``; a user error is printed as ``prog: error: message`` and exits with status 2, a run
    that failed (``TrainingFailed``: nothing trained, diverged) with status 1 (no traceback either
    way; the ``debug`` setting, ``PETAL_FAST_DEBUG=1``, re-raises it)."""
    from petal_fast.training.result import TrainingFailed
    try:
        return fn(*args)
    except TrainingFailed as err:
        if settings.current().debug:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        if settings.current().debug:
            raise
        message = str(err)
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep the original message only
            message = next(line for line in reversed(message.splitlines()) if line.strip()).strip()
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
