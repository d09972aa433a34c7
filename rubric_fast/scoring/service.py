"""ScoringService: the synchronous face of the streaming scorer, for the trainer.

It owns an asyncio loop in a daemon thread; :meth:`submit` hands work to it without blocking, released
groups arrive on a thread-safe queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any, Iterator

from .scorer import ScoredGroup, ScorerConfig, ScoringError, StreamingScorer, score_all


class ScoringService:
    def __init__(self, judge, config: ScorerConfig | None = None, *, cache=None):
        self._ready: queue.Queue[ScoredGroup] = queue.Queue()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rubric-fast-scoring", daemon=True)
        self.scorer = StreamingScorer(judge, config, cache=cache, on_group=self._ready.put)
        self._submitted_groups: set = set()
        self._closed = False
        self._thread.start()

    # ------------------------------------------------------------------------------------------ helpers
    def _call(self, fn, *args, **kwargs):
        """Run ``fn`` in the loop thread and wait for its result (errors re-raised here)."""
        async def run():
            return fn(*args, **kwargs)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def _check(self) -> None:
        if self._closed:
            raise ScoringError("the scoring service is closed")
        if self.scorer.fatal is not None:
            raise self.scorer.fatal

    # ------------------------------------------------------------------------------------------ API
    def submit(self, group_id, rollout_id: str, record, response: str, *, group_size: int | None = None,
               **meta) -> None:
        """Queue one completion for scoring; returns at once. ``record`` is a Rubric or a rubric_fast dict.
        Errors in the arguments (duplicate rollout id, closed group) surface at the next call as a failed
        member, never as a silent 0."""
        self._check()

        def go():
            try:
                self.scorer.submit(group_id, rollout_id, record, response, group_size=group_size, **meta)
            except ScoringError:
                pass  # reported by the next ready_groups()/submit()
        self._loop.call_soon_threadsafe(go)

    def score_now(self, items: list[tuple[str, Any, str]], timeout: float | None = None) -> list:
        """Score ``(rollout_id, record, response)`` items outside any group and wait for all of them (same
        guard, cache, judge, aggregation and accounting as a submitted rollout); a list of ScoredRollout."""
        self._check()

        return asyncio.run_coroutine_threadsafe(score_all(self.scorer, items), self._loop).result(timeout)

    def close_group(self, group_id) -> None:
        """No more members will be submitted for ``group_id`` (use when group sizes are not fixed)."""
        self._check()
        self._loop.call_soon_threadsafe(lambda: self.scorer.close_group(group_id) if group_id in self.scorer._groups
                                        else None)

    def ready_groups(self, timeout: float | None = 0.0, max_groups: int | None = None) -> list[ScoredGroup]:
        """Every group released so far (up to ``max_groups``). When none is ready yet, wait up to ``timeout``
        seconds for the first one (``None``: until one is ready or nothing is pending). Raises ScoringError
        when the run stopped on the error-rate threshold."""
        out: list[ScoredGroup] = []
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                while max_groups is None or len(out) < max_groups:
                    out.append(self._ready.get_nowait())
            except queue.Empty:
                pass
            if out:
                return out
            self._check()
            if end is not None and time.monotonic() >= end:
                return out
            if timeout is None and self.pending() == 0:
                try:  # a group released between the queue check and pending(): hand it out
                    while max_groups is None or len(out) < max_groups:
                        out.append(self._ready.get_nowait())
                except queue.Empty:
                    pass
                return out
            wait = 0.05 if end is None else max(0.0, min(0.05, end - time.monotonic()))
            try:
                out.append(self._ready.get(timeout=wait))
            except queue.Empty:
                pass

    def iter_groups(self, timeout: float | None = None) -> Iterator[ScoredGroup]:
        """Yield groups as they are released until nothing is pending (or ``timeout`` passes with none)."""
        while True:
            got = self.ready_groups(timeout=timeout)
            if not got:
                return
            yield from got

    def pending(self) -> int:
        """Rollouts in flight plus groups still open (waiting for members or for close_group)."""
        if self._closed:
            return 0
        return self._call(lambda: len(self.scorer._tasks) + len(self.scorer._groups))

    def drain(self, timeout: float | None = None) -> list[ScoredGroup]:
        """Wait until every submitted rollout is done; return the groups released meanwhile."""
        fut = asyncio.run_coroutine_threadsafe(self.scorer.drain(), self._loop)
        fut.result(timeout)
        return self.ready_groups(timeout=0.0)

    def metrics(self) -> dict[str, Any]:
        if self._closed:
            return self._final_metrics
        return self._call(self.scorer.metrics)

    def close(self) -> None:
        if self._closed:
            return
        self._final_metrics = self._call(self.scorer.metrics)
        asyncio.run_coroutine_threadsafe(self.scorer.aclose(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._closed = True

    def __enter__(self) -> ScoringService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
