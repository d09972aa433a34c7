"""The judges' call pool, re-exported: it lives in :mod:`rubric_fast.judges.pool`, where the judges that own
one (http, hf) can import it without reaching up into the scoring layer."""

from rubric_fast.judges.pool import PINNED_ENDPOINT, CallPool, Endpoint, PoolMetrics, TokenBucket  # noqa: F401

__all__ = ["PINNED_ENDPOINT", "CallPool", "Endpoint", "PoolMetrics", "TokenBucket"]
