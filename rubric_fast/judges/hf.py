"""A local transformers causal LM as the judge: same prompts and parsing as the http judge, batched.

Calls from concurrent rollouts are collected by a micro-batcher (up to ``batch_size`` prompts, waiting at
most ``batch_wait_s`` for a batch to fill) and run through ``model.generate`` (greedy, left padding) in one
worker thread, so the event loop never blocks on the model.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from .base import CallTimeout, DeadlineExceeded
from .chat import ChatJudge
from .prompts import TEMPLATE_VERSION


def render_plain(messages: list[dict[str, str]]) -> str:
    """Prompt text for tokenizers without a chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class HFJudge(ChatJudge):
    name = "hf"

    def __init__(self, model: Any = None, tokenizer: Any = None, *, mode: str = "per_criterion",
                 batch_size: int = 8, max_new_tokens: int = 256, max_input_tokens: int = 4096,
                 device: str = "cpu", dtype: str | None = None, batch_wait_s: float = 0.005,
                 call_timeout_s: float = 600.0, max_reasks: int = 2, criteria_per_call: int = 5,
                 generate_fn: Callable[[list[list[dict[str, str]]]], list[str]] | None = None):
        super().__init__(mode=mode, batch_size=criteria_per_call, max_reasks=max_reasks)
        if model is None and generate_fn is None:
            raise ValueError("hf judge: give 'model' (a name, a path or a model object) or generate_fn")
        self.model_id = model if isinstance(model, str) else type(model).__name__ if model is not None else "scripted"
        self._model, self._tokenizer = model, tokenizer
        self.device, self.dtype = device, dtype
        self.gen_batch_size, self.max_new_tokens, self.max_input_tokens = batch_size, max_new_tokens, max_input_tokens
        self.batch_wait_s, self.call_timeout_s = batch_wait_s, call_timeout_s
        self.generate_fn = generate_fn or self._generate
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-judge")
        self.batch_sizes: list[int] = []

    @property
    def identity(self) -> str:
        return f"hf:{self.model_id}:mode={self.mode}:greedy:n={self.max_new_tokens}:{TEMPLATE_VERSION}"

    # -------------------------------------------------------------------------------- model
    def _load(self) -> None:
        if isinstance(self._model, str):
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            name = self._model
            self._tokenizer = self._tokenizer or AutoTokenizer.from_pretrained(name)
            kw = {"torch_dtype": getattr(torch, self.dtype)} if self.dtype else {}
            self._model = AutoModelForCausalLM.from_pretrained(name, **kw).to(self.device).eval()
        if self._tokenizer is None:
            raise ValueError("hf judge: a model object needs its tokenizer")

    def _generate(self, batch: list[list[dict[str, str]]]) -> list[str]:
        import torch

        self._load()
        tok, model = self._tokenizer, self._model
        if getattr(tok, "chat_template", None):
            texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in batch]
        else:
            texts = [render_plain(m) for m in batch]
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_input_tokens)
        enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        return tok.batch_decode(new, skip_special_tokens=True)

    # -------------------------------------------------------------------------------- batching
    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        while True:
            items = [await self._queue.get()]
            t_end = time.monotonic() + self.batch_wait_s
            while len(items) < self.gen_batch_size:
                left = t_end - time.monotonic()
                try:
                    items.append(self._queue.get_nowait() if left <= 0 else
                                 await asyncio.wait_for(self._queue.get(), left))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            items = [(m, f) for m, f in items if not f.done()]
            if not items:
                continue
            self.batch_sizes.append(len(items))
            self.stats["generate_batches"] += 1
            try:
                texts = await loop.run_in_executor(self._executor, self.generate_fn, [m for m, _ in items])
                if len(texts) != len(items):
                    raise RuntimeError(f"generate returned {len(texts)} texts for {len(items)} prompts")
            except Exception as exc:  # noqa: BLE001 - the model failing must fail these calls, not the worker
                for _, f in items:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_, f), t in zip(items, texts):
                if not f.done():
                    f.set_result(t)

    async def _complete(self, messages: list[dict[str, str]], *, deadline: float | None) -> str:
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run_batches())
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((messages, fut))
        timeout = self.call_timeout_s
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - time.monotonic()))
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("rollout deadline passed while waiting for the local judge") from None
            raise CallTimeout(f"local judge gave no answer within {self.call_timeout_s:g}s") from None
        except Exception as exc:  # noqa: BLE001
            from .base import JudgeCallError

            if isinstance(exc, JudgeCallError):
                raise
            raise JudgeCallError(f"local model failed: {type(exc).__name__}: {exc}") from None

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        self._executor.shutdown(wait=False)
