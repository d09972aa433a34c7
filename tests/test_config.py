"""Config loading: YAML + key=value overrides, validation messages that name the key."""

from __future__ import annotations

import pytest

from rubric_fast.trainer.command import DEFAULT_CONFIG
from rubric_fast.trainer.config import (ConfigError, TrainConfig, config_to_dict, load_config, parse_override,
                                        policy_loss_config)


def test_default_config_loads_and_points_at_shipped_dataset():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.model.name_or_path == "tiny"
    assert cfg.rollout.num_generations == 8
    assert cfg.data.path.endswith("default_rubrics.jsonl")
    from pathlib import Path

    assert Path(cfg.data.path).exists()
    d = config_to_dict(cfg)
    assert d["algorithm"]["policy_loss"]["loss"] == "ppo_clip" and d["optimization"]["lr"] == pytest.approx(3e-3)


def test_overrides_are_yaml_scalars_and_dotted():
    cfg = load_config(None, ["optimization.lr=1e-5", "rollout.overlap=false", "algorithm.scale=null",
                             "model.lora.target_modules=[q_proj, v_proj]", "max_steps=7", "algorithm.policy_loss.delta=3",
                             "judge.type=http", "judge.model=gpt-x", "judge.endpoints=[http://127.0.0.1:8000/v1]",
                             "judge.temperature=0"])
    assert cfg.optimization.lr == 1e-5 and isinstance(cfg.optimization.lr, float)
    assert cfg.rollout.overlap is False
    assert cfg.algorithm.scale is None
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.max_steps == 7
    assert cfg.algorithm.policy_loss.delta == 3.0 and isinstance(cfg.algorithm.policy_loss.delta, float)
    assert cfg.judge.to_dict() == {"type": "http", "guard": True, "model": "gpt-x",
                                   "endpoints": ["http://127.0.0.1:8000/v1"], "temperature": 0.0}


def test_judge_section_is_typed(tmp_path):
    # a key of another judge type, an unknown key, a bad value: one error naming the key
    with pytest.raises(ConfigError, match=r"judge\.endpoints: not a key of the hf judge \(it is for: http\)"):
        load_config(None, ["judge.type=hf", "judge.model=m", "judge.endpoints=[http://x/v1]"])
    with pytest.raises(ConfigError, match=r"unknown key 'judge\.temprature'.*did you mean 'temperature'"):
        load_config(None, ["judge.temprature=0"])
    with pytest.raises(ConfigError, match=r"judge\.max_reasks: got -1; expected an integer >= 0"):
        load_config(None, ["judge.type=http", "judge.max_reasks=-1"])
    with pytest.raises(ConfigError, match=r"judge\.mode: got 'fast'; accepted: null, per_criterion, batch"):
        load_config(None, ["judge.type=hf", "judge.mode=fast"])
    with pytest.raises(ConfigError, match=r"scoring\.audit_rate: got 2\.0; expected a number in \[0, 1\]"):
        load_config(None, ["scoring.audit_rate=2"])
    # a file's hf judge, then another judge type on the command line: the hf keys do not carry over
    base = tmp_path / "hf.yaml"
    base.write_text("judge: {type: hf, model: m, gguf_file: auto, criteria_per_call: 3, structured: true}\n")
    cfg = load_config(base, ["judge={endpoints: ['http://127.0.0.1:8000/v1'], model: s, type: http}"])
    assert cfg.judge.to_dict() == {"type": "http", "guard": True, "model": "s", "endpoints": ["http://127.0.0.1:8000/v1"]}
    cfg = load_config(base, ["judge.type=rule"])
    assert cfg.judge.to_dict() == {"type": "rule", "guard": True}
    cfg = load_config(base, ["judge.max_new_tokens=9"])  # the same type: keys add up
    assert cfg.judge.to_dict()["criteria_per_call"] == 3 and cfg.judge.max_new_tokens == 9
    cfg = load_config(None, ["scoring.guard.check_echo=false"])  # a mapping-valued key, key by key
    assert cfg.scoring.guard == {"check_echo": False}


def test_policy_loss_section_embeds_the_ops_config(caplog):
    from rubric_fast.reference.types import PolicyLossConfig

    cfg = load_config(None, ["algorithm.policy_loss.loss=cispo", "algorithm.policy_loss.eps_high=0.28"])
    assert isinstance(cfg.algorithm.policy_loss, PolicyLossConfig)
    assert policy_loss_config(cfg, normalizer=12.0) == PolicyLossConfig(loss="cispo", eps_high=0.28, normalizer=12.0)
    # the older flat keys are still read, into the section
    with caplog.at_level("WARNING", logger="rubric_fast"):
        old = load_config(None, ["algorithm.loss=cispo", "algorithm.eps_high=0.28"])
    assert old.algorithm.policy_loss == cfg.algorithm.policy_loss
    moved = [r.getMessage() for r in caplog.records if "algorithm.policy_loss" in r.getMessage()]
    assert moved == ["override: algorithm.loss, algorithm.eps_high: now under algorithm.policy_loss (e.g. "
                     "algorithm.policy_loss.loss); please move them"]
    # the normalizer is the loop's, per optimizer step
    with pytest.raises(ConfigError, match=r"algorithm\.policy_loss\.normalizer: not a setting"):
        load_config(None, ["algorithm.policy_loss.normalizer=3"])
    with pytest.raises(ConfigError, match=r"algorithm\.policy_loss\.loss: got 'ppo'; accepted: ppo_clip, cispo"):
        load_config(None, ["algorithm.policy_loss.loss=ppo"])


def test_help_config_lists_every_setting_once():
    from rubric_fast.settings import describe
    from rubric_fast.trainer.config import TrainConfig, help_config

    docs = list(describe(TrainConfig))
    keys = [d.key for d in docs if not d.section]
    assert len(keys) == len(set(keys)) > 150
    missing = [d.key for d in docs if not d.help]
    assert not missing, f"settings without help: {missing}"
    text = help_config()
    for key in ("algorithm.policy_loss.eps_high", "judge.structured", "scoring.audit_rate", "rollout.temperature",
                "eval.every"):
        assert key in text
    assert "normalizer" not in text  # internal
    loss = next(d for d in docs if d.key == "algorithm.policy_loss.loss")
    assert (loss.type, loss.default, loss.accepts) == ("str", "ppo_clip", "ppo_clip, cispo, sapo, gspo")
    assert help_config("judge").lstrip().startswith("judge")


def test_unknown_key_names_key_and_close_matches():
    with pytest.raises(ConfigError, match=r"unknown key 'optimization.lrr'.*did you mean 'lr'"):
        load_config(None, ["optimization.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'algorithim'.*'algorithm'"):
        load_config(None, ["algorithim.loss=cispo"])


def test_bad_choice_lists_accepted_values():
    with pytest.raises(ConfigError, match=r"algorithm.policy_loss.loss: got 'ppo'; accepted: ppo_clip, cispo, sapo, gspo"):
        load_config(None, ["algorithm.policy_loss.loss=ppo"])
    with pytest.raises(ConfigError, match=r"algorithm.estimator: got 'gae'.*grpo"):
        load_config(None, ["algorithm.estimator=gae"])


def test_bad_type_and_range_name_the_key():
    with pytest.raises(ConfigError, match=r"rollout.num_generations: expected an integer, got 'many'"):
        load_config(None, ["rollout.num_generations=many"])
    with pytest.raises(ConfigError, match=r"rollout.num_generations: got 1; expected an integer >= 2"):
        load_config(None, ["rollout.num_generations=1"])
    with pytest.raises(ConfigError, match=r"rollout.top_p"):
        load_config(None, ["rollout.top_p=1.5"])
    with pytest.raises(ConfigError, match=r"algorithm.policy_loss.eps_low"):
        load_config(None, ["algorithm.policy_loss.eps_low=1.5"])
    with pytest.raises(ConfigError, match=r"key=value"):
        parse_override("optimization.lr")


def test_yaml_file_errors_name_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name_or_path: tiny\nrollout:\n  temperatur: 0.7\n")
    with pytest.raises(ConfigError, match=r"c.yaml:4: unknown key 'rollout.temperatur'.*'temperature'"):
        load_config(p)
    p.write_text("model:\n  name_or_path: [tiny\nrollout: {}\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: invalid YAML"):
        load_config(p)
    p.write_text("rollout:\n  max_new_tokens: lots\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: rollout.max_new_tokens: expected an integer"):
        load_config(p)
    # values checked after loading (ranges, choices) also name the file and line, or the override
    p.write_text("seed: 1\noptimization:\n  warmup_steps: 2\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"c.yaml:4: optimization.lr: got -1.0; expected a number > 0"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"^override: optimization.lr: got -2.0"):
        load_config(p, ["optimization.lr=-2"])
    p.write_text("algorithm: {loss: nope}\n")
    with pytest.raises(ConfigError, match=r"c.yaml:1: algorithm.policy_loss.loss: got 'nope'; accepted: "):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="algorithm.scale"):
        load_config(None, ["algorithm.estimator=dr_grpo", "algorithm.scale=group"])
    with pytest.raises(ConfigError, match="algorithm.reference: lora_base needs model.lora.enabled"):
        load_config(None, ["algorithm.reference=lora_base", "algorithm.policy_loss.beta=0.1"])
    cfg = load_config(None, ["algorithm.policy_loss.aggregation=constant"])  # normalizer is set by the loop per step
    assert cfg.algorithm.policy_loss.aggregation == "constant"


def test_config_file_relative_dataset_path(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  path: d.jsonl\n")
    assert load_config(p).data.path == str(tmp_path / "d.jsonl")


def test_defaults_are_valid():
    from rubric_fast.trainer.config import validate

    validate(TrainConfig())


def test_every_example_config_loads():
    from pathlib import Path

    examples = sorted((Path(DEFAULT_CONFIG).parent).glob("*.yaml"))
    assert len(examples) >= 2
    for p in examples:
        cfg = load_config(p)
        assert cfg.max_steps >= 1, p


def test_help_config_command(capsys):
    from rubric_fast.cli import main

    assert main(["train", "--help-config", "algorithm.policy_loss"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("algorithm.policy_loss:") and "algorithm.policy_loss.eps_high (float) = 0.2" in out
    assert "algorithm.estimator" not in out  # only the section asked for
    assert main(["train", "--help-config", "algorithm.polcy_loss"]) == 2
    assert "no config key or section 'algorithm.polcy_loss'" in capsys.readouterr().err
