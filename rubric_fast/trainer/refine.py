"""Rubric-guided refinement: revisions of a group's best response mixed into the group as off-policy samples.

Bi et al. 2025, "Reward and Guidance through Rubrics: Promoting Exploration to Improve Multi-Domain
Reasoning" (RGR-GRPO, arXiv:2511.12344): rubrics give both the reward and offline guidance. When a group's
exploration falls short, the policy refines its best response with the rubric's feedback, and the refined
response joins the group's optimization as an off-policy sample (mix-policy GRPO), which widens exploration
without giving up the group baseline. Here, after a step's rewards are in:

1. a group whose best member (highest reward, first on ties) scores below ``refine.below`` and misses some
   criteria (a verdict with goodness < 0.5: a reward-if-met criterion not met, a pitfall present) is refined;
2. the policy is asked, in a chat that continues the prompt with its best response, to revise it with the
   unmet criteria listed (``refine.instruction``); its sampler log-probs are those of that refinement prompt;
3. the revision is judged against the same rubric (same judge, guard, cache and aggregation);
4. it is accepted when ``accept: improved`` and its reward beats the best member's, or always with
   ``accept: always``; an accepted revision joins the group (G + 1 members) for the advantages, and is
   trained as a response to the *original* prompt: its importance weight is the loop's truncated
   ``min(pi_old(y | prompt) / pi_refine(y | prompt, best, feedback), is_cap)``, as for any off-policy sample.

Counted per step: ``refine/attempted``, ``refine/accepted``, ``refine/acceptance_rate``, ``refine/failed``
(the revision's judgement failed: it is dropped, never given a reward), ``refine/reward_gain`` (mean of
revision reward - best reward over the accepted ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rubric_fast.settings import check_fields, setting

ACCEPT_MODES = ("improved", "always")
DEFAULT_INSTRUCTION = ("Your answer does not yet meet these criteria:\n{criteria}\n"
                       "Revise it so that it meets them, keep what is already right, and reply with the revised "
                       "answer only.")


@dataclass
class RefineConfig:
    """Rubric-guided refinement (RGR): a revision of a group's best response that misses criteria."""

    enabled: bool = setting(False, "rubric-guided refinement: revise a group's best response with its unmet criteria, as an extra sample")
    below: float = setting(1.0, "refine a group whose best reward is below this")
    accept: str = setting("improved", "keep a revision when it beats the best (improved) or always", choices=ACCEPT_MODES)
    instruction: str = setting(DEFAULT_INSTRUCTION, "the revision request; {criteria} is replaced by the unmet criteria, one \"- text\" per line")
    max_groups: int = setting(0, "at most this many refinements per step and rank (0 = no limit)",
                               check=lambda v: v >= 0, accepts="an integer >= 0 (0 = no limit)")


def check_config(c: RefineConfig, key: str = "rollout.refine") -> None:
    check_fields(c, key + ".")
    if "{criteria}" not in c.instruction:
        raise ValueError(f"{key}.instruction: must contain {{criteria}} (where the unmet criteria are listed)")


def unmet_criteria(rubric, verdicts) -> list:
    """The criteria whose verdict says the response falls short (goodness < 0.5); unjudged ones are left out."""
    by_id = {v.criterion_id: v for v in verdicts}
    out = []
    for c in rubric.criteria:
        v = by_id.get(c.id)
        if v is None or v.score is None:
            continue
        s = min(1.0, max(0.0, float(v.score)))
        good = 1.0 - s if c.polarity == "penalize_if_met" else s
        if good < 0.5:
            out.append(c)
    return out


def refinement_messages(rubric, response: str, unmet: list, instruction: str) -> list[dict[str, str]]:
    def line(c) -> str:
        return f"- avoid: {c.text}" if c.polarity == "penalize_if_met" else f"- {c.text}"

    return list(rubric.prompt) + [{"role": "assistant", "content": response},
                                  {"role": "user", "content": instruction.format(
                                      criteria="\n".join(line(c) for c in unmet))}]


def best_member(members: list) -> Any | None:
    """The first member with the highest reward (None when no member has one)."""
    best = None
    for s in members:
        if s.reward is not None and (best is None or s.reward > best.reward):
            best = s
    return best


def is_accepted(revision_reward: float | None, best_reward: float, mode: str) -> bool:
    if revision_reward is None:
        return False  # a failed judgement is missing data: the revision is dropped
    return mode == "always" or revision_reward > best_reward


def refine_groups(samples: list, cfg: RefineConfig, *, engine, tokenizer, scorer, encode_prompt,
                  policy_version: int) -> tuple[list, dict[str, float]]:
    """The accepted revisions (new samples, to be mixed into their groups) and the step's refine metrics."""
    from .batches import Sample

    groups: dict[int, list] = {}
    for s in samples:
        groups.setdefault(s.group_id, []).append(s)
    todo = []
    for gid, members in groups.items():
        best = best_member(members)
        if best is None or best.reward >= cfg.below:
            continue
        unmet = unmet_criteria(best.rubric, best.verdicts)
        if not unmet:
            continue
        todo.append((gid, best, encode_prompt(tokenizer, refinement_messages(best.rubric, best.completion.text,
                                                                              unmet, cfg.instruction))))
        if cfg.max_groups and len(todo) >= cfg.max_groups:
            break
    stats = {"refine/attempted": float(len(todo)), "refine/accepted": 0.0, "refine/failed": 0.0}
    if not todo:
        return [], stats
    revisions = [c for batch in engine.generate([p for _, _, p in todo]) for c in batch]
    scored = scorer.score_now([(f"{gid}:refine", best.rubric, c.text) for (gid, best, _), c in zip(todo, revisions)])
    accepted, gains = [], []
    for (gid, best, _), c, r in zip(todo, revisions, scored):
        if r.reward is None:
            stats["refine/failed"] += 1
        if not is_accepted(r.reward, best.reward, cfg.accept):
            continue
        s = Sample(gid, best.rubric, best.prompt_ids, c, policy_version, reward=r.reward, verdicts=r.verdicts,
                   guard_reason=r.guard_reason)
        s.extras["refined_from_reward"] = best.reward
        accepted.append(s)
        gains.append(r.reward - best.reward)
    stats["refine/accepted"] = float(len(accepted))
    stats["refine/acceptance_rate"] = len(accepted) / len(todo)
    if gains:
        stats["refine/reward_gain"] = sum(gains) / len(gains)
    return accepted, stats
