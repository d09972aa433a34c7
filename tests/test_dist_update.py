"""Data parallel on CPU / gloo: 2 ranks make the same update as 1 rank on the same global batch (ddp, fsdp2).

The oracle is one process running ``update.update`` on all samples. The 2-rank runs split the groups (one
rank gets longer completions, hence more micro-batches: fsdp2 pads with empty ones), so they only agree
when the token / sequence normalizers and the entropy threshold are global and the gradients are summed
(not averaged) over ranks. The optimizer is SGD with lr 1, so the weight change *is* the gradient (Adam
would hide a wrong scale).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rubric_fast.trainer import batches as B, rollouts as R, update as U
from rubric_fast.trainer.command import DEFAULT_CONFIG
from rubric_fast.trainer.config import load_config
from rubric_fast.trainer.dist import PolicyForward, full_tensor, shard_fsdp2
from rubric_fast.trainer.models import build_char_tokenizer, load_policy
from rubric_fast.trainer.rollout import Completion
from procs import free_port, init_gloo

SMALL = ["data.prompts_per_step=2", "rollout.num_generations=4", "rollout.max_new_tokens=12",
         "model.tiny.hidden_size=32", "model.tiny.intermediate_size=48", "optimization.grad_clip=null",
         "optimization.tokens_per_micro_batch=40", "algorithm.drop_zero_variance_groups=false"]

VARIANTS = [
    ("ddp", []),
    ("fsdp2", []),
    ("ddp", ["algorithm.policy_loss.top_entropy_fraction=0.3", "algorithm.is_cap=null"]),
    ("fsdp2", ["algorithm.policy_loss.top_entropy_fraction=0.3", "algorithm.estimator=dr_grpo",
               "algorithm.policy_loss.aggregation=constant"]),
    ("fsdp2", ["algorithm.policy_loss.aggregation=seq_mean_token_mean", "algorithm.num_iterations=2", "algorithm.is_cap=null"]),
]


def _samples(tok, rubric):
    """4 groups x 4 members; groups 0-1 (rank 0) short, groups 2-3 (rank 1) long completions."""
    g = torch.Generator().manual_seed(1)
    prompt = R.encode_prompt(tok, rubric.prompt)
    out = []
    for gid in range(4):
        for i in range(4):
            n = int(torch.randint(2, 5, (1,), generator=g)) if gid < 2 else int(torch.randint(8, 13, (1,), generator=g))
            toks = torch.randint(4, 90, (n,), generator=g).tolist()
            slp = (-torch.rand(n, generator=g) * 3 - 2).tolist()
            out.append(B.Sample(gid, rubric, prompt, Completion(prompt, toks, slp, i % 2 == 0, ""), 0,
                                reward=float(i % 2), advantage=float(torch.randn(1, generator=g))))
    return out


def _one_update(strategy: str, overrides: list[str], rank: int, world: int) -> dict:
    from rubric_fast.rubric import load_rubrics

    cfg = load_config(DEFAULT_CONFIG, SMALL + overrides)
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = PolicyForward(load_policy(cfg.model, tok, torch.device("cpu")))
    if strategy == "fsdp2" and world > 1:
        shard_fsdp2(model, param_dtype=None, reduce_dtype="float32")
    samples = _samples(tok, load_rubrics(cfg.data.path)[0])
    mine = [s for s in samples if s.group_id * world // 4 == rank]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    out = U.update(cfg, model, None, opt, sched, mine, tok.pad_token_id, "cpu",
                   strategy=strategy if world > 1 else "ddp")
    assert out["updates"] == cfg.algorithm.num_iterations and not out["nonfinite"]
    return {"grad_norm": out["grad_norm"],
            "params": {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()}}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    try:
        for i, (strategy, overrides) in enumerate(VARIANTS):
            res = _one_update(strategy, overrides, rank, world)
            if rank == 0:
                torch.save(res, os.path.join(out_dir, f"variant_{i}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_update")
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return [torch.load(out / f"variant_{i}.pt", weights_only=True) for i in range(len(VARIANTS))]


@pytest.mark.parametrize("i", range(len(VARIANTS)),
                         ids=[f"{s}-{'-'.join(o) or 'token_mean'}" for s, o in VARIANTS])
def test_two_ranks_make_the_same_update_as_one(two_rank_results, i):
    strategy, overrides = VARIANTS[i]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    before = PolicyForward(load_policy(load_config(DEFAULT_CONFIG, SMALL + overrides).model, build_char_tokenizer(),
                                       torch.device("cpu")))
    one = _one_update(strategy, overrides, 0, 1)
    two = two_rank_results[i]
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    moved = 0.0
    for n, p0 in before.named_parameters():
        torch.testing.assert_close(two["params"][n], one["params"][n], atol=2e-6, rtol=1e-5, msg=n)
        moved += float((one["params"][n] - p0.detach()).abs().sum())
    assert moved > 1e-3  # the update did something
