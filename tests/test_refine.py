"""Rubric-guided refinement (RGR): unmet criteria, the revision prompt, acceptance, off-policy mixing."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from methods_helpers import ScriptedEngine, per_sequence, run, scripted_engine, spy_fused_loss  # noqa: E402

from rubric_fast import ops  # noqa: E402
from rubric_fast.judges.base import Verdict  # noqa: E402
from rubric_fast.rubric import Criterion, Rubric  # noqa: E402
from rubric_fast.trainer.config import ConfigError, load_config  # noqa: E402
from rubric_fast.trainer.batches import Sample
from rubric_fast.trainer.rollouts import encode_prompt  # noqa: E402
from rubric_fast.trainer.models import build_char_tokenizer  # noqa: E402
from rubric_fast.trainer.refine import RefineConfig, refine_groups, refinement_messages, unmet_criteria  # noqa: E402
from rubric_fast.trainer.rewards import ScoredCompletion  # noqa: E402
from rubric_fast.trainer.rollout import Completion  # noqa: E402

RUB = Rubric("r", [{"role": "user", "content": "Name a fruit."}], [
    Criterion("fruit", "Names a fruit.", 2.0), Criterion("short", "Is one word."),
    Criterion("rude", "Is rude.", polarity="penalize_if_met")])


def test_unmet_criteria_and_the_revision_prompt():
    verdicts = [Verdict("fruit", 1.0), Verdict("short", 0.0), Verdict("rude", 1.0)]
    unmet = unmet_criteria(RUB, verdicts)
    assert [c.id for c in unmet] == ["short", "rude"]
    assert unmet_criteria(RUB, [Verdict("fruit", 1.0), Verdict("short", None, "", "timeout")]) == []
    msgs = refinement_messages(RUB, "an apple, dummy", unmet, RefineConfig().instruction)
    assert msgs[:2] == [RUB.prompt[0], {"role": "assistant", "content": "an apple, dummy"}]
    assert "- Is one word.\n- avoid: Is rude." in msgs[2]["content"] and msgs[2]["role"] == "user"


class FakeScorer:
    def __init__(self, rewards):
        self.rewards, self.items = rewards, []

    def score_now(self, items):
        self.items += items
        return [ScoredCompletion(None, rid, r, [], None if r is not None else "timeout: x")
                for (rid, _, _), r in zip(items, self.rewards)]


def _group(tok, rewards, texts):
    prompt = encode_prompt(tok, RUB.prompt)
    out = []
    for r, t in zip(rewards, texts):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        verdicts = [Verdict("fruit", 1.0), Verdict("short", 0.0 if " " in t else 1.0), Verdict("rude", 0.0)]
        out.append(Sample(3, RUB, prompt, Completion(prompt, ids, [-1.0] * len(ids), True, t), 0, reward=r,
                          verdicts=verdicts))
    return out


def test_refine_groups_accepts_improvements_only_and_trains_on_the_original_prompt():
    tok = build_char_tokenizer()
    members = _group(tok, [0.2, 0.6, 0.6], ["a b", "an apple", "a pear"])
    eng = ScriptedEngine(tok, ["apple"])
    acc, st = refine_groups(members, RefineConfig(enabled=True), engine=eng, tokenizer=tok,
                            scorer=FakeScorer([1.0]), encode_prompt=encode_prompt, policy_version=7)
    (rev,) = acc
    # the first best member (0.6, "an apple") was revised; the revision prompt shows it and its unmet criterion
    refine_prompt = eng.calls[0][0]
    assert "an apple" in tok.decode(refine_prompt) and "Is one word." in tok.decode(refine_prompt)
    assert rev.prompt_ids == members[0].prompt_ids and rev.completion.prompt_ids == refine_prompt
    assert rev.group_id == 3 and rev.reward == 1.0 and rev.policy_version == 7
    assert st == {"refine/attempted": 1.0, "refine/accepted": 1.0, "refine/failed": 0.0,
                  "refine/acceptance_rate": 1.0, "refine/reward_gain": pytest.approx(0.4)}
    # not better than the best: rejected; a failed judgement: dropped and counted, never a reward
    for rewards, failed in (([0.6], 0.0), ([None], 1.0)):
        acc, st = refine_groups(members, RefineConfig(enabled=True), engine=ScriptedEngine(tok, ["x"]), tokenizer=tok,
                                scorer=FakeScorer(rewards), encode_prompt=encode_prompt, policy_version=0)
        assert acc == [] and st["refine/acceptance_rate"] == 0.0 and st["refine/failed"] == failed
    # "always" keeps a worse revision; a best at or above "below" is not refined
    acc, _ = refine_groups(members, RefineConfig(enabled=True, accept="always"), engine=ScriptedEngine(tok, ["x"]),
                           tokenizer=tok, scorer=FakeScorer([0.1]), encode_prompt=encode_prompt, policy_version=0)
    assert len(acc) == 1
    acc, st = refine_groups(members, RefineConfig(enabled=True, below=0.5), engine=ScriptedEngine(tok, ["x"]),
                            tokenizer=tok, scorer=FakeScorer([1.0]), encode_prompt=encode_prompt, policy_version=0)
    assert acc == [] and st["refine/attempted"] == 0


def test_config_refusals_name_the_key():
    with pytest.raises(ConfigError, match=r"^algorithm.is_cap: not with rubric-guided refinement"):
        load_config(None, ["rollout.refine.enabled=true", "algorithm.is_cap=null"])
    with pytest.raises(ConfigError, match=r"^reward.pairwise.enabled: not with rubric-guided refinement"):
        load_config(None, ["rollout.refine.enabled=true", "reward.pairwise.enabled=true"])
    with pytest.raises(ConfigError, match=r"^rollout.refine.instruction: must contain \{criteria\}"):
        load_config(None, ["rollout.refine.instruction=do better"])
    with pytest.raises(ConfigError, match=r"^rollout.refine.accept: got 'maybe'"):
        load_config(None, ["rollout.refine.accept=maybe"])


def test_an_accepted_revision_joins_its_group_in_a_training_step(tmp_path, monkeypatch):
    # rubric: letter a, '.', 2-6 words, lowercase. Members 0.25, 0.5, 0.25, 0.25; the best ("we see thee")
    # misses the letter and the period; its revision "a red cat." meets all four criteria
    made = scripted_engine(monkeypatch, ["WE SEE", "we see thee", "WE SEE", "WE SEE", "a red cat."])
    calls = spy_fused_loss(monkeypatch)
    _, rows = run(tmp_path, "rollout.refine.enabled=true", "data.prompts_per_step=1", "data.shuffle=false",
                  "optimization.tokens_per_micro_batch=100000")
    assert rows[-1]["refine/attempted"] == 1 and rows[-1]["refine/accepted"] == 1
    assert rows[-1]["refine/reward_gain"] == pytest.approx(0.5)
    assert rows[-1]["reward"] == pytest.approx(0.3125)  # the logged reward: on-policy samples only
    eng = made["engine"]
    assert len(eng.calls) == 2 and "we see thee" in eng.tok.decode(eng.calls[1][0])
    # advantages over the group of five
    adv, _ = ops.group_advantages(torch.tensor([0.25, 0.5, 0.25, 0.25, 1.0]), torch.zeros(5, dtype=torch.long))
    (call,) = calls
    got = sorted(vals[0] for vals in per_sequence(call).values())
    assert got == pytest.approx(sorted(adv.tolist()), abs=1e-6)
