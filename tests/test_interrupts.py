"""Interrupts: a real `rubric-fast train` subprocess gets SIGINT / SIGTERM mid-run, finishes its step, writes a
checkpoint, prints one line (no traceback) and exits 130 / 143; the run then resumes from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = ["data.prompts_per_step=2", "rollout.num_generations=4", "rollout.max_new_tokens=8",
        "model.tiny.hidden_size=32", "model.tiny.intermediate_size=48", "logging.tensorboard=false",
        "logging.progress=false", "logging.samples_every=1"]


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rubric_fast", "train", *ARGS, f"logging.run_dir={run_dir}", *extra]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for_step(proc: subprocess.Popen, step: int, lines: list[str], limit_s: float = 180.0) -> None:
    """Read stderr until the console shows `step N/` (a safety limit, not a timing assertion)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith((f"step {step}/", f"step {step} ")):
            return
    proc.kill()
    raise AssertionError("the run never reached step %d:\n%s" % (step, "".join(lines[-30:])))


def steps(path: Path) -> list[int]:
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("sig,code,name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_signal_finishes_the_step_checkpoints_and_resumes(tmp_path, sig, code, name):
    run = tmp_path / "run"
    proc = start(run, "max_steps=500")
    lines: list[str] = []
    wait_for_step(proc, 2, lines)
    proc.send_signal(sig)
    rest = proc.stderr.read()
    rc = proc.wait(timeout=120)
    err = "".join(lines) + rest
    assert rc == code, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    final = [x for x in err.splitlines() if x.startswith(f"rubric-fast train: interrupted by {name}")]
    assert len(final) == 1 and err.rstrip().splitlines()[-1] == final[0]
    assert "continue with checkpoint.resume=auto" in final[0]
    # the checkpoint is the last logged step; nothing after it was logged
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and (ckpts[0] / "manifest.json").exists()
    stopped_at = int(ckpts[0].name.split("_")[1])
    assert str(ckpts[0]) in final[0] and f"after step {stopped_at}" in final[0]
    assert stopped_at >= 2 and steps(run / "metrics.jsonl") == list(range(1, stopped_at + 1))
    # resume: the run continues from the checkpoint to the end, each step logged once
    done = subprocess.run([sys.executable, "-m", "rubric_fast", "train", *ARGS, f"logging.run_dir={run}",
                           f"max_steps={stopped_at + 2}", "checkpoint.resume=auto"],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {ckpts[0]} at step {stopped_at}" in done.stderr
    assert steps(run / "metrics.jsonl") == list(range(1, stopped_at + 3))


def test_a_second_sigint_exits_at_once(tmp_path):
    run = tmp_path / "run"
    # a slow step: many long completions, so the second signal arrives while the first step is still running
    proc = start(run, "max_steps=500", "rollout.max_new_tokens=64", "data.prompts_per_step=8",
                 "rollout.num_generations=16")
    lines: list[str] = []
    wait_for_step(proc, 1, lines)
    proc.send_signal(signal.SIGINT)
    while True:  # the notice that step 2 is being finished
        line = proc.stderr.readline()
        lines.append(line)
        if not line or "SIGINT: finishing" in line or line.startswith("rubric-fast train: interrupted"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    rc = proc.wait(timeout=120)
    err = "".join(lines) + rest
    assert rc == 130 and "Traceback" not in err
    # the second SIGINT ends the process while the first step is still running: no checkpoint, no step logged
    assert "second SIGINT: exiting now" in err and "interrupted by SIGINT after step" not in err
    assert not list(run.glob("checkpoints/step_*"))
    assert not any(x.startswith(("step 2/", "step 2 ")) for x in err.splitlines())


def test_interrupt_before_the_first_step_exits_130_with_one_line(tmp_path):
    from rubric_fast.trainer import interrupt

    sigs = interrupt.StopSignals()
    assert sigs.install()
    try:
        with pytest.raises(interrupt.Interrupted) as info:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises before this returns
        assert info.value.exit_code == 130 and info.value.checkpoint is None
    finally:
        sigs.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_python_dash_m_rubric_fast_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "rubric_fast", "--help"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0 and "train" in out.stdout and "score" in out.stdout
