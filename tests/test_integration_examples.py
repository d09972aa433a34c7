"""The integration examples (examples/integrations/*.py) run end to end, small and offline.

The three scripts run in parallel subprocesses (each pays its own torch / transformers / TRL import).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "integrations"


def test_integration_examples_run(tmp_path):
    pytest.importorskip("transformers")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    runs = {
        "custom_loop": [str(EX / "custom_loop.py"), "--steps", "2", "--group-size", "2", "--max-new-tokens", "6"],
        "verl": [str(EX / "verl_reward.py"), "--out", str(tmp_path / "verl.parquet")],
    }
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401

        runs["trl"] = [str(EX / "trl_grpo.py"), "--max-steps", "2", "--batch-size", "4", "--num-generations", "2",
                       "--max-completion-length", "6", "--output-dir", str(tmp_path / "trl")]
    except ImportError:
        pass
    procs = {name: subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name, cmd in runs.items()}
    failures = []
    for name, p in procs.items():
        out, _ = p.communicate(timeout=240)
        if p.returncode != 0 or f"{name.split('_')[0]}" not in out or ": ok" not in out:
            failures.append(f"--- {name} (rc {p.returncode}) ---\n{out[-3000:]}")
    assert not failures, "\n".join(failures)
    assert (tmp_path / "verl.parquet").exists()
