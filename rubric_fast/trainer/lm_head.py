"""Hidden states and LM head of a Hugging Face causal LM, so the loss never builds the full logits.

``hidden_states_and_head(model, input_ids, attention_mask)`` runs the model's decoder (the base model
without its LM head, final norm included) and returns the last hidden states together with the head's
weight and bias. ``rubric_fast.ops.linear_logprob_entropy(hidden, weight, targets, bias=bias)`` then gives
exactly ``log_softmax(model(...).logits)`` at the targets, without a [B, T, V] tensor.

Works for any ``AutoModelForCausalLM`` whose logits are a plain linear map of the last hidden state
(Llama, Qwen2/3, Mistral, Gemma without soft-capping, Phi-3, ..., tied or untied embeddings), also when
wrapped by peft (LoRA adapters inside the decoder are active; a LoRA-wrapped head is refused). Models
whose logits are post-processed are refused with :class:`UnsupportedHeadError`: Gemma 2/3's
``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``, or a head that is
not an ``nn.Linear``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class UnsupportedHeadError(ValueError):
    """The model's logits are not ``hidden @ W.T + b``; the fused ops would compute something else."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / FSDP / torch.compile / peft wrappers."""
    for _ in range(8):
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft
            model = model.get_base_model()
        else:
            break
    return model


def _configs(model: nn.Module) -> list[Any]:
    cfg = getattr(model, "config", None)
    out = [cfg] if cfg is not None else []
    for sub in ("text_config", "language_config"):
        c = getattr(cfg, sub, None)
        if c is not None:
            out.append(c)
    return out


def check_linear_head(model: nn.Module) -> nn.Linear:
    """The LM head as an ``nn.Linear``, or :class:`UnsupportedHeadError` saying why not."""
    base = unwrap_model(model)
    name = type(base).__name__
    for cfg in _configs(base):
        soft = getattr(cfg, "final_logit_softcapping", None)
        if soft is not None:
            raise UnsupportedHeadError(
                f"{name}: config.final_logit_softcapping={soft} post-processes the logits (tanh soft-capping); "
                "the fused log-prob ops assume logits = hidden @ W.T + b. Set final_logit_softcapping=None "
                "(only if the model was trained without it) or use a model without soft-capping.")
        scale = getattr(cfg, "logit_scale", None)
        if scale is not None and float(scale) != 1.0:
            raise UnsupportedHeadError(f"{name}: config.logit_scale={scale} multiplies the logits (Cohere); "
                                       "the fused log-prob ops assume logits = hidden @ W.T + b.")
        scaling = getattr(cfg, "logits_scaling", None)
        if scaling is not None and float(scaling) != 1.0:
            raise UnsupportedHeadError(f"{name}: config.logits_scaling={scaling} divides the logits (Granite); "
                                       "the fused log-prob ops assume logits = hidden @ W.T + b.")
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise UnsupportedHeadError(f"{name}: has no output embeddings (get_output_embeddings() is None); "
                                   "expected a causal LM with a linear head")
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise UnsupportedHeadError(f"{name}: the LM head is wrapped by an adapter ({type(head).__name__}); "
                                   "leave lm_head out of the LoRA target_modules")
    if type(head) is not nn.Linear:
        raise UnsupportedHeadError(f"{name}: the LM head is a {type(head).__name__}, not torch.nn.Linear")
    return head


def get_decoder(model: nn.Module) -> nn.Module:
    base = unwrap_model(model)
    dec = base.get_decoder() if hasattr(base, "get_decoder") else None
    if dec is None or dec is base:
        for attr in ("model", "transformer", "language_model"):
            dec = getattr(base, attr, None)
            if isinstance(dec, nn.Module):
                break
    if dec is None or dec is base:
        raise UnsupportedHeadError(f"{type(base).__name__}: cannot find the decoder (base model) under the LM head")
    return dec


def hidden_states_and_head(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           *, position_ids: torch.Tensor | None = None, **kwargs: Any
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(last hidden states [B, T, H], head weight [V, H], head bias [V] or None) of a causal LM.

    ``hidden[:, t]`` is what the model's head maps to the logits of token t + 1. Gradients flow to the
    decoder and, through the returned weight and bias, to the head (tied embeddings included).
    """
    head = check_linear_head(model)
    decoder = get_decoder(model)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                  **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, head.weight, head.bias
