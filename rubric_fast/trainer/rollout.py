"""Rollout engines: prompts in, sampled completions (with the sampler's log-probs) out.

The ``hf`` engine calls ``transformers`` ``generate`` on the policy itself (KV cache, batched, left
padding). Its sampler log-probs are the log-softmax of the *processed* scores, i.e. of the distribution
the token was actually drawn from: logits divided by the temperature, then top-k / top-p filtered. They
are taken step by step by the last logits processor (:class:`SampledLogProbs`), which keeps one value per
drawn token: ``generate`` is never asked for ``output_scores``, whose [T, B, V] tensor (10 GB for 64
completions of 256 tokens over a 152k vocabulary) is the very tensor the fused ops exist to avoid. With
``top_p == 1`` and ``top_k == 0`` this equals the policy's log-prob at the rollout temperature up to
numerics; otherwise the difference is what the truncated importance weight of the loss corrects.

The ``vllm`` engine (``rollout.engine: vllm``, :mod:`rubric_fast.trainer.vllm_engine`) keeps the same
contract: token ids, sampler log-probs of the processed distribution, finish reasons.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from rubric_fast.trainer.lm_head import unwrap_model


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


class SampledLogProbs:
    """A logits processor placed after the temperature / top-k / top-p warpers: it sees the distribution
    each token is drawn from. At step t it learns the token drawn at step t-1 (the last column of
    ``input_ids``) and keeps only that token's log-prob; the processed scores of one step ([B, V], which
    ``generate`` holds anyway) are the only vocabulary-sized tensor it refers to."""

    def __init__(self):
        self._scores: torch.Tensor | None = None
        self._lse: torch.Tensor | None = None
        self.columns: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._scores is not None:
            self._take(input_ids[:, -1])
        self._scores, self._lse = scores, torch.logsumexp(scores.float(), dim=-1)
        return scores

    def _take(self, drawn: torch.Tensor) -> None:
        picked = self._scores.gather(1, drawn[:, None].to(self._scores.device)).squeeze(1).float()
        self.columns.append(picked - self._lse)
        self._scores = self._lse = None

    def finish(self, sequences: torch.Tensor, n_new: int) -> torch.Tensor:
        """[B, n_new] log-probs of the generated tokens (the last one read from ``sequences``)."""
        if self._scores is not None:
            self._take(sequences[:, -1])
        if len(self.columns) != n_new:  # every generated column passed through the processors once
            raise RuntimeError(f"rollout: {len(self.columns)} sampler log-prob columns for {n_new} generated tokens")
        if not self.columns:
            return torch.zeros((sequences.shape[0], 0))
        return torch.stack(self.columns, dim=1)


def sampling_processors(temperature: float, top_k: int, top_p: float) -> list:
    """HF's own warpers, in ``generate``'s order (temperature, top-k, top-p). They are passed as custom
    processors with ``generate``'s sampling knobs neutral, because ``generate`` appends its warpers *after*
    the custom processors: the log-prob recorder must come after them."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        out.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=top_p))
    return out


def _neutral_sampling_kwargs() -> dict:
    """``generate`` kwargs that switch off every warper a model's generation_config might add after ours."""
    from transformers import GenerationConfig

    base = {"temperature": 1.0, "top_k": None, "top_p": 1.0, "min_p": None, "typical_p": 1.0,
            "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None}
    defaults = GenerationConfig()
    return {k: v for k, v in base.items() if hasattr(defaults, k)}


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
                from transformers import LogitsProcessorList

                recorder = SampledLogProbs()
                processors = sampling_processors(self.temperature, self.top_k, self.top_p) + [recorder]
                kw = {"do_sample": True, **_neutral_sampling_kwargs(), "max_new_tokens": self.max_new_tokens,
                      "pad_token_id": self.pad_id, "eos_token_id": self.eos_id,
                      "logits_processor": LogitsProcessorList(processors), "use_cache": True}
                if self.synced:
                    kw["synced_gpus"] = True
                if self.via is not None:
                    sequences = self.via(ids, mask, generate=kw)
                else:
                    sequences = model.generate(input_ids=ids, attention_mask=mask, **kw)
                new = sequences[:, ids.shape[1]:]
                # log-softmax of the processed scores (temperature, top-k, top-p applied) at the drawn token
                logps = recorder.finish(sequences, new.shape[1])
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
    raise ValueError(f"rollout.engine: got {name!r}; accepted here: hf (vllm engines are built by "
                     "rubric_fast.trainer.vllm_engine.make_vllm_engine)")
