"""Judge audit: canary requests mixed into the judge traffic measure how often each endpoint is fooled.

With probability ``scoring.audit_rate`` per scored rollout, the scorer also sends the judge one canary for
the same rubric, never touching any reward, group or cache:

* a **content-free** response (a known master key such as "Let's solve this problem step by step.", or the
  prompt repeated back with "Answer:") against the rubric's model-judged reward-if-met criteria: every
  "met" is a *false pass*;
* where the rubric has a reference answer, that **reference answer** against the same criteria: every
  "not met" is a *false fail* (reported; a reference may legitimately miss a criterion, so it never stops
  the run).

Canaries bypass the guard and the verdict cache, and go round-robin to each endpoint of the judge (pinned
through :data:`rubric_fast.scoring.pool.PINNED_ENDPOINT`), so the rates are per endpoint. Once an endpoint
has ``audit_min_samples`` canary verdicts and its false-pass rate passes ``audit_max_false_pass``, it is
drained (no more traffic) when other endpoints remain, else the run stops with a :class:`ScoringError`
that says what the judge did.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections import Counter
from typing import Any

from rubric_fast.judges.base import HOLISTIC_ID, JudgeRequest

from .pool import PINNED_ENDPOINT

# content-free responses every judge must find wanting (the guard would catch each; canaries skip it)
CANARY_JUNK = (
    "Let's solve this problem step by step.", "Thought process:", "Solution", "Sure! Let's begin.",
    "Here is my answer:", "Okay.", "The answer", "解", "Respuesta", ":", "Let me think about this carefully.",
)
LOCAL = "local"


def endpoint_label(url: str) -> str:
    """A metric-friendly name for an endpoint: the URL without its scheme."""
    return url.split("://", 1)[-1].rstrip("/") or url


class JudgeAudit:
    def __init__(self, judge, *, rate: float, max_false_pass: float, min_samples: int, seed: int,
                 deadline_s: float, judges: list):
        self.judge, self.rate, self.max_false_pass = judge, rate, max_false_pass
        self.min_samples, self.deadline_s = min_samples, deadline_s
        self.rng = random.Random(seed)  # its own stream: the training RNG is never touched
        self.pools = [j.pool for j in judges if getattr(j, "pool", None) is not None]
        self.endpoints = [e.url for p in self.pools for e in p.endpoints] or [LOCAL]
        self.stats: dict[str, Counter] = {e: Counter() for e in self.endpoints}
        self.drained: set[str] = set()
        self.tasks: set[asyncio.Task] = set()
        self.fatal: Exception | None = None
        self._rr = 0

    # ------------------------------------------------------------------------------------------ sending
    def maybe_send(self, rubric) -> None:
        """Called once per scored rollout (in the event loop): send a canary with probability ``rate``."""
        if self.rate <= 0 or self.fatal is not None or self.rng.random() >= self.rate:
            return
        criteria = [c for c in rubric.criteria if c.verifier != "rule" and c.polarity == "reward_if_met"]
        if not criteria:
            return
        live = [e for e in self.endpoints if e not in self.drained]
        if not live:
            return
        endpoint = live[self._rr % len(live)]
        self._rr += 1
        if rubric.reference_answer and self.rng.random() < 0.5:
            kind, response = "reference", str(rubric.reference_answer)
        else:
            junk = list(CANARY_JUNK) + [rubric.prompt_text + "\nAnswer:"]
            kind, response = "junk", self.rng.choice(junk)
        task = asyncio.get_running_loop().create_task(self._send(rubric, criteria, kind, response, endpoint))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, rubric, criteria, kind: str, response: str, endpoint: str) -> None:
        import time

        req = JudgeRequest(f"canary:{kind}:{self._rr}", rubric.prompt, response, criteria, rubric.reference_answer,
                           time.monotonic() + self.deadline_s, {"canary": kind})
        token = PINNED_ENDPOINT.set(None if endpoint == LOCAL else endpoint)
        st = self.stats[endpoint]
        try:
            verdicts = await asyncio.wait_for(self.judge.grade(req), self.deadline_s + 1.0)
        except Exception:  # noqa: BLE001 - a failed canary says nothing about gullibility
            st["errors"] += 1
            return
        finally:
            PINNED_ENDPOINT.reset(token)
        agg = rubric.aggregation
        for v in verdicts:
            if v.score is None or v.guarded:
                st["errors"] += v.score is None
                continue
            if v.criterion_id == HOLISTIC_ID:
                met = (v.score - agg.likert_min) / (agg.likert_max - agg.likert_min) >= 0.5
            else:
                met = v.score >= 0.5
            if kind == "junk":
                st["junk"] += 1
                st["false_pass"] += met
            else:
                st["reference"] += 1
                st["false_fail"] += not met
        self._check(endpoint)

    # ------------------------------------------------------------------------------------------ deciding
    def _check(self, endpoint: str) -> None:
        st = self.stats[endpoint]
        if endpoint in self.drained or st["junk"] < self.min_samples:
            return
        rate = st["false_pass"] / st["junk"]
        if rate <= self.max_false_pass:
            return
        what = (f"judge audit: endpoint {endpoint} judged {st['false_pass']} of {st['junk']} criteria of "
                f"content-free canary responses ('{CANARY_JUNK[0]}', the prompt repeated back, ...) as met: "
                f"false-pass rate {rate:.0%} > scoring.audit_max_false_pass={self.max_false_pass:g}")
        others = [e for e in self.endpoints if e != endpoint and e not in self.drained]
        if others:
            self.drained.add(endpoint)
            for pool in self.pools:
                pool.drain(endpoint)
            print(f"[rubric_fast] {what}; drained it, judging continues on {', '.join(others)}", file=sys.stderr)
            return
        from .scorer import ScoringError

        self.fatal = ScoringError(f"{what}; no trustworthy endpoint is left. Rewards from this judge would pay "
                                  "for empty answers: check the judge model and its prompt, or (knowingly) raise "
                                  "scoring.audit_max_false_pass or set scoring.audit_rate=0")

    # ------------------------------------------------------------------------------------------ reporting
    def metrics(self) -> dict[str, Any]:
        per: dict[str, dict[str, float]] = {}
        junk = fp = ref = ff = 0
        for e, st in self.stats.items():
            junk, fp, ref, ff = junk + st["junk"], fp + st["false_pass"], ref + st["reference"], ff + st["false_fail"]
            per[endpoint_label(e)] = {
                "canary_verdicts": float(st["junk"] + st["reference"]),
                "false_pass_rate": st["false_pass"] / st["junk"] if st["junk"] else None,
                "false_fail_rate": st["false_fail"] / st["reference"] if st["reference"] else None,
                "errors": float(st["errors"]), "drained": float(e in self.drained)}
        return {"audit": per, "audit_canary_verdicts": junk + ref,
                "audit_false_pass_rate": fp / junk if junk else None,
                "audit_false_fail_rate": ff / ref if ref else None,
                "audit_drained": sorted(endpoint_label(e) for e in self.drained)}

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    async def aclose(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*list(self.tasks), return_exceptions=True)
