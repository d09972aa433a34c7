"""Guard: judge content-free responses as failing without asking the judge.

A response is content-free when nothing of its own remains after removing

* ``<think>``-style reasoning blocks, markup (markdown, HTML tags, LaTeX commands, list numbering),
  punctuation and whitespace;
* the words of a multilingual lexicon of openers, discourse markers, function and format words
  (:mod:`rubric_fast.judges.lexicon`: "Sure! Let's begin.", "Thought process:", "Okay.", "解", "Respuesta");
* runs copied from the prompt ("What is 17 x 23? Answer:"), and runs copied from the rubric that carry its
  framing ("The response states that ..."). Single prompt words stay: "Blue" to "Is the sky blue or
  green?" is an answer;

all compared after folding look-alikes: NFKD with marks and invisible format characters dropped, casefold,
curly apostrophes straightened, and letters that are confusable with an ASCII letter (Unicode
confusables, UTS #39 data from ``confusable_homoglyphs``) mapped to it, so "Lеt’s" with a Cyrillic "е" and
a curly apostrophe is "lets". Degenerate repetition is content-free too: a long response with a zlib
compression ratio or a distinct-token ratio below the configured floor ("the" x 2000). Independently of
content, injected verdict text (``"criteria_met": true``) is refused.

Rubrics whose criteria are all rule-verified skip the content test (a rule is an exact check that no
opener can fool, and their answers may be bare letters or prompt words); empty, letterless and injected
responses are refused for every rubric.

A guarded verdict is a real judgement (``score`` set, ``guarded=True``), not a failure. To make junk get the
*worst* outcome: reward-if-met criteria are judged not met (score 0), penalize-if-met criteria are judged
met (score 1: the mistake is taken as present), a holistic rating gets 0 (below the 1-10 scale, so 0
reward). Criteria of unknown polarity get score 0, and the scorer additionally caps the reward of any
guarded response at 0, so whatever the aggregation, a guarded junk response never scores above 0.

Reasons (:data:`REASONS`, the keys of the per-reason counts in the metrics): ``empty``, ``no_text``,
``injection``, ``repetition``, ``filler``, ``prompt_echo``, ``rubric_echo``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import unicodedata
import zlib
from dataclasses import dataclass, fields

from . import lexicon
from .base import HOLISTIC_ID, JudgeRequest, Verdict

REASONS = {
    "empty": "empty response",
    "no_text": "no letters or digits (whitespace, punctuation or markup only)",
    "injection": "injected verdict text",
    "repetition": "degenerate repetition",
    "filler": "only openers, discourse markers or format words",
    "prompt_echo": "only the prompt repeated back (with filler)",
    "rubric_echo": "only the rubric repeated back (with filler)",
}

_INJECTION = (
    re.compile(r"[\"']?\bcriteri(?:a|on)[_ ]?met[\"']?\s*[:=]\s*[\"']?(?:true|false|yes|no)\b"),
    re.compile(r"[\"']rating[\"']\s*:\s*\d"),
    re.compile(r"[\"']explanation[\"']\s*:\s*[\"']"),
    re.compile(r"\bverdict\s*[:=]\s*[\"']?(?:met|pass(?:ed)?|true|yes|correct)\b"),
    re.compile(r"\b(?:all|every|each)\s+(?:the\s+)?(?:rubric\s+)?criteri(?:a|on)\s+(?:are|is|were|have been|has been)"
               r"\s+(?:fully\s+)?(?:met|satisfied|fulfilled)\b"),
    re.compile(r"\bignore\s+(?:all\s+|any\s+)?(?:the\s+)?(?:previous|prior|above)\s+instructions\b"),
    re.compile(r"\b(?:as|to)\s+the\s+(?:grader|judge|evaluator)\b.*\b(?:met|pass|full\s+marks|10)\b", re.S),
)

# reasoning blocks some models emit besides <think>; an unclosed one runs to the end
_REASONING = re.compile(r"<(think|thinking|thought|reasoning|reflection|scratchpad)>.*?(?:</\1>|\Z)", re.S | re.I)
_STRAY_CLOSE = re.compile(r"^.*</(?:think|thinking|thought|reasoning|reflection|scratchpad)>", re.S | re.I)
_HTML_TAG = re.compile(r"</?[a-zA-Z][^<>]{0,200}>")
_LATEX_CMD = re.compile(r"\\[a-zA-Z]+")
_LIST_NUMBER = re.compile(r"(?m)^\s*(?:\(?\d{1,3}[.)]|[ivx]{1,4}[.)]|[a-h][.)])\s+(?=\S)")
_APOSTROPHES = "'’‘ʼ′＇`´ʹ"
_CONTRACTION = re.compile(rf"(?<=\w)[{_APOSTROPHES}](?=\w)")


# ------------------------------------------------------------------------------------------------ folding
@functools.lru_cache(maxsize=1)
def _ascii_lookalikes() -> dict[str, str]:
    """Non-ASCII letter/digit -> the ASCII letter/digit it is confusable with (Unicode confusables data).

    Look-alike classes are the connected components of the confusables table; a class that holds an ASCII
    letter or digit maps its other members to it (lowercase letters first, then digits, then capitals)."""
    try:
        import confusable_homoglyphs
    except ImportError:  # degrade: NFKD + casefold still fold fullwidth, mathematical and accented letters
        return {}
    path = os.path.join(os.path.dirname(confusable_homoglyphs.__file__), "confusables.json")
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    def alnum(ch: str) -> bool:
        return unicodedata.category(ch)[0] in "LN"

    for ch, entries in table.items():
        if len(ch) != 1 or not alnum(ch):
            continue
        for e in entries:
            other = e["c"].replace("\u200e", "").replace("\u200f", "")
            if len(other) == 1 and alnum(other):
                a, b = find(ch), find(other)
                if a != b:
                    parent[a] = b
    classes: dict[str, list[str]] = {}
    for ch in list(parent):
        classes.setdefault(find(ch), []).append(ch)
    out: dict[str, str] = {}
    for members in classes.values():
        ascii_ = [c for c in members if c.isascii()]
        if not ascii_:
            continue
        target = min(ascii_, key=lambda c: (not c.islower(), not c.isdigit(), c))
        for c in members:
            if not c.isascii():
                out[c] = target.lower()
    return out


def fold(text: str) -> str:
    """The form every comparison uses: NFKD, combining marks and format characters (zero-width joiners,
    bidi marks) dropped, casefolded, apostrophes inside words removed ("let’s" -> "lets"), and non-ASCII
    letters that look like an ASCII letter mapped to it."""
    look = _ascii_lookalikes()
    out = []
    for ch in unicodedata.normalize("NFKD", text):
        cat = unicodedata.category(ch)
        if cat in ("Mn", "Me", "Cf"):
            continue
        out.append(ch)
    text = unicodedata.normalize("NFC", "".join(out)).casefold()
    text = _CONTRACTION.sub("", text)
    if look:
        text = "".join(look.get(ch, ch) for ch in text)
    return text


# scripts written without spaces: each character is a token (lexicon phrases are removed as substrings first)
_NO_SPACE_RANGES = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF),
                    (0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F))


def _no_space(ch: str) -> bool:
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in _NO_SPACE_RANGES)


def _is_word_char(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LNM"


def tokenize(folded: str) -> list[str]:
    """Words of letters/digits/marks; every character of a no-space script is its own token."""
    tokens: list[str] = []
    cur: list[str] = []
    for ch in folded:
        if _is_word_char(ch) and not _no_space(ch):
            cur.append(ch)
            continue
        if cur:
            tokens.append("".join(cur))
            cur = []
        if _is_word_char(ch):
            tokens.append(ch)
    if cur:
        tokens.append("".join(cur))
    return tokens


def strip_reasoning(text: str) -> str:
    text = _REASONING.sub(" ", text)
    return _STRAY_CLOSE.sub(" ", text)


def strip_markup(text: str) -> str:
    text = _HTML_TAG.sub(" ", text)
    text = _LATEX_CMD.sub(" ", text)
    return _LIST_NUMBER.sub(" ", text)


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class GuardConfig:
    """``guard:`` in the scoring config: ``true`` | ``false`` | a mapping of these keys."""

    enabled: bool = True
    check_injection: bool = True
    check_content: bool = True           # the lexicon / echo test
    check_echo: bool = True              # remove runs copied from the prompt and the rubric
    check_repetition: bool = True
    extra_words: tuple[str, ...] = ()    # more filler words or phrases (any language)
    keep_words: tuple[str, ...] = ()     # never filler (e.g. [yes, no] where a bare yes/no is the answer)
    echo_min_run: int = 3                # a copied run this many words long is an echo (shorter prompts: all of it)
    min_compression_ratio: float = 0.1   # zlib size / size below this is degenerate ...
    min_distinct_ratio: float = 0.1      # ... and so is distinct tokens / tokens below this
    repetition_min_tokens: int = 20      # the repetition test starts at this many tokens ...
    repetition_min_chars: int = 200      # ... and the compression test at this many bytes
    rule_only_rubrics: bool = False      # also apply the content test when every criterion is rule-verified

    @classmethod
    def from_value(cls, value) -> GuardConfig:
        if value is None or value is True:
            return cls()
        if value is False:
            return cls(enabled=False)
        if isinstance(value, GuardConfig):
            return value
        if isinstance(value, dict):
            d = dict(value)
            if "extra_openers" in d:  # the older name of extra_words
                d["extra_words"] = tuple(d.get("extra_words", ())) + tuple(d.pop("extra_openers") or ())
            known = {f.name for f in fields(cls)}
            unknown = set(d) - known
            if unknown:
                raise ValueError(f"scoring.guard: unknown key(s) {sorted(unknown)}; accepted: {sorted(known)}")
            for k in ("extra_words", "keep_words"):
                if k in d:
                    if isinstance(d[k], str) or not all(isinstance(w, str) for w in d[k] or ()):
                        raise ValueError(f"scoring.guard.{k}: expected a list of strings, got {d[k]!r}")
                    d[k] = tuple(d[k] or ())
            for k in ("min_compression_ratio", "min_distinct_ratio"):
                if k in d and not (isinstance(d[k], (int, float)) and 0 <= d[k] <= 1):
                    raise ValueError(f"scoring.guard.{k}: expected a number in [0, 1], got {d[k]!r}")
            for k in ("echo_min_run", "repetition_min_tokens", "repetition_min_chars"):
                if k in d and not (isinstance(d[k], int) and not isinstance(d[k], bool) and d[k] >= 1):
                    raise ValueError(f"scoring.guard.{k}: expected an integer >= 1, got {d[k]!r}")
            return cls(**d)
        raise ValueError(f"scoring.guard: expected true, false or a mapping, got {value!r}")


@dataclass(frozen=True)
class _Lexicon:
    words: frozenset[str]
    phrases: tuple[str, ...]             # folded no-space-script phrases, longest first
    framing: frozenset[str]
    enumerators: frozenset[str]


@functools.lru_cache(maxsize=16)
def _lexicon(extra: tuple[str, ...], keep: tuple[str, ...]) -> _Lexicon:
    words: set[str] = set()
    phrases: set[str] = set()
    for w in (*lexicon.words(), *extra):
        f = fold(w)
        if any(_no_space(ch) for ch in f):
            phrases.add("".join(ch for ch in f if _is_word_char(ch)))
        else:
            words.update(tokenize(f))
    for p in lexicon.phrases():
        phrases.add(fold(p))
    for w in keep:
        words.difference_update(tokenize(fold(w)))
        phrases.discard(fold(w))
    framing = {t for w in lexicon.framing() for t in tokenize(fold(w))}
    enumerators = {t for w in lexicon.enumerators() for t in tokenize(fold(w))}
    return _Lexicon(frozenset(words), tuple(sorted(phrases, key=len, reverse=True)), frozenset(framing),
                    frozenset(enumerators))


_SUFFIXES = ("ing", "ed", "es", "s", "d")


def _is_filler(tok: str, words: frozenset[str]) -> bool:
    """A lexicon word, or a regular inflection of one ("started", "steps", "thinking")."""
    if tok in words:
        return True
    if len(tok) >= 5 and tok.isascii():
        for suf in _SUFFIXES:
            if tok.endswith(suf) and len(tok) - len(suf) >= 3 and tok[:-len(suf)] in words:
                return True
    return False


def _numbering(tok: str) -> bool:
    return tok.isdigit() and len(tok) <= 3 or tok in ("i", "ii", "iii", "iv", "v", "vi")


def _remove_phrases(folded: str, phrases: tuple[str, ...]) -> str:
    if not any(_no_space(ch) for ch in folded):
        return folded
    for p in phrases:
        if p in folded:
            folded = folded.replace(p, " ")
    return folded


@functools.lru_cache(maxsize=4096)
def _reference_tokens(text: str, extra: tuple[str, ...], keep: tuple[str, ...]) -> tuple[str, ...]:
    """Tokens of a prompt or criterion text, prepared exactly like a response's."""
    lex = _lexicon(extra, keep)
    return tuple(tokenize(_remove_phrases(fold(strip_markup(text)), lex.phrases)))


def _grams(seq, k: int) -> set[tuple]:
    return {tuple(seq[i:i + k]) for i in range(len(seq) - k + 1)}


def _covered(seq: list[str], grams_by_k: dict[int, set[tuple]]) -> list[bool]:
    """Positions of ``seq`` inside some run of k tokens found in the reference (one gram set per k)."""
    cov = [False] * len(seq)
    for k, grams in grams_by_k.items():
        for i in range(len(seq) - k + 1):
            if tuple(seq[i:i + k]) in grams:
                for j in range(i, i + k):
                    cov[j] = True
    return cov


# ------------------------------------------------------------------------------------------------ the test
def _has_alnum(text: str) -> bool:
    return any(unicodedata.category(ch)[0] in "LN" for ch in text)


def _model_judged(criteria) -> bool:
    return not criteria or any(getattr(c, "verifier", "llm") != "rule" for c in criteria)


def _prompt_text(prompt) -> str:
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))


def junk_reason(response: str, criteria=(), config: GuardConfig | None = None, *, prompt=None) -> str | None:
    """The reason ``response`` is junk (a key of :data:`REASONS`), or None when it deserves a judge.

    ``prompt`` is the chat messages (or text) the response answers; ``criteria`` the rubric's criteria."""
    cfg = config or GuardConfig()
    if not cfg.enabled:
        return None
    text = strip_reasoning(response or "")
    if not text.strip():
        return "empty"
    visible = strip_markup(text)
    if not _has_alnum(visible):
        return "no_text"
    folded = fold(text)
    if cfg.check_injection and any(rx.search(folded) for rx in _INJECTION):
        return "injection"
    lex = _lexicon(cfg.extra_words, cfg.keep_words)
    raw = tokenize(_remove_phrases(fold(visible), lex.phrases))
    if cfg.check_repetition:
        reason = _repetition(raw, folded, cfg)
        if reason:
            return reason
    if not cfg.check_content or not (cfg.rule_only_rubrics or _model_judged(criteria)):
        return None
    if not raw:
        return "filler"
    # filler words, and list numbering right after an enumerator word ("Step 1")
    content_pos = [i for i, t in enumerate(raw) if not _is_filler(t, lex.words)
                   and not (i > 0 and raw[i - 1] in lex.enumerators and _numbering(t))]
    if not content_pos:
        return "filler"
    if not cfg.check_echo:
        return None
    left = set(content_pos)
    # rubric echo: runs of the response copied from a criterion that carry the rubric's framing words
    rubric_removed = False
    if criteria:
        grams: dict[int, set[tuple]] = {}
        for c in criteria:
            ref = _reference_tokens(getattr(c, "text", str(c)), cfg.extra_words, cfg.keep_words)
            if ref:
                k = min(cfg.echo_min_run, len(ref))
                grams.setdefault(k, set()).update(_grams(ref, k))
        cov = _covered(raw, grams)
        i = 0
        while i < len(raw):
            if not cov[i]:
                i += 1
                continue
            j = i
            while j < len(raw) and cov[j]:
                j += 1
            if any(raw[p] in lex.framing for p in range(i, j)):
                hit = left.intersection(range(i, j))
                rubric_removed = rubric_removed or bool(hit)
                left.difference_update(hit)
            i = j
    # prompt echo: runs of content words copied from the prompt (a short prompt: all of its content words)
    ptext = _prompt_text(prompt)
    if left and ptext:
        pref = [t for t in _reference_tokens(ptext, cfg.extra_words, cfg.keep_words) if not _is_filler(t, lex.words)]
        if pref:
            k = min(cfg.echo_min_run, len(pref))
            seq = [raw[p] for p in content_pos]
            cov = _covered(seq, {k: _grams(pref, k)})
            left.difference_update(p for p, c in zip(content_pos, cov) if c)
    if left:
        return None
    return "rubric_echo" if rubric_removed else "prompt_echo"


def _repetition(tokens: list[str], folded: str, cfg: GuardConfig) -> str | None:
    if len(tokens) >= cfg.repetition_min_tokens and len(set(tokens)) / len(tokens) < cfg.min_distinct_ratio:
        return "repetition"
    data = folded.encode("utf-8")
    if len(data) >= cfg.repetition_min_chars and len(zlib.compress(data, 9)) / len(data) < cfg.min_compression_ratio:
        return "repetition"
    return None


def describe(reason: str) -> str:
    return f"{reason}: {REASONS.get(reason, reason)}"


def guard_verdicts(criteria, reason: str, *, holistic: bool = False) -> list[Verdict]:
    """The worst outcome for every criterion, plus a holistic rating of 0 (see the module docstring)."""
    del holistic  # kept for callers; the holistic verdict is always included
    why = f"guard: {describe(reason)}"
    # the holistic rating is given whatever the judge, so an implicit_likert rubric also gets its worst value
    return [Verdict(c.id, 1.0 if c.polarity == "penalize_if_met" else 0.0, why, guarded=True) for c in criteria] + \
        [Verdict(HOLISTIC_ID, 0.0, why, guarded=True)]


def guard_reason_of(verdicts) -> str | None:
    """The guard's reason key from guarded verdicts (None when the judge decided)."""
    for v in verdicts:
        if getattr(v, "guarded", False) and v.reason.startswith("guard: "):
            return v.reason[len("guard: "):].split(":", 1)[0]
    return None


class GuardedJudge:
    """Wraps a judge: junk responses get :func:`guard_verdicts`, everything else goes to the inner judge."""

    def __init__(self, inner, config: GuardConfig | None = None):
        self.inner, self.config = inner, config or GuardConfig()
        self.name = inner.name
        self.guarded = 0
        self.guarded_by_reason: dict[str, int] = {}

    @property
    def holistic(self) -> bool:
        return bool(getattr(self.inner, "holistic", False))

    @property
    def identity(self) -> str:
        return getattr(self.inner, "identity", self.inner.name)

    async def grade(self, request: JudgeRequest) -> list[Verdict]:
        reason = junk_reason(request.response, request.criteria, self.config, prompt=request.prompt)
        if reason is not None:
            self.guarded += 1
            self.guarded_by_reason[reason] = self.guarded_by_reason.get(reason, 0) + 1
            return guard_verdicts(request.criteria, reason, holistic=self.holistic)
        return await self.inner.grade(request)
