"""A tiny causal LM and character-level tokenizer built offline, so the examples run anywhere in seconds.

Real runs pass a Hugging Face model name instead (``--model Qwen/Qwen2.5-0.5B-Instruct``).
"""

from __future__ import annotations

import string


def tiny_tokenizer():
    """Character-level tokenizer (lowercase letters, digits, punctuation, space) with pad/eos tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + " .,!?'-:\n")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    # a plain chat template, for conversational datasets
    out.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    return out


def tiny_model(tokenizer, *, hidden_size: int = 32, num_layers: int = 2, seed: int = 0, tie: bool = False):
    """A 2-layer Llama from a config (random weights): enough to exercise every code path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def load_model_and_tokenizer(name: str | None):
    """``name`` None or "tiny": the offline tiny model; otherwise ``AutoModelForCausalLM.from_pretrained(name)``."""
    if name in (None, "", "tiny"):
        tok = tiny_tokenizer()
        return tiny_model(tok), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(name), tok
