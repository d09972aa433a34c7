"""Worker-side helpers that a ``vllm serve`` process loads with
``--worker-extension-cls rubric_fast.trainer.vllm_worker.RubricFastWorkerExtension`` (server mode on a CPU
server with a tied LM head: see :func:`rubric_fast.trainer.vllm_engine.refresh_tied_head`). Imported inside
vLLM's worker process; it must not import torch-heavy parts of rubric_fast at module level."""

from __future__ import annotations


class RubricFastWorkerExtension:
    """Mixed into vLLM's worker class; the methods are reachable through ``POST /collective_rpc``."""

    def rubric_fast_refresh_tied_head(self) -> int:
        from rubric_fast.trainer.vllm_engine import refresh_tied_head

        return refresh_tied_head(self)
