"""Policy, tokenizer and reference model construction.

``model.name_or_path: tiny`` builds a small Llama / Qwen2 from a config (random init, no download) and a
character-level tokenizer (printable ASCII, built with the ``tokenizers`` library), which is what the
embedded default run and the tests use. Anything else goes through ``AutoModelForCausalLM`` /
``AutoTokenizer``.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from rubric_fast.trainer.lm_head import check_linear_head

from .config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# role tags keep prompts short for the char-level model; system messages (rubric scaffolds) are bracketed
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}[{{ m['content'] }}]\n"
    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
)
TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_char_tokenizer(save_dir: str | Path | None = None):
    """A character-level tokenizer over printable ASCII + newline, wrapped as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(TINY_SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.padding_side = "left"
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def build_tiny_model(cfg: ModelConfig, vocab_size: int, pad_id: int, eos_id: int, bos_id: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    t = cfg.tiny
    common = dict(vocab_size=vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                  num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
                  intermediate_size=t.intermediate_size, max_position_embeddings=1024,
                  tie_word_embeddings=t.tie_word_embeddings, pad_token_id=pad_id, eos_token_id=eos_id,
                  bos_token_id=bos_id)
    hf_cfg = LlamaConfig(**common) if t.arch == "llama" else Qwen2Config(**common)
    hf_cfg._attn_implementation = resolve_attn_implementation(cfg.attn_implementation)
    return AutoModelForCausalLM.from_config(hf_cfg, dtype=DTYPES[cfg.dtype])


def resolve_attn_implementation(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(cfg: ModelConfig, run_dir: str | Path | None = None):
    if cfg.name_or_path == "tiny" and cfg.tokenizer is None:
        return build_char_tokenizer(Path(run_dir) / "tokenizer" if run_dir is not None else None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(cfg: ModelConfig, tokenizer, device: torch.device, *, pretrained: bool = True) -> nn.Module:
    """The trainable policy (LoRA-wrapped when ``model.lora.enabled``), on ``device``, in train mode.

    ``pretrained=False``: the same architecture from its config only, weights left random (a skeleton to
    load a checkpoint into, e.g. for ``rubric-fast export``: no weight download)."""
    if cfg.name_or_path == "tiny":
        model = build_tiny_model(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                                 tokenizer.bos_token_id)
    elif not pretrained:
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_cfg = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
        hf_cfg._attn_implementation = resolve_attn_implementation(cfg.attn_implementation)
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=DTYPES[cfg.dtype],
                                                 trust_remote_code=cfg.trust_remote_code)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
            attn_implementation=resolve_attn_implementation(cfg.attn_implementation))
    check_linear_head(model)  # refuse soft-capped / scaled heads before any compute is spent
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            print("[rubric_fast] model.lora.enabled needs peft: pip install peft", file=sys.stderr)
            raise
        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                                 target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
    model.to(device)
    model.train()
    return model


class ReferencePolicy:
    """Log-prob source of the KL reference: a frozen copy, or (LoRA) the same model with adapters off."""

    def __init__(self, policy: nn.Module, mode: str, lora: bool):
        if mode == "auto":
            mode = "lora_base" if lora else "copy"
        self.mode = mode
        self.policy = policy
        self.model = None
        if mode == "copy":
            self.model = copy.deepcopy(policy).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)

    def context(self):
        import contextlib

        if self.mode == "lora_base":
            return self.policy.disable_adapter()
        return contextlib.nullcontext()

    def module(self) -> nn.Module:
        return self.policy if self.mode == "lora_base" else self.model
