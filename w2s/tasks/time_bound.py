"""A time bound for answer comparisons (sympy can take minutes on a 35-character answer): the one alarm that the
equivalence grader (w2s/tasks/grading.py) and OlympicArena's judge (w2s/tasks/olympic_judge.py) both use.

    with time_bound(1.0):
        equal = sympy.simplify(a - b) == 0        # TimeBoundReached after one second

Only the main thread can take a signal; elsewhere the body runs unbounded in time, and the callers' size bounds
(no exact power past a few thousand digits) are what keeps a comparison short. Every torchrun rank grades in its
main thread.

    python -m pytest -q tests/test_graders.py tests/test_olympicarena.py
"""

import signal
import threading
from contextlib import contextmanager


class TimeBoundReached(BaseException):
    """A BaseException, so that sympy's own `except Exception` cannot swallow it and keep computing."""


@contextmanager
def time_bound(seconds: float):
    """Raise TimeBoundReached in the body after `seconds` (SIGALRM), in the main thread; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def alarm(signum, frame):
        raise TimeBoundReached

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
