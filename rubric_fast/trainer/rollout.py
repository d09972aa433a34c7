"""Rollout engines: prompts in, sampled completions (with the sampler's log-probs) out.

The ``hf`` engine calls ``transformers`` ``generate`` on the policy itself (KV cache, batched, left
padding). Its sampler log-probs are the log-softmax of the *processed* scores, i.e. of the distribution
the token was actually drawn from: logits divided by the temperature, then top-k / top-p filtered
(``output_scores`` + ``compute_transition_scores(normalize_logits=True)``). With ``top_p == 1`` and
``top_k == 0`` this equals the policy's log-prob at the rollout temperature up to numerics; otherwise the
difference is what the truncated importance weight of the loss corrects.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from rubric_fast.integrations.hf import unwrap_model


@dataclass
class Completion:
    prompt_ids: list[int]          # the prompt the sampler saw (scaffolded when rubric scaffolding is on)
    token_ids: list[int]           # generated tokens, up to and including EOS; no padding
    sampler_logp: list[float]      # log-prob of each generated token under the sampling distribution
    finished: bool                 # ended with EOS (False: truncated at max_new_tokens)
    text: str                      # decoded response, special tokens removed


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]]) -> Iterator[list[Completion]]:
        """Yield completions batch by batch (in prompt order), so each batch can be scored at once."""
        ...


class HFRolloutEngine:
    """``model.generate`` with sampling; the policy being trained is the sampler (no weight sync).

    ``via``: a root module whose ``forward(ids, mask, generate={...})`` calls ``generate`` (the FSDP2 root,
    which must gather its parameters around the call); ``synced``: keep stepping until every rank is done
    (``synced_gpus``), because each forward of a sharded model is a collective.
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, batch_size: int = 64, via: nn.Module | None = None,
                 synced: bool = False):
        self.model = model
        self.via, self.synced = via, synced
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id

    def _left_pad(self, prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            if p:
                ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p):] = 1
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]]) -> Iterator[list[Completion]]:
        model = unwrap_model(self.model) if not hasattr(self.model, "disable_adapter") else self.model
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start:start + self.batch_size]
                ids, mask = self._left_pad(chunk, device)
                kw = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                      "top_k": self.top_k if self.top_k > 0 else None, "max_new_tokens": self.max_new_tokens,
                      "pad_token_id": self.pad_id, "eos_token_id": self.eos_id, "output_scores": True,
                      "return_dict_in_generate": True, "use_cache": True}
                if self.synced:
                    kw["synced_gpus"] = True
                if self.via is not None:
                    out = self.via(ids, mask, generate=kw)
                else:
                    out = model.generate(input_ids=ids, attention_mask=mask, **kw)
                new = out.sequences[:, ids.shape[1]:]
                # log-softmax of the processed scores (temperature, top-k, top-p applied) at the drawn token
                logps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
                yield [self._completion(chunk[i], new[i], logps[i]) for i in range(len(chunk))]
        finally:
            model.train(was_training)

    def _completion(self, prompt: list[int], new: torch.Tensor, logp: torch.Tensor) -> Completion:
        toks = new.tolist()
        finished = False
        if self.eos_id is not None and self.eos_id in toks:
            toks = toks[:toks.index(self.eos_id) + 1]
            finished = True
        lp = logp[:len(toks)].float().tolist()
        text = self.tokenizer.decode(toks, skip_special_tokens=True)
        return Completion(prompt_ids=list(prompt), token_ids=toks, sampler_logp=lp, finished=finished, text=text)


def make_engine(name: str, model: nn.Module, tokenizer, rollout_cfg, *, via: nn.Module | None = None,
                synced: bool = False) -> RolloutEngine:
    if name == "hf":
        return HFRolloutEngine(model, tokenizer, max_new_tokens=rollout_cfg.max_new_tokens,
                               temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p,
                               top_k=rollout_cfg.top_k, batch_size=rollout_cfg.batch_size, via=via, synced=synced)
    raise ValueError(f"rollout.engine: got {name!r}; accepted: hf")
