"""Pairwise judges: which of two responses to the same prompt is better against the rubric.

``compare(rubric, response_a, response_b, deadline=None) -> PairVerdict`` with ``winner`` "A", "B", "tie", or
None when the judgement failed (``error`` says why). A judge never turns a failure into a loss; the caller
(rubric_fast.trainer.pairwise_scorer) asks both orders and keeps only order-consistent answers.

* :class:`RulePairwiseJudge`: every criterion graded by the rule judge; hard rules are gates (a response that
  breaks one loses to one that keeps them all; both breaking one is a tie), then the weighted goodness of the
  other criteria decides (equal: tie). Deterministic and order-independent; for tests and rule-only data.
* :class:`ChatPairwiseJudge`: any :class:`~rubric_fast.judges.chat.ChatJudge` (http, hf) asked with
  :func:`rubric_fast.judges.prompts.pairwise_messages` (OpenRubrics: hard rules as gates, principles as
  preferences), parsed strictly, re-asked at most ``max_reasks`` times, transport retries in its pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import prompts
from .base import JudgeRequest, Verdict, strip_think
from .rule import RuleJudge


@dataclass
class PairVerdict:
    winner: str | None        # "A" | "B" | "tie" | None (failed)
    reason: str = ""
    error: str | None = None


def _goodness(c, v: Verdict) -> float:
    s = min(1.0, max(0.0, float(v.score)))
    return 1.0 - s if c.polarity == "penalize_if_met" else s


class RulePairwiseJudge:
    name = "rule_pairwise"

    def __init__(self):
        self.rule = RuleJudge()

    def grade(self, rubric, response: str) -> list[Verdict]:
        """The pointwise rule verdicts of one response (also what the trainer logs as pass rates)."""
        return self.rule.grade_sync(JudgeRequest("pairwise", rubric.prompt, response, rubric.criteria,
                                                 rubric.reference_answer))

    def _standing(self, rubric, response: str) -> tuple[bool, float] | None:
        verdicts = {v.criterion_id: v for v in self.grade(rubric, response)}
        gates_ok, score = True, 0.0
        for c in rubric.criteria:
            v = verdicts.get(c.id)
            if v is None or v.score is None:
                return None
            if c.kind == "hard_rule":
                gates_ok = gates_ok and _goodness(c, v) >= 0.5
            else:
                score += c.weight * _goodness(c, v)
        return gates_ok, score

    async def compare(self, rubric, response_a: str, response_b: str, deadline: float | None = None) -> PairVerdict:
        a, b = self._standing(rubric, response_a), self._standing(rubric, response_b)
        if a is None or b is None:
            return PairVerdict(None, "", "rule judge: a criterion could not be graded by rules")
        if a[0] != b[0]:
            return PairVerdict("A" if a[0] else "B", "only one response keeps every hard rule")
        if not a[0]:
            return PairVerdict("tie", "both responses break a hard rule")
        if abs(a[1] - b[1]) <= 1e-9:
            return PairVerdict("tie", f"equal weighted score {a[1]:g}")
        return PairVerdict("A" if a[1] > b[1] else "B", f"weighted score {a[1]:g} vs {b[1]:g}")


class ChatPairwiseJudge:
    """A chat judge (http, hf) asked the pairwise prompt."""

    def __init__(self, chat_judge):
        self.chat = chat_judge
        self.name = f"{getattr(chat_judge, 'name', 'chat')}_pairwise"

    async def compare(self, rubric, response_a: str, response_b: str, deadline: float | None = None) -> PairVerdict:
        msgs = prompts.pairwise_messages(rubric.prompt, strip_think(response_a), strip_think(response_b),
                                         rubric.criteria, rubric.reference_answer)
        res, err = await self.chat._ask(msgs, prompts.parse_pairwise, deadline=deadline,
                                        schema=self.chat.reply_schema("pairwise"))
        if res is None:
            return PairVerdict(None, "", err)
        winner, why = res
        return PairVerdict(winner, why)

    async def aclose(self) -> None:
        close = getattr(self.chat, "aclose", None)
        if close is not None:
            await close()
