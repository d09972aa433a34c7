"""A judge behind any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, SGLang, hosted APIs).

Uses ``httpx.AsyncClient``; every call goes through a :class:`~rubric_fast.judges.pool.CallPool` (per-judge
concurrency, rpm/tpm budgets, timeouts, retries with backoff honouring Retry-After, least-loaded routing
over ``endpoints``). The API key is read once from the environment variable named by ``api_key_env``; it
is never logged, never put in error messages, and not part of ``repr`` or the cache identity.
"""

from __future__ import annotations

import email.utils
import os
import time
from typing import Any

import httpx

from .pool import CallPool

from . import prompts
from .base import ClientError, RateLimited, ServerError, TransportError, CallTimeout
from .chat import ChatJudge


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # HTTP-date form
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class HttpJudge(ChatJudge):
    name = "http"

    def __init__(self, model: str, endpoints: list[str] | str, *, api_key_env: str | None = None,
                 mode: str = "per_criterion", batch_size: int = 5, max_reasks: int = 2, max_tokens: int = 512,
                 structured: bool = False, explanation_chars: int = prompts.EXPLANATION_MAX_CHARS,
                 temperature: float = 0.0, extra_body: dict[str, Any] | None = None,
                 pool: CallPool | None = None, concurrency: int = 32, rpm: float | None = None,
                 tpm: float | None = None, timeout_s: float = 60.0, retries: int = 4,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0):
        super().__init__(mode=mode, batch_size=batch_size, max_reasks=max_reasks, structured=structured,
                         explanation_chars=explanation_chars)
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ValueError("http judge: 'endpoints' must list at least one base URL such as http://host:8000/v1")
        for e in endpoints:
            if not e.startswith(("http://", "https://")):
                raise ValueError(f"http judge: endpoint {e!r} must start with http:// or https://")
        self.model = model
        self._api_key: str | None = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"http judge: environment variable {api_key_env!r} (api_key_env) is not set")
            self._api_key = key
        self.max_tokens, self.temperature = max_tokens, temperature
        self.extra_body = dict(extra_body or {})
        self.pool = pool or CallPool([e.rstrip("/") for e in endpoints], concurrency=concurrency, rpm=rpm, tpm=tpm,
                                     timeout_s=timeout_s, retries=retries, backoff_base_s=backoff_base_s,
                                     backoff_max_s=backoff_max_s, name=f"http:{model}")
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"HttpJudge(model={self.model!r}, endpoints={[e.url for e in self.pool.endpoints]}, mode={self.mode!r})"

    @property
    def identity(self) -> str:
        return f"http:{self.model}:mode={self.mode}:k={self.batch_size if self.mode == 'batch' else 1}" \
               f":t={self.temperature:g}:{prompts.TEMPLATE_VERSION}{self.structured_tag}"

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            limits = httpx.Limits(max_connections=self.pool.concurrency + 8,
                                  max_keepalive_connections=self.pool.concurrency + 8)
            self._client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(self.pool.timeout_s))
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _complete(self, messages: list[dict[str, str]], *, deadline: float | None,
                        schema: dict[str, Any] | None = None) -> str:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens, **self.extra_body}
        if schema is not None and "response_format" not in body:  # structured outputs (vLLM, OpenAI)
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "rubric_fast_reply", "schema": schema}}
        estimate = sum(len(m["content"]) for m in messages) // 4 + self.max_tokens
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        client = self._http()

        async def post(base_url: str) -> str:
            try:
                r = await client.post(base_url + "/chat/completions", json=body, headers=headers)
            except httpx.TimeoutException as exc:
                raise CallTimeout(f"{type(exc).__name__} from {base_url}") from None
            except httpx.TransportError as exc:  # connect errors, dropped connections, protocol errors
                raise TransportError(f"{type(exc).__name__} from {base_url}: {exc}") from None
            if r.status_code == 429:
                raise RateLimited(f"HTTP 429 from {base_url}", retry_after=_retry_after(r.headers.get("retry-after")))
            if r.status_code >= 500:
                raise ServerError(f"HTTP {r.status_code} from {base_url}",
                                  retry_after=_retry_after(r.headers.get("retry-after")))
            if r.status_code >= 400:
                raise ClientError(f"HTTP {r.status_code} from {base_url}: {r.text[:300]}")
            try:
                data = r.json()
                content = data["choices"][0]["message"].get("content") or ""
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                raise ServerError(f"malformed completion body from {base_url}") from None
            usage = data.get("usage") or {}
            self.pool.record_tokens(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                                    estimate)
            return content

        return await self.pool.call(post, tokens=estimate, deadline=deadline)
