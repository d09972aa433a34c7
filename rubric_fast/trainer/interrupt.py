"""Clean interrupts: SIGINT / SIGTERM finish the current step, write a checkpoint, and exit 130 / 143.

``rubric-fast train`` installs :data:`SIGNALS` for the run. Before the loop can checkpoint (loading the
model, the data, the judge) a signal ends the run at once with :class:`Interrupted`. Inside the loop it is
deferred: the step in flight finishes, the ranks agree on it (one all-reduce per step), a checkpoint is
written and :class:`Interrupted` carries its path to the command, which prints one line and exits with
128 + the signal number. A second SIGINT (or SIGTERM) while the step finishes exits at once: a watcher
thread counts the signals from ``signal.set_wakeup_fd`` (one byte per delivery), so it acts even while the
main thread is inside a long C call and Python has not yet run (or has merged) the handlers.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Interrupted(Exception):
    """The run was stopped by a signal; ``checkpoint`` is where it can continue from (None: nowhere)."""

    def __init__(self, signum: int, *, step: int | None = None, checkpoint: str | None = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(NAMES.get(signum, f"signal {signum}"))

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class StopSignals:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False          # True inside the loop: finish the step, then checkpoint
        self.step_hint = ""            # "step 4/200", for the notice
        self._previous: dict[int, object] = {}
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._previous_fd = -1

    def install(self) -> bool:
        """Catch SIGINT and SIGTERM (main thread only); returns whether the handlers were installed."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self.signum, self.deferred = None, False
        for sig in NAMES:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self._wakeup = (reader, writer)
            threading.Thread(target=self._watch, args=(reader,), name="rubric-fast-signals", daemon=True).start()
        except (OSError, ValueError):  # no wakeup fd: the Python-level handler still covers a second signal
            self._wakeup = None
        return True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_fd)
            for sock in self._wakeup:
                sock.close()
            self._wakeup = None
        self.signum, self.deferred = None, False

    def _watch(self, reader: socket.socket) -> None:
        """Count SIGINT / SIGTERM deliveries; the second one ends the process at once."""
        seen = 0
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in NAMES:
                    seen += 1
                    if seen >= 2:
                        self._exit_now(signum)

    @staticmethod
    def _exit_now(signum: int) -> None:
        if os.environ.get("RANK", "0") == "0":
            print(f"rubric-fast train: second {NAMES.get(signum, signum)}: exiting now, without a checkpoint",
                  file=sys.stderr, flush=True)
        os._exit(128 + int(signum))

    def _handle(self, signum, frame) -> None:
        main_rank = os.environ.get("RANK", "0") == "0"
        if self.signum is not None:  # the second signal (when the watcher thread is not there)
            self._exit_now(signum)
        self.signum = int(signum)
        if not self.deferred:
            raise Interrupted(signum)
        if main_rank:
            print(f"rubric-fast train: {NAMES.get(signum, signum)}: finishing {self.step_hint or 'this step'}, then "
                  "writing a checkpoint (press Ctrl-C again to exit at once)", file=sys.stderr, flush=True)


SIGNALS = StopSignals()
