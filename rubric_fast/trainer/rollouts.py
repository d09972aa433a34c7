"""The training run's rollouts (the loop's steps 1 and 2): the prompt stream, the generation engine, group
ids, the batches generated ahead of the update, and their rewards.

:class:`Rollouts` owns everything that survives a step on the rollout side and saves it with
``state_dict()``: the stream's position, the group counter, and the batches generated but not yet trained
(with ``rollout.overlap`` the batch of step k+1 is generated while step k is scored; on resume those are
graded again, so the continuation is the same as without the interruption). Generation engines themselves
live in rollout.py (hf) and vllm_engine.py.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from typing import Any, Callable

from rubric_fast.rubric import Rubric
from rubric_fast.scoring.scorer import rollout_errors

from . import calibration, empg, multiturn
from .batches import RolloutBatch, Sample, batch_from_state, batch_to_state
from .config import TrainConfig
from .rewards import ScoredCompletion


class PromptStream:
    """Endless, epoch-shuffled walk over the rubrics; identical order on every rank, each rank its slice."""

    def __init__(self, rubrics: list[Rubric], *, seed: int, shuffle: bool):
        self.rubrics, self.seed, self.shuffle = rubrics, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.rubrics)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, pos: dict[str, int]) -> None:
        self.epoch, self.index = pos["epoch"], pos["index"]
        self._order = self._make_order()

    def take(self, n_global: int, rank: int, n_local: int) -> list[Rubric]:
        """The next ``n_global`` prompts of the stream (the same on every rank); this rank's ``n_local``."""
        out = []
        for _ in range(n_global):
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.rubrics[self._order[self.index]])
            self.index += 1
        return out[rank * n_local:(rank + 1) * n_local]


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in messages) + "\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def scaffold_messages(rubric: Rubric, share: float) -> list[dict[str, str]]:
    """RuscaRL: the first round(share * n) criteria of the rubric as a system message before the prompt."""
    k = round(share * len(rubric.criteria))
    if k <= 0:
        return rubric.prompt
    lines = "; ".join(c.text for c in rubric.criteria[:k])
    return [{"role": "system", "content": f"Rubric: {lines}"}] + list(rubric.prompt)


def scaffold_share(i: int, n: int, step: int, max_steps: int, midpoint: float, steepness: float) -> float:
    """Share of criteria shown to member i of a group of n: (n-1-i)/(n-1), times a decaying sigmoid."""
    progress = step / max(1, max_steps)
    schedule = 1.0 / (1.0 + math.exp(steepness * (progress - midpoint)))
    return (n - 1 - i) / max(1, n - 1) * schedule


class Rollouts:
    """Generates the steps' batches and submits every finished completion to the scorer at once.

    ``fill(policy_version)`` generates up to the queue depth (2 with ``rollout.overlap``, else 1);
    ``next_batch()`` hands out the oldest; ``collect(batch)`` waits for its groups' rewards and writes them
    into the samples. ``on_event(event, step, rank)`` is called at ``rollout`` (a step's completions
    generated) and ``epoch`` (the stream wrapped into a new epoch): the run's callbacks.
    """

    def __init__(self, cfg: TrainConfig, rubrics: list[Rubric], *, tokenizer, engine, scorer, model, pad_id: int,
                 device, rank: int, world_size: int, on_event: Callable[..., None]):
        self.cfg, self.rubrics, self.tokenizer, self.engine, self.scorer = cfg, rubrics, tokenizer, engine, scorer
        self.model, self.pad_id, self.device = model, pad_id, device
        self.rank, self.world_size, self.on_event = rank, world_size, on_event
        self.stream = PromptStream(rubrics, seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.group_counter = 0
        self.next_step = 0                       # the step the next generated batch is for
        self.pending: deque[RolloutBatch] = deque()
        self.depth = 2 if cfg.rollout.overlap else 1
        self.G = cfg.rollout.num_generations
        self.P = cfg.data.prompts_per_step // world_size
        self._rubric_index = {id(r): i for i, r in enumerate(rubrics)}
        self._environment = None                 # multi-turn: built at the first rollout

    # ---- state
    def position(self) -> dict[str, int]:
        """Where the prompt stream stands (the same on every rank)."""
        return self.stream.position()

    def state_dict(self) -> dict[str, Any]:
        """This rank's rollout state: the group counter, the next step to generate, the pending batches."""
        return {"group_counter": self.group_counter, "next_rollout_step": self.next_step,
                "pending": [batch_to_state(b, self._rubric_index) for b in self.pending]}

    def load_state_dict(self, state: dict[str, Any], *, data_position: dict[str, int], step: int) -> None:
        """Resume: the stream's position, this rank's counters, and the pending batches (graded again)."""
        self.stream.seek(data_position)
        self.group_counter = state.get("group_counter", 0)
        self.next_step = state.get("next_rollout_step", step)
        for b in state.get("pending", []):
            batch = batch_from_state(b, self.rubrics)
            self._submit(batch.samples)  # scores are not saved: grade the completions again
            self.pending.append(batch)

    # ---- generation
    def fill(self, policy_version: int) -> None:
        """Generate until ``depth`` batches wait (never past max_steps)."""
        while len(self.pending) < self.depth and self.next_step < self.cfg.max_steps:
            self.pending.append(self._generate(self.next_step, policy_version))
            self.next_step += 1

    def next_batch(self) -> RolloutBatch:
        return self.pending.popleft()

    def _judged_text(self, text: str) -> str:  # RLCR: the judge never sees the confidence statement
        cal = self.cfg.reward.calibration
        return calibration.judged_text(cal, text) if cal.enabled else text

    def _submit(self, batch_samples: list[Sample]) -> None:
        """Every finished sample to the scorer (the k-th of a group is rollout ``group:k``); a multi-turn
        conversation judged per turn is submitted as one unit per assistant turn (``group:k:t``)."""
        mt, G = self.cfg.rollout.multiturn, self.G
        units = {id(smp): (multiturn.judged_units(smp.completion, mt.judge) if mt.enabled
                           else [self._judged_text(smp.completion.text)]) for smp in batch_samples}
        per_group: dict[int, int] = {}
        for smp in batch_samples:
            per_group[smp.group_id] = per_group.get(smp.group_id, 0) + len(units[id(smp)])
        for k, smp in enumerate(batch_samples):
            if mt.enabled and mt.judge == "per_turn":
                for t, text in enumerate(units[id(smp)]):
                    self.scorer.submit(smp.group_id, f"{smp.group_id}:{k % G}:{t}", smp.rubric, text,
                                       group_size=per_group[smp.group_id])
            else:
                self.scorer.submit(smp.group_id, f"{smp.group_id}:{k % G}", smp.rubric, units[id(smp)][0])

    def _prompts(self, for_step: int, policy_version: int) -> tuple[list, list[Sample], list[int]]:
        """This rank's prompts of the step: G samples per prompt (scaffolded prompts for the sampler)."""
        cfg, G = self.cfg, self.G
        epoch = self.stream.epoch
        batch_rubrics = self.stream.take(self.P * self.world_size, self.rank, self.P)
        if self.stream.epoch != epoch:
            self.on_event("epoch", for_step + 1, self.rank)
        gen_prompts, samples, group_ids = [], [], []
        for rubric in batch_rubrics:
            gid = self.group_counter * self.world_size + self.rank  # unique across ranks
            self.group_counter += 1
            group_ids.append(gid)
            prompt_ids = encode_prompt(self.tokenizer, rubric.prompt)
            for i in range(G):
                if cfg.rollout.scaffold.enabled:
                    share = scaffold_share(i, G, for_step, cfg.max_steps, cfg.rollout.scaffold.midpoint,
                                           cfg.rollout.scaffold.steepness)
                    gen_prompts.append(encode_prompt(self.tokenizer, scaffold_messages(rubric, share)))
                else:
                    gen_prompts.append(prompt_ids)
                samples.append(Sample(gid, rubric, prompt_ids, None, policy_version))  # type: ignore[arg-type]
        return gen_prompts, samples, group_ids

    def _generate(self, for_step: int, policy_version: int) -> RolloutBatch:
        """Generate one step's completions; submit each batch of completions to the scorer at once."""
        t0 = time.perf_counter()
        position = self.stream.position()
        gen_prompts, samples, group_ids = self._prompts(for_step, policy_version)
        if self.cfg.rollout.multiturn.enabled:
            n_tok = self._conversations(gen_prompts, samples)
            self.on_event("rollout", for_step + 1, self.rank)
        else:
            n_tok, k = 0, 0
            for completions in self.engine.generate(gen_prompts):
                for c in completions:
                    s = samples[k]
                    s.completion = c
                    n_tok += len(c.token_ids)
                    self.scorer.submit(s.group_id, f"{s.group_id}:{k % self.G}", s.rubric, self._judged_text(c.text))
                    k += 1
                self.on_event("rollout", for_step + 1, self.rank)
        return RolloutBatch(for_step, policy_version, position, samples, group_ids, time.perf_counter() - t0, n_tok)

    def _conversations(self, gen_prompts: list, samples: list[Sample]) -> int:
        """Multi-turn: conversations with the environment, then every one of them to the scorer."""
        cfg, mt = self.cfg, self.cfg.rollout.multiturn
        if self._environment is None:
            self._environment = multiturn.build_environment(mt)
        episodes = [self._environment.episode(smp.rubric, i % self.G) for i, smp in enumerate(samples)]
        convs = multiturn.multiturn_rollout(self.engine, self.tokenizer, gen_prompts,
                                            [smp.rubric.prompt for smp in samples], episodes, mt.max_turns)
        n_tok = 0
        for smp, c in zip(samples, convs):
            smp.completion = c
            n_tok += len(c.token_ids)
        if cfg.algorithm.empg.enabled:  # EMPG's step entropies, from the policy that sampled the turns
            empg.rollout_turn_entropies(self.model, samples, self.pad_id, self.device,
                                        temperature=cfg.rollout.temperature,
                                        token_budget=cfg.optimization.tokens_per_micro_batch)
        self._submit(samples)
        return n_tok

    # ---- rewards
    def collect(self, batch: RolloutBatch) -> float:
        """Block until the batch's groups are scored; write reward, verdicts and errors into its samples
        (multi-turn: one result per conversation; RLCR: the calibrated reward). Returns the seconds waited."""
        cfg = self.cfg
        mt, cal = cfg.rollout.multiturn, cfg.reward.calibration
        t_wait = time.perf_counter()
        by_group: dict[int, list[ScoredCompletion]] = {g: self.scorer.collect(g) for g in batch.group_ids}
        score_wait = time.perf_counter() - t_wait
        for g, scored in by_group.items():
            members = [s for s in batch.samples if s.group_id == g]
            if mt.enabled:  # one result per conversation (per-turn rewards averaged, environment reward)
                scored = multiturn.combine_scored([s.completion for s in members], scored, mt.judge,
                                                  mt.env_reward_weight)
            for s, r in zip(members, scored):
                s.reward, s.verdicts, s.guard_reason = r.reward, r.verdicts, r.guard_reason
                s.errors = rollout_errors(r) if r.reward is None else []
                if cal.enabled:  # RLCR: correctness from the rubric, plus the Brier term
                    s.reward, s.extras["calibration"] = calibration.calibrated_reward(
                        cal, s.completion.text, r.reward, r.verdicts)
        return score_wait
