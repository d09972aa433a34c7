"""rubric_fast: GRPO-family RL for language models with rubric rewards and fused kernels."""

__version__ = "0.1.0"
