"""SIGINT and SIGTERM during a conversion.

Both raise Interrupted where the conversion is, so that it removes its staging directory on the
way out (SIGTERM's default would kill the process and leave the directory behind). While OUTPUT
is being put in place they are held back instead, so that the commit finishes; from then on an
Interrupted says that OUTPUT is complete, so that what the caller reports is true.
"""
import signal
import threading
from contextlib import contextmanager

# Left alone when a program has installed its own handler: it decides what a signal means.
DEFAULT_DISPOSITIONS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


class Interrupted(KeyboardInterrupt):
    """A conversion stopped by SIGINT or SIGTERM, its staging directory removed. `output_complete`:
    OUTPUT had been put in place, and holds the finished conversion."""

    def __init__(self, signum, output_complete=False):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.output_complete = output_complete

    @property
    def exit_status(self):
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class HeldSignal:
    """The first signal received while signals were held back, if any."""
    signum = None


class SignalGuard:
    """What SIGINT and SIGTERM do while it is installed: raise Interrupted, or, within `held()`,
    wait until the block ends."""

    def __init__(self):
        self.output_complete = False  # set by the commit, inside a held() block
        self._held = None
        self._previous = {}

    def install(self):
        for signum, default in DEFAULT_DISPOSITIONS.items():
            if signal.getsignal(signum) == default:
                self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self._held is None:
            raise Interrupted(signum, self.output_complete)
        if self._held.signum is None:
            self._held.signum = signum

    @contextmanager
    def held(self):
        """Holds SIGINT and SIGTERM back in the block; yields a HeldSignal that tells, after it,
        which one came."""
        self._held = HeldSignal()
        try:
            yield self._held
        finally:
            self._held = None


_installed = None  # the main thread's guard while one is installed


@contextmanager
def conversion_signals():
    """The guard of the conversion in progress: the one installed by an enclosing block (the
    command line's, which also covers its report), else one installed for this block. Python runs
    signal handlers in the main thread only: elsewhere the guard installs nothing."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        yield SignalGuard()
        return
    if _installed is not None:
        yield _installed
        return
    _installed = SignalGuard()
    try:
        _installed.install()
        yield _installed
    finally:
        _installed.restore()
        _installed = None
