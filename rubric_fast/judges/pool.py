"""The call pool shared by every call of one judge: concurrency, rate limits, timeouts, retries, routing.

``CallPool.call(fn, tokens=..., deadline=...)`` runs ``await fn(endpoint)`` with:

* at most ``concurrency`` calls in flight (per judge);
* a requests-per-minute and a tokens-per-minute budget (token buckets holding 10 s of budget, so a cold
  start may burst that much; ``tokens`` is the caller's estimate, corrected afterwards with
  :meth:`CallPool.record_tokens`);
* a per-call timeout ``timeout_s`` and an absolute per-rollout ``deadline`` (``time.monotonic()``);
* retries of transport errors, timeouts, 429 and 5xx with jittered exponential backoff
  (``min(backoff_max_s, backoff_base_s * 2**attempt) * U(0.5, 1)``), never shorter than a ``Retry-After``;
* least-loaded routing: each call goes to the endpoint with the fewest calls in flight (ties: the one
  with the fewest recent errors, then round robin).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

from .base import CallTimeout, DeadlineExceeded, JudgeCallError

T = TypeVar("T")
# the judge audit pins its canary calls to one endpoint (per task: set it around the judge call)
PINNED_ENDPOINT: contextvars.ContextVar[str | None] = contextvars.ContextVar("rubric_fast_pinned_endpoint",
                                                                           default=None)
_timeout_cm = getattr(asyncio, "timeout", None)


class TokenBucket:
    """Budget of ``per_minute`` units refilled continuously; holds at most ``burst_s`` seconds of budget."""

    def __init__(self, per_minute: float, burst_s: float = 10.0):
        if per_minute <= 0:
            raise ValueError(f"rate limit must be > 0 per minute, got {per_minute}")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self._lock: asyncio.Lock | None = None

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    async def acquire(self, n: float = 1.0) -> float:
        """Wait until ``n`` units are available and take them; returns the seconds waited."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        n = min(n, self.capacity)
        waited = 0.0
        async with self._lock:  # FIFO: one waiter at a time refills and takes
            while True:
                self._refill()
                if self.tokens >= n:
                    self.tokens -= n
                    return waited
                delay = (n - self.tokens) / self.rate
                waited += delay
                await asyncio.sleep(delay)

    def debit(self, n: float) -> None:
        """Take ``n`` more units now (may go into debt), e.g. tokens used beyond the estimate."""
        self._refill()
        self.tokens -= n


@dataclass
class Endpoint:
    url: str
    in_flight: int = 0
    calls: int = 0
    errors: int = 0


@dataclass
class PoolMetrics:
    calls: int = 0
    ok: int = 0
    retries: int = 0
    errors: Counter = field(default_factory=Counter)     # by kind: transport, rate_limited, server, timeout, ...
    failed_calls: int = 0                                # calls that gave up
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rate_wait_s: float = 0.0
    latencies: deque = field(default_factory=lambda: deque(maxlen=20000))

    def as_dict(self) -> dict:
        lat = sorted(self.latencies)

        def q(p: float) -> float | None:
            return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None

        return {"calls": self.calls, "calls_ok": self.ok, "retries": self.retries,
                "call_errors": dict(self.errors), "calls_failed": self.failed_calls,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "rate_limit_wait_s": round(self.rate_wait_s, 3),
                "call_latency_p50_s": q(0.5), "call_latency_p95_s": q(0.95)}


class CallPool:
    def __init__(self, endpoints: list[str] | None = None, *, concurrency: int = 16, rpm: float | None = None,
                 tpm: float | None = None, timeout_s: float = 60.0, retries: int = 4,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0, name: str = "pool"):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.name = name
        self.endpoints = [Endpoint(u) for u in (endpoints or ["local"])]
        self.concurrency, self.timeout_s, self.retries = concurrency, timeout_s, retries
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.rpm = TokenBucket(rpm) if rpm else None
        self.tpm = TokenBucket(tpm) if tpm else None
        self.metrics = PoolMetrics()
        self.drained: set[str] = set()
        self._sem: asyncio.Semaphore | None = None
        self._rr = itertools.count()

    def drain(self, url: str) -> None:
        """Send no more traffic to ``url`` (the judge audit found it fooled); the last endpoint is kept."""
        if any(e.url == url for e in self.endpoints) and len(self.drained | {url}) < len(self.endpoints):
            self.drained.add(url)

    def _pick(self) -> Endpoint:
        pinned = PINNED_ENDPOINT.get()
        if pinned is not None:
            for e in self.endpoints:
                if e.url == pinned:
                    return e
        start = next(self._rr) % len(self.endpoints)
        order = [e for e in self.endpoints[start:] + self.endpoints[:start] if e.url not in self.drained]
        return min(order or self.endpoints, key=lambda e: (e.in_flight, e.errors))

    def record_tokens(self, prompt: int, completion: int, estimate: int = 0) -> None:
        self.metrics.prompt_tokens += prompt
        self.metrics.completion_tokens += completion
        if self.tpm is not None and prompt + completion > estimate:
            self.tpm.debit(prompt + completion - estimate)

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff_max_s, self.backoff_base_s * (2 ** attempt)) * random.uniform(0.5, 1.0)
        return max(delay, retry_after or 0.0)

    async def call(self, fn: Callable[[str], Awaitable[T]], *, tokens: int = 0,
                   deadline: float | None = None) -> T:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        attempt = 0
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise DeadlineExceeded("rollout deadline passed before the call")
            if self.rpm is not None:
                self.metrics.rate_wait_s += await self.rpm.acquire(1)
            if self.tpm is not None and tokens:
                self.metrics.rate_wait_s += await self.tpm.acquire(tokens)
            async with self._sem:
                ep = self._pick()
                ep.in_flight += 1
                ep.calls += 1
                self.metrics.calls += 1
                t0 = time.monotonic()
                timeout = self.timeout_s
                deadline_bound = deadline is not None and deadline - t0 < timeout
                if deadline_bound:
                    timeout = max(0.0, deadline - t0)
                err: JudgeCallError | None = None
                try:
                    if _timeout_cm is not None:  # 3.11+: no extra task per call (wait_for costs a loop turn)
                        async with _timeout_cm(timeout):
                            result = await fn(ep.url)
                    else:
                        result = await asyncio.wait_for(fn(ep.url), timeout)
                except asyncio.TimeoutError:
                    err = (DeadlineExceeded("rollout deadline passed during the call") if deadline_bound
                           else CallTimeout(f"no answer within timeout_s={self.timeout_s:g}"))
                except JudgeCallError as exc:
                    err = exc
                finally:
                    ep.in_flight -= 1
                self.metrics.latencies.append(time.monotonic() - t0)
            if err is None:
                self.metrics.ok += 1
                ep.errors = max(0, ep.errors - 1)
                return result
            ep.errors += 1
            self.metrics.errors[err.kind] += 1
            if not err.retryable or attempt >= self.retries:
                self.metrics.failed_calls += 1
                if err.retryable:
                    raise type(err)(f"{err} (gave up after {attempt} retries)", retry_after=err.retry_after)
                raise err
            delay = self.backoff(attempt, err.retry_after)
            if deadline is not None and time.monotonic() + delay >= deadline:
                self.metrics.failed_calls += 1
                raise DeadlineExceeded(f"rollout deadline would pass while backing off after: {err}")
            attempt += 1
            self.metrics.retries += 1
            await asyncio.sleep(delay)
