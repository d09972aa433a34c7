"""Shared logic of the LLM judges (http, hf): prompts, modes, strict parsing with at most two re-asks.

Modes:

* ``per_criterion``: one call per criterion, reply ``{"explanation", "criteria_met"}``; a criterion with
  ``tiers`` (ordinal levels, Rubicon) is asked for a tier instead, reply ``{"explanation", "tier"}``, and its
  verdict's score is that tier's score (also in ``batch`` mode, where such criteria are asked one by one).
* ``batch``: ``batch_size`` criteria per call, reply a JSON list keyed by ``criterion_id``; ids missing or
  duplicated in the reply are re-asked one by one in per-criterion mode.
* ``holistic``: one call for all criteria, reply ``{"explanation", "rating"}`` (1-10), returned as a single
  verdict with id ``__holistic__`` whose score is the raw rating (the ``implicit_likert`` aggregator maps it).

A reply that cannot be parsed is re-asked (the bad reply and the parse error are shown to the judge) at most
``max_reasks`` times; then the verdict is ``None`` with the error. Transport failures are retried by the call
pool underneath, not here.

``structured=True`` (``judge.structured``): each call also carries the JSON schema of the reply it asks for
(``prompts.reply_schema``); the http judge sends it as ``response_format`` (vLLM's structured outputs), the hf
judge enforces it token by token (``constrained.py``). Small judges that never write the JSON unprompted then
always answer in the format; a reply that still fails to parse (cut at ``max_tokens``) is re-asked as above.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Callable

from . import prompts
from .base import HOLISTIC_ID, JudgeCallError, JudgeRequest, Verdict, strip_think

MODES = ("per_criterion", "batch", "holistic")


class ChatJudge:
    name = "chat"

    def __init__(self, *, mode: str = "per_criterion", batch_size: int = 5, max_reasks: int = 2,
                 structured: bool = False, explanation_chars: int = prompts.EXPLANATION_MAX_CHARS):
        if mode not in MODES:
            raise ValueError(f"judge mode must be one of {', '.join(MODES)}; got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.mode, self.batch_size, self.max_reasks = mode, batch_size, max_reasks
        # every call carries its reply's JSON schema, enforced by the backend (prompts.reply_schema)
        self.structured = bool(structured)
        if not isinstance(explanation_chars, int) or explanation_chars < 1:
            raise ValueError(f"explanation_chars must be an integer >= 1, got {explanation_chars!r}")
        self.explanation_chars = explanation_chars  # structured: the explanation's maxLength
        self.stats: Counter = Counter()

    @property
    def holistic(self) -> bool:
        return self.mode == "holistic"

    @property
    def identity(self) -> str:
        return f"{self.name}:mode={self.mode}:k={self.batch_size if self.mode == 'batch' else 1}{self.structured_tag}"

    @property
    def structured_tag(self) -> str:
        """Part of the cache identity: structured replies may differ from free ones."""
        if not self.structured:
            return ""
        return ":structured" + (f":e{self.explanation_chars}"
                                if self.explanation_chars != prompts.EXPLANATION_MAX_CHARS else "")

    def reply_schema(self, kind: str, **kw) -> dict[str, Any]:
        """The JSON schema of a reply of this kind, with this judge's explanation length."""
        return prompts.reply_schema(kind, max_chars=self.explanation_chars, **kw)

    async def _complete(self, messages: list[dict[str, str]], *, deadline: float | None,
                        schema: dict[str, Any] | None = None) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ asking
    async def _ask(self, messages: list[dict[str, str]], parse: Callable[[str], Any], *,
                   deadline: float | None, schema: dict[str, Any] | None = None) -> tuple[Any, str | None]:
        msgs = list(messages)
        extra = {"schema": schema} if self.structured and schema is not None else {}
        last = "no attempt"
        for attempt in range(self.max_reasks + 1):
            if attempt:
                self.stats["reasks"] += 1
            try:
                text = await self._complete(msgs, deadline=deadline, **extra)
            except JudgeCallError as exc:
                self.stats[f"call_{exc.kind}"] += 1
                return None, f"{exc.kind}: {exc}"
            text = strip_think(text or "")
            try:
                return parse(text), None
            except prompts.ParseError as exc:
                self.stats["parse_failures"] += 1
                last = str(exc)
                msgs = msgs + [{"role": "assistant", "content": text[:4000]},
                               {"role": "user", "content": prompts.REASK.format(error=last)}]
        self.stats["parse_given_up"] += 1
        return None, f"parse: {last} (after {self.max_reasks} re-asks)"

    async def _one(self, req: JudgeRequest, response: str, c) -> Verdict:
        if c.tiers:  # ordinal criterion: the verdict's score is the chosen tier's score
            msgs = prompts.tier_messages(req.prompt, response, c, req.reference_answer)
            res, err = await self._ask(msgs, lambda t: prompts.parse_tier(t, len(c.tiers)), deadline=req.deadline_s,
                                       schema=self.reply_schema("tier", n_tiers=len(c.tiers)))
            if res is None:
                return Verdict(c.id, None, "", err)
            tier, why = res
            return Verdict(c.id, float(c.tiers[tier].score), why)
        msgs = prompts.per_criterion_messages(req.prompt, response, c, req.reference_answer)
        res, err = await self._ask(msgs, prompts.parse_per_criterion, deadline=req.deadline_s,
                                   schema=self.reply_schema("verdict"))
        if res is None:
            return Verdict(c.id, None, "", err)
        met, why = res
        return Verdict(c.id, 1.0 if met else 0.0, why)

    async def _batch(self, req: JudgeRequest, response: str, chunk: list) -> list[Verdict]:
        ids = [c.id for c in chunk]
        msgs = prompts.batch_messages(req.prompt, response, chunk, req.reference_answer)
        res, err = await self._ask(msgs, lambda t: prompts.parse_batch(t, ids), deadline=req.deadline_s,
                                   schema=self.reply_schema("batch", ids=ids))
        if res is None and err is not None and not err.startswith("parse"):
            return [Verdict(i, None, "", err) for i in ids]  # the transport failed: don't hammer it per criterion
        res = res or {}
        redo = [c for c in chunk if c.id not in res]
        if redo:
            self.stats["batch_reasked_singly"] += len(redo)
        singles = await asyncio.gather(*(self._one(req, response, c) for c in redo))
        by_id = {v.criterion_id: v for v in singles}
        out = []
        for c in chunk:
            if c.id in res:
                met, why = res[c.id]
                out.append(Verdict(c.id, 1.0 if met else 0.0, why))
            else:
                out.append(by_id[c.id])
        return out

    async def _holistic(self, req: JudgeRequest, response: str) -> Verdict:
        msgs = prompts.holistic_messages(req.prompt, response, req.criteria, req.reference_answer)
        res, err = await self._ask(msgs, prompts.parse_holistic, deadline=req.deadline_s,
                                   schema=self.reply_schema("holistic"))
        if res is None:
            return Verdict(HOLISTIC_ID, None, "", err)
        rating, why = res
        return Verdict(HOLISTIC_ID, rating, why)

    async def grade(self, request: JudgeRequest) -> list[Verdict]:
        response = strip_think(request.response)
        self.stats["requests"] += 1
        if not request.criteria:
            return []
        if self.mode == "holistic":
            return [await self._holistic(request, response)]
        if self.mode == "per_criterion":
            return list(await asyncio.gather(*(self._one(request, response, c) for c in request.criteria)))
        binary = [c for c in request.criteria if not c.tiers]  # tiered criteria are asked one by one
        chunks = [binary[i:i + self.batch_size] for i in range(0, len(binary), self.batch_size)]
        parts = await asyncio.gather(*(self._batch(request, response, ch) for ch in chunks),
                                     *(self._one(request, response, c) for c in request.criteria if c.tiers))
        by_id = {v.criterion_id: v for part in parts for v in (part if isinstance(part, list) else [part])}
        return [by_id[c.id] for c in request.criteria]
