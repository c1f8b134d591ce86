"""Ctrl-C from the first instant of a ``consa`` command, and a deterministic place to interrupt one.

Only the standard library is imported here: ``consa/__init__.py`` calls :func:`quiet_ctrl_c` before it
imports torch and transformers, which take seconds, and a Ctrl-C in those seconds must end as the same
one line (``consa: interrupted``, exit 130) as one during the work, not as a traceback through the imports.

:func:`interrupt_point` is for tests: a kill-and-resume test cannot race a run against the clock (a fast
machine finishes first, a slow one is killed before its first checkpoint), so the run signals *itself* at a
named point. The signal is a real one, delivered by the kernel, so what is tested is the process's own
signal handling.
"""

from __future__ import annotations

import os
import signal
import sys

INTERRUPT_AT = "CONSA_INTERRUPT_AT"  # a point name: "startup", or "step N" (before training step N)
INTERRUPT_SIGNAL = "CONSA_INTERRUPT_SIGNAL"  # INT (default), TERM or KILL


def _launched_as_cli() -> bool:
    """Whether this process is the ``consa`` command (the console script or ``python -m consa``), not a
    program that imports consa: only the command may decide what Ctrl-C does to the whole process."""
    argv = getattr(sys, "orig_argv", sys.argv)
    launched_m = any(a == "-m" and b == "consa" for a, b in zip(argv, argv[1:]))
    return launched_m or os.path.basename(sys.argv[0] or "") == "consa"


def _exit_interrupted(signum, frame):  # noqa: ARG001
    print("consa: interrupted", file=sys.stderr, flush=True)
    os._exit(130)  # nothing of ours is open yet (or any more): no cleanup to run, no exception to escape


def quiet_ctrl_c() -> None:
    """In the ``consa`` command, Ctrl-C exits 130 with one line from now on (startup, interpreter exit).

    :func:`consa.cli.main` hands Ctrl-C back to Python's KeyboardInterrupt (:func:`ctrl_c_raises`) while
    it runs, where a partial output must be cleaned up first. A program that imports consa keeps its own
    SIGINT handling: nothing is installed there, nor where a handler other than Python's default is in
    place, nor outside the main thread."""
    if not _launched_as_cli():
        return
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _exit_interrupted)
    except ValueError:  # not the main thread
        pass


def ctrl_c_raises() -> None:
    """Ctrl-C raises KeyboardInterrupt again (if :func:`quiet_ctrl_c` had changed it): the command turns
    it into the same line once it has cleaned up (a resumable run is kept, other partial output removed)."""
    try:
        if signal.getsignal(signal.SIGINT) is _exit_interrupted:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:
        pass


def interrupt_point(where: str) -> None:
    """Send this process ``$CONSA_INTERRUPT_SIGNAL`` (SIGINT by default) when ``$CONSA_INTERRUPT_AT`` is
    ``where``. Unset, as in every real run, it costs one environment look-up."""
    if os.environ.get(INTERRUPT_AT) != where:
        return
    name = os.environ.get(INTERRUPT_SIGNAL, "INT").upper().removeprefix("SIG")
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
