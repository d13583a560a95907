"""SIGINT / SIGTERM become a request to stop after the current step (and save), not a crash."""
import signal
import threading


class StopRequested:
    """While active, the first SIGINT/SIGTERM sets :attr:`requested`; a second one exits at once.

    The training loop checks ``requested`` after each optimizer step, saves a resumable
    checkpoint and exits with :attr:`exit_code` (128 + the signal number, as a shell reports a
    process ended by that signal, so a scheduler sees the run did not finish). Signal handlers can
    only be installed from the main thread; elsewhere this does nothing.
    """

    def __init__(self):
        self.requested: str | None = None
        self.exit_code = 0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested is not None:  # second signal: the user means it
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self.exit_code = 128 + int(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False
