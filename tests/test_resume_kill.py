"""Kill and resume under torchrun (2 CPU ranks, gloo): SIGKILL mid-step, resume, same weights bitwise.

Each run is ``torchrun --nproc_per_node 2 <driver> train ...``; the driver wraps the judge so that every
verdict that reaches it is appended to a log (one line per criterion, flushed at once, so it survives the
SIGKILL). The kill comes from the trainer's test hook ``RUBRIC_FAST_TEST_KILL=PHASE:STEP:RANK``, which
SIGKILLs that rank at a precise point; torchrun then tears the job down, as a scheduler would.
Checks: the resumed run ends with the final weights of the uninterrupted one (torch.equal, every tensor);
no verdict requested before the kill is requested again (the judge cache answers), and the judge saw
exactly as many verdict requests in total as the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from procs import free_port

ARGS = ["max_steps=6", "data.prompts_per_step=2", "rollout.num_generations=4", "rollout.max_new_tokens=8",
        "model.tiny.hidden_size=32", "model.tiny.intermediate_size=48", "optimization.lr=1e-2",
        "optimization.schedule=linear", "algorithm.drop_zero_variance_groups=false", "rollout.overlap=false",
        "checkpoint.every=2", "checkpoint.keep_last=3", "checkpoint.resume=auto", "logging.tensorboard=false",
        "logging.progress=false", "logging.samples_every=0"]
# 8 prompts in the default dataset, 2 per step: the stream wraps into epoch 1 while generating step 5

DRIVER = '''
import json, os, sys
import rubric_fast.scoring.config as C
from rubric_fast.judges import CountingJudge

real = C.build_judge
log = open(os.environ["JUDGE_LOG"] + ".rank" + os.environ.get("RANK", "0"), "a", buffering=1)

class LoggingJudge(CountingJudge):
    async def grade(self, request):
        for c in request.criteria:
            log.write(json.dumps([request.prompt, request.response, c.id]) + "\\n")
        return await super().grade(request)

C.build_judge = lambda *a, **k: LoggingJudge(real(*a, **k))
from rubric_fast.cli import main
sys.exit(main(sys.argv[1:]))
'''


def torchrun(tmp_path: Path, run: str, tag: str, *extra: str, kill: str | None = None) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "JUDGE_LOG": str(tmp_path / f"judge_{tag}")}
    env.pop("RUBRIC_FAST_TEST_KILL", None)
    if kill:
        env["RUBRIC_FAST_TEST_KILL"] = kill
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(driver), "train", *ARGS, f"logging.run_dir={tmp_path / run}",
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)


def judge_log(tmp_path: Path, tag: str) -> Counter:
    out: Counter = Counter()
    for f in tmp_path.glob(f"judge_{tag}.rank*"):
        for line in f.read_text().splitlines():
            out[line] += 1
    return out


def final_weights(tmp_path: Path, run: str, step: int = 6) -> dict[str, torch.Tensor]:
    ck = tmp_path / run / "checkpoints" / f"step_{step:08d}"
    state = torch.load(ck / "state.pt", weights_only=True)
    if "model" in state:
        return state["model"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # fsdp2: gather the shards

    dcp_to_torch_save(ck / "sharded", tmp_path / f"{run}_full.pt")
    return torch.load(tmp_path / f"{run}_full.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, t in a.items():
        assert torch.equal(t, b[k]), f"{k}: max diff {float((t - b[k]).abs().max())}"


def kill_and_resume(tmp_path: Path, run: str, kill: str, *extra: str):
    killed = torchrun(tmp_path, run, f"{run}_killed", *extra, kill=kill)
    assert killed.returncode != 0 and "test hook: SIGKILL" in killed.stderr, killed.stderr[-3000:]
    resumed = torchrun(tmp_path, run, f"{run}_resumed", *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return killed, resumed


def check_judge_calls(tmp_path: Path, run: str, straight: Counter, *, replayed_step_was_scored: bool) -> None:
    before, after = judge_log(tmp_path, f"{run}_killed"), judge_log(tmp_path, f"{run}_resumed")
    assert before and after
    assert not set(before) & set(after), "verdicts paid for before the kill were requested again"
    assert sum(before.values()) + sum(after.values()) == sum(straight.values())
    rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6
    if replayed_step_was_scored:  # rank 0's scorer served the replayed step from the cache
        assert rows[-1]["judge/cache_hits"] > 0


@pytest.fixture(scope="module")
def straight_ddp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    proc = torchrun(tmp, "straight", "straight")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, final_weights(tmp, "straight"), judge_log(tmp, "straight")


def test_sigkill_mid_step_then_resume_is_bitwise_exact(straight_ddp):
    tmp, weights, calls = straight_ddp
    # rank 1 dies right after its first backward of step 3: step 2 is the newest checkpoint
    kill_and_resume(tmp, "mid", "backward:3:1")
    assert_same_weights(final_weights(tmp, "mid"), weights)
    check_judge_calls(tmp, "mid", calls, replayed_step_was_scored=True)


def test_sigkill_at_epoch_boundary_then_resume_is_bitwise_exact(straight_ddp):
    tmp, weights, calls = straight_ddp
    # rank 0 dies just after the prompt stream wrapped into epoch 1 (generating step 5); resume at step 4
    _, resumed = kill_and_resume(tmp, "epoch", "epoch:5:0")
    assert "at step 4" in resumed.stderr
    assert_same_weights(final_weights(tmp, "epoch"), weights)
    check_judge_calls(tmp, "epoch", calls, replayed_step_was_scored=False)


def test_fsdp2_sigkill_then_resume_is_bitwise_exact(tmp_path):
    extra = ["distributed.strategy=fsdp2", "max_steps=4"]
    straight = torchrun(tmp_path, "straight", "straight", *extra)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert (tmp_path / "straight" / "checkpoints" / "step_00000004" / "sharded" / "__1_0.distcp").exists()
    kill_and_resume(tmp_path, "mid", "backward:3:0", *extra)
    assert_same_weights(final_weights(tmp_path, "mid", 4), final_weights(tmp_path, "straight", 4))


def test_a_dead_rank_ends_the_others_within_the_collective_timeout(tmp_path):
    """Two ranks started by hand (no torchrun agent to tear the job down): rank 1 dies mid-step, rank 0
    must exit with an error, not hang."""
    port = free_port()
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
            "RUBRIC_FAST_TEST_KILL": "backward:2:1"}
    cmd = [sys.executable, "-m", "rubric_fast.cli", "train", *ARGS, "distributed.timeout_s=15",
           f"logging.run_dir={tmp_path / 'dead'}"]
    procs = [subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        procs[1].wait(timeout=120)
        died = time.monotonic()
        assert procs[1].returncode == -9
        _, err = procs[0].communicate(timeout=15 + 45)
        waited = time.monotonic() - died
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0
    assert waited < 15 + 45, waited
    assert "a collective failed" in err, err[-2000:]
