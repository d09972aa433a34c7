"""Shared by the method tests (tests/test_*method*): a tiny training run and a scripted rollout engine."""

from __future__ import annotations

import json

from rubric_fast.trainer.command import DEFAULT_CONFIG
from rubric_fast.trainer.config import load_config
from rubric_fast.trainer.loop import train
from rubric_fast.trainer.rollout import Completion

SMALL = ["max_steps=1", "data.prompts_per_step=2", "rollout.num_generations=4", "rollout.max_new_tokens=6",
         "logging.tensorboard=false", "logging.progress=false", "checkpoint.save_final=false",
         "model.tiny.hidden_size=32", "model.tiny.intermediate_size=48", "optimization.lr=1e-2"]


def run(tmp_path, *overrides, name: str = "run"):
    cfg = load_config(DEFAULT_CONFIG, SMALL + [f"logging.run_dir={tmp_path / name}", *overrides])
    result = train(cfg)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return result, rows


class ScriptedEngine:
    """Answers prompt i (in generation order) with ``texts[i % len(texts)]`` + EOS; the sampler log-prob of
    every token is ``logp``. Stands in for the hf engine where a test needs known responses."""

    def __init__(self, tokenizer, texts: list[str], logp: float = -1.0):
        self.tok, self.texts, self.logp = tokenizer, texts, logp
        self.calls: list[list[list[int]]] = []
        self.i = 0

    def generate(self, prompts):
        self.calls.append([list(p) for p in prompts])
        out = []
        for p in prompts:
            text = self.texts[self.i % len(self.texts)]
            self.i += 1
            ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            out.append(Completion(list(p), ids, [self.logp] * len(ids), True, text))
        yield out


def scripted_engine(monkeypatch, texts: list[str], logp: float = -1.0) -> dict:
    """Make the loop build a :class:`ScriptedEngine`; the returned dict holds it under "engine"."""
    from rubric_fast.trainer import loop as L

    made: dict = {}

    def make(name, model, tokenizer, rollout_cfg, **kw):
        made["engine"] = ScriptedEngine(tokenizer, texts, logp)
        return made["engine"]

    monkeypatch.setattr(L, "make_engine", make)
    return made


def spy_fused_loss(monkeypatch) -> list[dict]:
    """Record the tensors every call of the fused loss receives (the real op still runs)."""
    from rubric_fast.trainer import loop as L

    real = L.ops.fused_linear_policy_loss
    calls: list[dict] = []

    def spy(hidden, weight, targets, old_logp, advantages, loss_weight, **kw):
        calls.append({"targets": targets.clone(), "advantages": advantages.clone(),
                      "loss_weight": loss_weight.clone(), "seq_index": kw["seq_index"].clone(),
                      "is_weight": None if kw.get("is_weight") is None else kw["is_weight"].clone(),
                      "advantages_object": advantages})
        return real(hidden, weight, targets, old_logp, advantages, loss_weight, **kw)

    monkeypatch.setattr(L.ops, "fused_linear_policy_loss", spy)
    return calls


def per_sequence(call: dict, key: str = "advantages") -> dict[int, list[float]]:
    """The per-token values of one fused-loss call, split by sequence."""
    out: dict[int, list[float]] = {}
    for s, v in zip(call["seq_index"].tolist(), call[key].tolist()):
        out.setdefault(s, []).append(v)
    return out
