"""A deadline for each step of a GPU probe.

A kernel that never ends (a barrier nobody arrives on, as v43's count in session 21) blocks the
Python thread in its next synchronisation for good, and the device call then runs to its time
limit: that hang took 480 s of the session's 30 minutes. Around each step, `deadline(seconds,
what)` prints what overran and ends the process once the step takes longer; the CUDA context, and
the kernel with it, goes with the process, so a hang costs the deadline and the log says where.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading


@contextlib.contextmanager
def deadline(seconds: float, what: str, on_expiry=None):
    """Run the with-block; if it is not done within `seconds`, print "HUNG: <what>" to stderr and
    end the process with exit status 3 (`on_expiry`, a callable, instead: for tests). The timer is
    a daemon thread, so it keeps no finished process alive."""
    def expire():
        print(f"HUNG: {what} (over {seconds:g} s); ending the process", file=sys.stderr, flush=True)
        (on_expiry or (lambda: os._exit(3)))()

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
