"""``rollout.engine: vllm`` config errors that need no vLLM: one line naming the key, before anything runs."""

from __future__ import annotations

import importlib.util

import pytest

from rubric_fast.cli import main
from rubric_fast.trainer.command import DEFAULT_CONFIG
from rubric_fast.trainer.config import ConfigError, load_config


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_engine_vllm_without_vllm_is_one_line_naming_the_key(tmp_path, capsys):
    assert main(["train", "rollout.engine=vllm", f"logging.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rubric-fast train: override: rollout.engine: vllm is not installed;"), err
    assert "\n" not in err and not (tmp_path / "run").exists()  # refused before the run directory is made


def test_server_mode_needs_endpoints_that_are_urls():
    with pytest.raises(ConfigError, match="rollout.vllm.endpoints: server mode needs at least one"):
        load_config(DEFAULT_CONFIG, ["rollout.engine=vllm", "rollout.vllm.mode=server"])
    with pytest.raises(ConfigError, match="rollout.vllm.endpoints: 'gpu1:8000' is not an http"):
        load_config(DEFAULT_CONFIG, ["rollout.engine=vllm", "rollout.vllm.mode=server",
                                     "rollout.vllm.endpoints=[gpu1:8000]"])
    with pytest.raises(ConfigError, match="rollout.vllm.mode: got 'remote'; accepted: colocate, server"):
        load_config(DEFAULT_CONFIG, ["rollout.engine=vllm", "rollout.vllm.mode=remote"])
    cfg = load_config(DEFAULT_CONFIG, ["rollout.engine=vllm", "rollout.vllm.mode=server",
                                       "rollout.vllm.endpoints=[http://127.0.0.1:8000]"])
    assert cfg.rollout.vllm.endpoints == ["http://127.0.0.1:8000"]
