"""Policy, tokenizer and reference model construction.

``model.name_or_path: tiny`` builds a small Llama / Qwen2 from a config (random init, no download) and a
character-level tokenizer (printable ASCII, built with the ``tokenizers`` library), which is what the
embedded default run and the tests use. Anything else goes through ``AutoModelForCausalLM`` /
``AutoTokenizer``; ``pkg:<package>`` names an installed package's folder, and ``model.gguf_file`` loads a GGUF
file from the folder, dequantized (tokenizer and chat template included; :mod:`rubric_fast.gguf`).
"""

from __future__ import annotations

import copy
import importlib.util
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


def gguf_source(cfg: ModelConfig) -> tuple[str, str] | None:
    """(folder, file) of the GGUF policy when ``model.gguf_file`` is set (one-line ConfigError otherwise)."""
    if not cfg.gguf_file:
        return None
    from rubric_fast.gguf import GGUFError, resolve_gguf_file, resolve_model_path

    from .config import ConfigError

    if cfg.name_or_path == "tiny":
        raise ConfigError("model.gguf_file: set model.name_or_path to the folder holding the file (or pkg:<package>)")
    try:
        return resolve_gguf_file(resolve_model_path(cfg.name_or_path), cfg.gguf_file)
    except GGUFError as exc:
        raise ConfigError(str(exc)) from None


def model_path(value: str, key: str = "model.name_or_path") -> str:
    """``pkg:<package>`` resolved to the package's folder (one-line ConfigError when it is not installed)."""
    from rubric_fast.gguf import GGUFError, resolve_model_path

    from .config import ConfigError

    try:
        return resolve_model_path(value, key)
    except GGUFError as exc:
        raise ConfigError(str(exc)) from None


def _chat_template_text(value: str) -> str:
    """``model.chat_template``: the template itself, or a file holding it."""
    from .config import ConfigError

    if "{" not in value:
        p = Path(value)
        if not p.is_file():
            raise ConfigError(f"model.chat_template: {value!r} is neither a Jinja template nor an existing file")
        return p.read_text(encoding="utf-8")
    return value


def load_tokenizer(cfg: ModelConfig, run_dir: str | Path | None = None):
    if cfg.name_or_path == "tiny" and cfg.tokenizer is None:
        return build_char_tokenizer(Path(run_dir) / "tokenizer" if run_dir is not None else None)
    from transformers import AutoTokenizer

    src = gguf_source(cfg) if cfg.tokenizer is None else None
    if src is not None:  # the tokenizer (and its chat template) stored in the GGUF file
        from rubric_fast.gguf import GGUFError, load_gguf_tokenizer

        from .config import ConfigError

        try:
            tok = load_gguf_tokenizer(*src, trust_remote_code=cfg.trust_remote_code)
        except GGUFError as exc:
            raise ConfigError(str(exc)) from None
    else:
        tok = AutoTokenizer.from_pretrained(model_path(cfg.tokenizer or cfg.name_or_path,
                                                       "model.tokenizer" if cfg.tokenizer else "model.name_or_path"),
                                            trust_remote_code=cfg.trust_remote_code)
    if cfg.chat_template:
        tok.chat_template = _chat_template_text(cfg.chat_template)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_chat_template(tokenizer, rubrics, cfg: ModelConfig) -> None:
    """Prompts given as chat messages need the tokenizer's chat template: without one they would be flattened
    into text the model was never trained on. A prompt that is a single user message (a plain string in the
    dataset) is allowed without a template (it is then the text itself)."""
    if getattr(tokenizer, "chat_template", None):
        return
    from .config import ConfigError

    for r in rubrics:
        if len(r.prompt) > 1 or r.prompt[0]["role"] != "user":
            roles = ", ".join(m["role"] for m in r.prompt)
            where = r.location or f"rubric {r.id!r}"
            name = cfg.tokenizer or cfg.name_or_path
            raise ConfigError(f"model.chat_template: the tokenizer of {name} has no chat template, and {where} gives "
                              f"the prompt as chat messages ({roles}); set model.chat_template (a Jinja template "
                              "or a file holding one) or model.tokenizer to one that has a template")


def load_policy(cfg: ModelConfig, tokenizer, device: torch.device, *, pretrained: bool = True) -> nn.Module:
    """The trainable policy (LoRA-wrapped when ``model.lora.enabled``), on ``device``, in train mode.

    ``pretrained=False``: the same architecture from its config only, weights left random (a skeleton to
    load a checkpoint into, e.g. for ``rubric-fast export``: no weight download)."""
    src = gguf_source(cfg)  # first: a gguf_file with name_or_path tiny is refused
    if cfg.name_or_path == "tiny":
        model = build_tiny_model(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                                 tokenizer.bos_token_id)
    elif src is not None:  # dequantized from the GGUF file, rebuilt as a plain model
        from rubric_fast.gguf import GGUFError, load_gguf_config, load_gguf_model

        from .config import ConfigError

        folder, name = src
        attn = resolve_attn_implementation(cfg.attn_implementation)
        try:
            if pretrained:
                model = load_gguf_model(folder, name, dtype=DTYPES[cfg.dtype], attn_implementation=attn,
                                        trust_remote_code=cfg.trust_remote_code)
            else:
                from transformers import AutoModelForCausalLM

                hf_cfg = load_gguf_config(folder, name, trust_remote_code=cfg.trust_remote_code)
                hf_cfg._attn_implementation = attn
                model = AutoModelForCausalLM.from_config(hf_cfg, dtype=DTYPES[cfg.dtype],
                                                         trust_remote_code=cfg.trust_remote_code)
        except GGUFError as exc:
            raise ConfigError(str(exc)) from None
    elif not pretrained:
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_cfg = AutoConfig.from_pretrained(model_path(cfg.name_or_path), trust_remote_code=cfg.trust_remote_code)
        hf_cfg._attn_implementation = resolve_attn_implementation(cfg.attn_implementation)
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=DTYPES[cfg.dtype],
                                                 trust_remote_code=cfg.trust_remote_code)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            model_path(cfg.name_or_path), dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
            attn_implementation=resolve_attn_implementation(cfg.attn_implementation))
    check_linear_head(model)  # refuse soft-capped / scaled heads before any compute is spent
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            from .config import ConfigError

            raise ConfigError("model.lora.enabled: needs peft, which is not installed: "
                              "pip install 'rubric_fast[lora]'") from None
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
