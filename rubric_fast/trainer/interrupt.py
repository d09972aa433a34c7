"""Clean interrupts: SIGINT / SIGTERM finish the current step, write a checkpoint, and exit 130 / 143.

``rubric-fast train`` installs :data:`SIGNALS` for the run. Before the loop can checkpoint (loading the
model, the data, the judge) a signal ends the run at once with :class:`Interrupted`. Inside the loop it is
deferred: the step in flight finishes, the ranks agree on it (one all-reduce per step), a checkpoint is
written and :class:`Interrupted` carries its path to the command, which prints one line and exits with
128 + the signal number. A second SIGINT (or SIGTERM) while the step finishes exits at once.
"""

from __future__ import annotations

import os
import signal
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

    def install(self) -> bool:
        """Catch SIGINT and SIGTERM (main thread only); returns whether the handlers were installed."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self.signum, self.deferred = None, False
        for sig in NAMES:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.signum, self.deferred = None, False

    def _handle(self, signum, frame) -> None:
        main_rank = os.environ.get("RANK", "0") == "0"
        if self.signum is not None:  # the second signal: no more waiting
            if main_rank:
                print(f"rubric-fast train: second {NAMES.get(signum, signum)}: exiting now, without a checkpoint",
                      file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + int(signum))
        self.signum = int(signum)
        if not self.deferred:
            raise Interrupted(signum)
        if main_rank:
            print(f"rubric-fast train: {NAMES.get(signum, signum)}: finishing {self.step_hint or 'this step'}, then "
                  "writing a checkpoint (press Ctrl-C again to exit at once)", file=sys.stderr, flush=True)


SIGNALS = StopSignals()
