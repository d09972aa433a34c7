"""Rule judge: grades the criteria whose ``verifier`` is ``rule`` with the checks of
:mod:`rubric_fast.rubric.rules` (re-exported here)."""

from __future__ import annotations

from rubric_fast.rubric.rules import (  # noqa: F401
    RULE_CHECKS,
    final_answer,
    last_number,
    math_equal,
    normalize_answer,
    parse_math,
    run_rule,
    validate_rule_params,
)

from .base import JudgeRequest, Verdict, strip_think


class RuleJudge:
    """Grades criteria whose ``verifier`` is ``rule``; any other criterion gets a failed verdict."""

    name = "rule"
    holistic = False

    async def grade(self, request: JudgeRequest) -> list[Verdict]:
        return self.grade_sync(request)

    def grade_sync(self, request: JudgeRequest) -> list[Verdict]:
        response = strip_think(request.response)
        out = []
        for c in request.criteria:
            if c.verifier != "rule":
                out.append(Verdict(c.id, None, "", f"rule judge cannot grade verifier {c.verifier!r}"))
                continue
            v = run_rule(response, c.verifier_params, request.reference_answer)
            v.criterion_id = c.id
            out.append(v)
        return out
