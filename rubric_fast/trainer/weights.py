"""The policy's weights as a plain Hugging Face model names them: what an export writes and what an
inference engine (vLLM) loads.

``inference_weights(policy)`` yields ``(name, tensor)`` one parameter at a time, in a fixed order:

* LoRA (peft) adapters are merged into their base weight on the fly, ``W + scaling * B @ A`` (Hu et al.
  2021, eq. 3), without touching the trained module (no ``merge_adapter`` / ``unmerge`` round trip, so
  the policy's own weights are never rounded through a merge), and the names lose peft's prefixes
  (``base_model.model.``, ``.base_layer``); adapter tensors themselves are not yielded;
* FSDP2 shards (DTensors) are gathered with ``full_tensor()``: a collective, so every rank must iterate
  the generator to the end, in the same order; only one full parameter exists at a time;
* tied parameters (an LM head tied to the embeddings) are yielded once, under the first name
  (``model.embed_tokens.weight``), as ``named_parameters`` does.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from rubric_fast.trainer.lm_head import unwrap_model

_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _lora_delta(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Sum over the active adapters of ``scaling * B @ A`` for a peft LoRA ``Linear``, in ``weight``'s dtype."""
    if getattr(module, "merged", False):  # already merged into base_layer by someone: nothing to add
        return torch.zeros_like(weight)
    delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(name, False):
            raise ValueError(f"{type(module).__name__}: DoRA adapters cannot be merged on the fly; "
                             "use plain LoRA (model.lora)")
        linear = isinstance(module.lora_A[name], nn.Linear)
        if not linear:
            raise ValueError(f"LoRA on a {type(module.get_base_layer()).__name__} cannot be merged on the fly: "
                             "model.lora.target_modules must name linear projections")
        a = _full(module.lora_A[name].weight).float()
        b = _full(module.lora_B[name].weight).float()
        d = b @ a
        if getattr(module, "fan_in_fan_out", False):
            d = d.T
        delta += d * float(module.scaling[name])
    return delta.to(weight.dtype)


def inference_weights(policy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor)`` for every parameter of the policy (see the module docstring)."""
    base = unwrap_model(policy)
    modules = dict(base.named_modules())
    for name, p in base.named_parameters():
        parts = name.split(".")
        if any(part in _ADAPTER_PARTS for part in parts):
            continue
        if "base_layer" in parts:
            i = parts.index("base_layer")
            owner = modules[".".join(parts[:i])]
            t = _full(p)
            if parts[i + 1:] == ["weight"] and hasattr(owner, "lora_A"):
                t = t + _lora_delta(owner, t)
            yield ".".join(parts[:i] + parts[i + 1:]), t
        else:
            yield name, _full(p)
