"""Hidden states and LM head of a Hugging Face causal LM, for home-grown loops and the other adapters.

Re-exported from :mod:`rubric_fast.trainer.lm_head`, where the trainer's own model code keeps it (the
adapters sit above the trainer and may use it; the trainer does not import the adapters).
"""

from rubric_fast.trainer.lm_head import (  # noqa: F401
    UnsupportedHeadError,
    check_linear_head,
    get_decoder,
    hidden_states_and_head,
    unwrap_model,
)

__all__ = ["UnsupportedHeadError", "check_linear_head", "get_decoder", "hidden_states_and_head", "unwrap_model"]
