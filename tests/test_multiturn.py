"""Multi-turn rollouts: the scripted-user environment, the token layout (environment tokens masked out of the
loss), per-turn and whole-conversation judging, environment rewards, the loop and its checkpointed batches."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from methods_helpers import ScriptedEngine, per_sequence, run, scripted_engine, spy_fused_loss  # noqa: E402

from rubric_fast.trainer.config import ConfigError, load_config  # noqa: E402
from rubric_fast.trainer.models import build_char_tokenizer  # noqa: E402
from rubric_fast.trainer.multiturn import (  # noqa: E402
    EnvReply,
    MultiTurnCompletion,
    MultiTurnConfig,
    ScriptedUser,
    build_environment,
    combine_turn_rewards,
    completion_from_dict,
    environment_tokens,
    multiturn_rollout,
)

TOK = build_char_tokenizer()
PROMPT = [{"role": "user", "content": "Write e."}]


def enc(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_scripted_user_asks_the_followups_then_ends_with_a_reward():
    ep = ScriptedUser(["again.", "last."], end_reward="distinct").episode(None, 0)
    assert ep.reply("a b.") == EnvReply("again.")
    assert ep.reply("a b.") == EnvReply("last.")
    assert ep.reply("c d.") == EnvReply(None, done=True, reward=2 / 3)  # 2 distinct answers of 3
    with pytest.raises(ValueError, match="env_args.end_reward"):
        ScriptedUser(end_reward="sometimes")


def test_environment_tokens_follow_the_chat_template():
    # tiny template: each message "content\n", generation prompt ">"; the sampler already drew EOS
    msgs = PROMPT + [{"role": "assistant", "content": "see me."}]
    assert TOK.decode(environment_tokens(TOK, msgs, EnvReply("again."), ended_with_eos=True)) == "\nagain.\n>"


def test_rollout_layout_masks_and_context():
    eng = ScriptedEngine(TOK, ["one.", "two.", "three."])
    prompt = enc(TOK.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True))
    (c,) = multiturn_rollout(eng, TOK, [prompt], [PROMPT], [ScriptedUser(["more."]).episode(None, 0)], max_turns=3)
    eos = TOK.eos_token_id
    env = enc("\nmore.\n>")
    assert c.token_ids == enc("one.") + [eos] + env + enc("two.") + [eos]  # the user ended after one follow-up
    assert c.loss_mask == [1] * 5 + [0] * len(env) + [1] * 5
    assert c.turn_spans == [[0, 5], [5 + len(env), 10 + len(env)]]
    assert c.sampler_logp == [-1.0] * 5 + [0.0] * len(env) + [-1.0] * 5
    assert [m["role"] for m in c.turns] == ["assistant", "user", "assistant"] and c.finished
    assert c.text == "assistant: one.\n\nuser: more.\n\nassistant: two."
    # the second turn was generated from exactly the tokens the loss will see before it
    assert eng.calls[1] == [prompt + c.token_ids[:5 + len(env)]]
    # max_turns cuts the conversation: no environment turn after the last assistant turn
    (c1,) = multiturn_rollout(ScriptedEngine(TOK, ["x."]), TOK, [prompt], [PROMPT],
                              [ScriptedUser(["more."]).episode(None, 0)], max_turns=1)
    assert c1.loss_mask == [1] * 3 and len(c1.turn_spans) == 1


def test_completion_round_trips_through_a_checkpointed_batch():
    c = MultiTurnCompletion([1], [2, 3], [-0.5, 0.0], True, "t", loss_mask=[1, 0], turn_spans=[[0, 1]],
                            turns=[{"role": "assistant", "content": "x"}], env_reward=0.5)
    back = completion_from_dict(json.loads(json.dumps(dataclasses.asdict(c))))
    assert isinstance(back, MultiTurnCompletion) and back == c


def test_turn_rewards_combine_to_the_mean_and_a_failed_turn_is_missing():
    assert combine_turn_rewards([1.0, 0.5, 0.0]) == 0.5
    assert combine_turn_rewards([1.0, None]) is None


def test_config_refusals_name_the_key():
    with pytest.raises(ConfigError, match=r"^rollout.multiturn.environment: got 'robot'"):
        load_config(None, ["rollout.multiturn.enabled=true", "rollout.multiturn.environment=robot"])
    with pytest.raises(ConfigError, match=r"^rollout.multiturn.env_args: .*unexpected keyword"):
        load_config(None, ["rollout.multiturn.enabled=true", "rollout.multiturn.env_args={bogus: 1}"])
    with pytest.raises(ConfigError, match=r"^rollout.multiturn.max_turns: got 0"):
        load_config(None, ["rollout.multiturn.max_turns=0"])
    with pytest.raises(ConfigError, match=r"^reward.calibration.enabled: not with multi-turn rollouts"):
        load_config(None, ["rollout.multiturn.enabled=true", "reward.calibration.enabled=true"])
    with pytest.raises(ConfigError, match=r"^distributed.strategy: not with multi-turn rollouts"):
        load_config(None, ["rollout.multiturn.enabled=true", "distributed.strategy=fsdp2"])
    env = build_environment(MultiTurnConfig(environment="rubric_fast.trainer.multiturn:ScriptedUser",
                                            env_args={"followups": ["q"]}))
    assert env.followups == ["q"]


MT = ["rollout.multiturn.enabled=true", "rollout.multiturn.max_turns=2", "data.prompts_per_step=1",
      "rollout.multiturn.env_args={followups: [Another one.]}", "logging.samples_every=1", "logging.num_samples=4",
      "optimization.tokens_per_micro_batch=100000", "algorithm.drop_zero_variance_groups=false",
      "data.shuffle=false"]  # the first prompt: "Write a few words with the letter a."


@pytest.mark.parametrize("padding_free", ["false", "true"])
def test_a_training_step_judged_per_turn_with_environment_tokens_masked(tmp_path, monkeypatch, padding_free):
    # rubric: letter a, ends with '.', 2-6 words, lowercase only; each conversation: two scripted turns
    texts = ["we see the sea.", "WE SEE", "we see thee", "see me.",  # turn 1 of the 4 members: 1, .25, .5, .75
             "WE SEE", "we see the sea.", "a cat.", "we see thee"]   # turn 2: .25, 1, 1, .5
    scripted_engine(monkeypatch, texts)
    calls = spy_fused_loss(monkeypatch)
    _, rows = run(tmp_path, *MT, f"optimization.padding_free={padding_free}")
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    # the reward of a conversation is the mean of its turns' rubric rewards
    assert [s["reward"] for s in samples] == pytest.approx([(1 + 0.25) / 2, (0.25 + 1) / 2, (0.5 + 1) / 2,
                                                             (0.75 + 0.5) / 2])
    assert samples[0]["response"].startswith("assistant: we see the sea.\n\nuser: Another one.\n\nassistant: ")
    assert rows[-1]["multiturn/turns"] == 2
    (call,) = calls
    env_len = len(enc("\nAnother one.\n>"))
    for seq, w in per_sequence(call, "loss_weight").items():
        n1 = w.index(0.0)  # assistant turn 1, then the environment's tokens, then turn 2
        assert w[n1:n1 + env_len] == [0.0] * env_len and all(x == 1.0 for x in w[:n1] + w[n1 + env_len:])


def test_conversation_judging_and_environment_reward(tmp_path, monkeypatch):
    texts = ["see me.", "see me.", "see me.", "see me.", "see me.", "we see.", "see me.", "we see."]
    scripted_engine(monkeypatch, texts)
    _, rows = run(tmp_path, *MT, "rollout.multiturn.judge=conversation", "rollout.multiturn.env_reward_weight=0.5",
                  "rollout.multiturn.env_args={followups: [Again.], end_reward: distinct}")
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    # the transcript is judged: it has an 'a' and ends with '.', but it has more than 6 words and ':' and
    # capitals (not lowercase only) -> 2 of 4 = 0.5; the environment's reward: distinct answers, 1/2 or 2/2
    assert [s["reward"] for s in samples] == pytest.approx([0.5 + 0.5 * 0.5, 0.5 + 0.5 * 1.0,
                                                             0.5 + 0.5 * 0.5, 0.5 + 0.5 * 1.0])
    assert rows[-1]["multiturn/env_reward"] == pytest.approx(0.75)


def test_multiturn_with_the_hf_engine(tmp_path):
    _, rows = run(tmp_path, *MT, "rollout.max_new_tokens=4")
    assert rows[-1]["policy_version"] == 1 and 1 <= rows[-1]["multiturn/turns"] <= 2
