"""Structured replies for local judges: the reply's JSON schema turned into a token-level constraint.

With ``judge.structured: true`` every judge call carries the JSON schema of the reply it asks for
(:func:`rubric_fast.judges.prompts.reply_schema`). An OpenAI-compatible server enforces it itself
(``response_format: json_schema``, vLLM's structured outputs); for the local ``hf`` judge this module does the
same inside ``generate``: the schema (the small subset the judge prompts use: objects with fixed keys in
order, strings, consts, enums, booleans, integer ranges, fixed-length arrays and tuples) becomes a template of parts,

* a literal (``{"explanation": "``, a ``const``), forced token by token;
* a free string, any token whose text holds no ``"``, backslash or control character, closed by a token that
  starts the next literal (``"``, ``",`` ...), and at most ``cap`` tokens long;
* a choice among literals (``true}`` / ``false}``), the model picking among their first tokens;

and :class:`TemplateLogitsProcessor` masks the logits of each row to the tokens its template allows next, then
forces EOS. A small model that would never write the requested JSON unprompted (SmolLM2-135M does not) so
answers in the format every time, with its own words in the explanation and its own choice of verdict.
The string cap is chosen so the whole template fits in ``max_new_tokens``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

# ------------------------------------------------------------------------------------------------ templates
LIT, STR, CHOICE = "lit", "str", "choice"
MAX_CHOICES = 100
DRIFT = 2  # spare tokens per string (see _Row)


@dataclass
class Part:
    kind: str                           # lit | str | choice
    text: str = ""                      # lit
    max_chars: int | None = None        # str: its maxLength
    options: list[str] = field(default_factory=list)   # choice


def template_from_schema(schema: dict[str, Any]) -> list[Part]:
    """The reply template of a JSON schema (ValueError for a schema outside the supported subset)."""
    parts: list[Part] = []

    def lit(t: str) -> None:
        if parts and parts[-1].kind == LIT:
            parts[-1].text += t
        else:
            parts.append(Part(LIT, t))

    def value(s: dict[str, Any]) -> None:
        if "const" in s:
            lit(json.dumps(s["const"]))
            return
        if "enum" in s:
            parts.append(Part(CHOICE, options=[json.dumps(v) for v in s["enum"]]))
            return
        t = s.get("type")
        if t == "object":
            props = s.get("properties") or {}
            lit("{")
            for i, (k, sub) in enumerate(props.items()):
                lit((", " if i else "") + json.dumps(k) + ": ")
                value(sub)
            lit("}")
        elif t == "array" and isinstance(s.get("prefixItems"), list):  # a fixed tuple of items
            lit("[")
            for i, sub in enumerate(s["prefixItems"]):
                if i:
                    lit(", ")
                value(sub)
            lit("]")
        elif t == "array":
            n = s.get("minItems")
            if n is None or n != s.get("maxItems") or not isinstance(s.get("items"), dict):
                raise ValueError("arrays need items and minItems == maxItems")
            lit("[")
            for i in range(n):
                if i:
                    lit(", ")
                value(s["items"])
            lit("]")
        elif t == "string":
            lit('"')
            parts.append(Part(STR, max_chars=s.get("maxLength")))
            lit('"')
        elif t == "boolean":
            parts.append(Part(CHOICE, options=["true", "false"]))
        elif t == "integer":
            lo, hi = s.get("minimum"), s.get("maximum")
            if lo is None or hi is None or hi - lo + 1 > MAX_CHOICES:
                raise ValueError("integers need minimum and maximum (at most 100 values)")
            parts.append(Part(CHOICE, options=[str(i) for i in range(int(lo), int(hi) + 1)]))
        else:
            raise ValueError(f"unsupported schema type {t!r}")

    value(schema)
    # a choice absorbs the literal after it, so no option's text is a prefix of another's ("1}" vs "10}")
    merged: list[Part] = []
    i = 0
    while i < len(parts):
        p = parts[i]
        if p.kind == CHOICE and i + 1 < len(parts) and parts[i + 1].kind == LIT:
            merged.append(Part(CHOICE, options=[o + parts[i + 1].text for o in p.options]))
            i += 2
            continue
        merged.append(p)
        i += 1
    return merged


# ------------------------------------------------------------------------------------------------ vocabulary
class Vocabulary:
    """Per-token text of a tokenizer and the mask of tokens allowed inside a JSON string (built once)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        n = min(len(tokenizer), vocab_size)
        self.size = vocab_size
        self.text = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        plain = torch.zeros(vocab_size, dtype=torch.bool)
        for i, t in enumerate(self.text):
            if t and i not in special and '"' not in t and "\\" not in t and "\ufffd" not in t \
                    and not any(ord(ch) < 0x20 for ch in t):
                plain[i] = True
        self.plain = plain
        self._encoded: dict[str, list[int]] = {}
        self._closers: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._encoded.get(text)
        if ids is None:
            ids = self._encoded[text] = self.tokenizer.encode(text, add_special_tokens=False)
        return ids

    def closers(self, literal: str) -> list[int]:
        """Tokens whose text is a non-empty prefix of ``literal`` (the literal that ends a string)."""
        ids = self._closers.get(literal)
        if ids is None:
            ids = self._closers[literal] = [i for i, t in enumerate(self.text) if t and literal.startswith(t)
                                            and t.startswith('"')]
            if not ids:
                ids = self._closers[literal] = self.encode(literal)[:1]
        return ids


# ------------------------------------------------------------------------------------------------ decoding
class _Row:
    """Where one reply stands in its template."""

    def __init__(self, parts: list[Part], vocab: Vocabulary, max_new_tokens: int):
        self.parts, self.vocab = parts, vocab
        fixed = sum(len(vocab.encode(p.text)) for p in parts if p.kind == LIT)
        fixed += sum(max(len(vocab.encode(o)) for o in p.options) for p in parts if p.kind == CHOICE)
        n_str = sum(p.kind == STR for p in parts)
        # a string closed by a token such as '",' leaves the rest of its literal to be encoded on its own, which
        # may take a token or two more than the literal's own encoding: DRIFT tokens per string are kept free
        need = fixed + n_str * (1 + DRIFT) + 1
        if need > max_new_tokens:
            raise ValueError(f"judge.max_new_tokens: {max_new_tokens} is too small for a structured reply (it "
                             f"needs at least {need} tokens); raise it")
        self.cap = max(1, (max_new_tokens - fixed - 1 - DRIFT * n_str) // max(1, n_str))  # the whole reply fits
        self.idx = -1
        self.done = False
        self._enter(0)

    def _enter(self, idx: int, literal: str | None = None) -> None:
        self.idx = idx
        if idx >= len(self.parts):
            self.done = True
            return
        p = self.parts[idx]
        if p.kind == LIT:
            text = p.text if literal is None else literal
            self.pending = list(self.vocab.encode(text))
            if not self.pending:
                self._enter(idx + 1)
        elif p.kind == CHOICE:
            self.alive = [list(self.vocab.encode(o)) for o in p.options]
            self.pos = 0
        else:
            self.count, self.chars = 0, 0

    def allowed(self, eos: int) -> torch.Tensor | list[int]:
        if self.done:
            return [eos]
        p = self.parts[self.idx]
        if p.kind == LIT:
            return self.pending[:1]
        if p.kind == CHOICE:
            return sorted({a[self.pos] for a in self.alive if len(a) > self.pos})
        closers = self.vocab.closers(self.parts[self.idx + 1].text)
        if self.count >= self.cap or (p.max_chars is not None and self.chars >= p.max_chars):
            return closers
        mask = self.vocab.plain.clone()
        mask[closers] = True
        return mask

    def advance(self, token: int) -> None:
        if self.done:
            return
        p = self.parts[self.idx]
        if p.kind == LIT:
            self.pending.pop(0)
            if not self.pending:
                self._enter(self.idx + 1)
        elif p.kind == CHOICE:
            self.alive = [a for a in self.alive if len(a) > self.pos and a[self.pos] == token]
            self.pos += 1
            if not self.alive or any(len(a) == self.pos for a in self.alive):
                self._enter(self.idx + 1)
        else:
            closing = self.parts[self.idx + 1].text
            t = self.vocab.text[token] if token < len(self.vocab.text) else ""
            if t and t.startswith('"') and closing.startswith(t):
                self._enter(self.idx + 1, literal=closing[len(t):])
            else:
                self.count += 1
                self.chars += len(t)


class TemplateLogitsProcessor:
    """Masks each row's logits to what its template allows next (a transformers logits processor).

    ``templates[i]`` is the template of row i, or None (unconstrained). At step t the processor learns the
    token chosen at step t-1 from the last column of ``input_ids``."""

    def __init__(self, templates: list[list[Part] | None], vocab: Vocabulary, *, eos_token_id: int,
                 max_new_tokens: int):
        self.rows = [None if t is None else _Row(t, vocab, max_new_tokens) for t in templates]
        self.eos = eos_token_id
        self.started = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.started:
            last = input_ids[:, -1].tolist()
            for row, tok in zip(self.rows, last):
                if row is not None:
                    row.advance(int(tok))
        self.started = True
        for i, row in enumerate(self.rows):
            if row is None:
                continue
            allowed = row.allowed(self.eos)
            if isinstance(allowed, torch.Tensor):
                keep = allowed[:scores.shape[1]].to(scores.device)
            else:
                keep = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
                keep[allowed] = True
            scores[i] = scores[i].masked_fill(~keep, float("-inf"))
        return scores
