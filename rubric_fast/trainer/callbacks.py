"""Callbacks: code that runs at named points of a training run, without living in the loop.

    train(cfg, callbacks=[MyCallback()])

A callback is any object with ``on_event(event, step, rank, **info)``. Events:

    rollout      a step's first completions were generated (``step`` = the step they are for)
    epoch        the prompt stream wrapped into a new epoch
    backward     the first micro-batch's backward of an optimizer step is done
    checkpoint   this rank's checkpoint files are written, before the directory is complete
    train_end    the run finished its last step (``info``: policy)

The test hooks are callbacks too, switched on from the environment (:func:`from_environment`), so that a
subprocess under torchrun can be killed at an exact point: ``RUBRIC_FAST_TEST_KILL=PHASE:STEP[:RANK]``
SIGKILLs that rank there; ``RUBRIC_FAST_DUMP_PARAM_SUM=1`` prints every rank's parameter checksum at the end.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Iterable, Protocol


class Callback(Protocol):
    def on_event(self, event: str, step: int, rank: int, **info: Any) -> None: ...


class Callbacks:
    """Calls every callback, in order, for each event."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)

    def __call__(self, event: str, step: int, rank: int, **info: Any) -> None:
        for cb in self.callbacks:
            cb.on_event(event, step, rank, **info)


class KillAt:
    """SIGKILL this process at ``phase`` of ``step`` (on ``rank``, or on every rank): a crash at an exact
    point, for the resume tests."""

    def __init__(self, phase: str, step: int, rank: int | None = None):
        self.phase, self.step, self.rank = phase, step, rank

    @classmethod
    def parse(cls, spec: str) -> KillAt:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(p.lstrip("-").isdigit() for p in parts[1:]):
            raise ValueError(f"RUBRIC_FAST_TEST_KILL: expected PHASE:STEP[:RANK], got {spec!r}")
        return cls(parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None)

    def on_event(self, event: str, step: int, rank: int, **info: Any) -> None:
        if event == self.phase and step == self.step and (self.rank is None or rank == self.rank):
            print(f"[rubric_fast] test hook: SIGKILL at {event} of step {step} on rank {rank}", file=sys.stderr,
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


class ParamChecksum:
    """At the end, print this rank's sum of |parameters| (every rank must hold the same weights)."""

    def on_event(self, event: str, step: int, rank: int, **info: Any) -> None:
        if event != "train_end":
            return
        from .dist import full_tensor

        policy = info["policy"]
        checksum = sum(float(full_tensor(p.detach()).double().abs().sum()) for p in policy.parameters())
        print(f"[rubric_fast] rank {rank} param checksum {checksum:.10e}", file=sys.stderr)


def from_environment() -> list[Callback]:
    """The test hooks the environment asks for (none when the variables are unset)."""
    out: list[Callback] = []
    spec = os.environ.get("RUBRIC_FAST_TEST_KILL")
    if spec:
        out.append(KillAt.parse(spec))
    if os.environ.get("RUBRIC_FAST_DUMP_PARAM_SUM"):
        out.append(ParamChecksum())
    return out
