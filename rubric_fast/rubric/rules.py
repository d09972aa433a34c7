"""Rule checks: named, deterministic checks with parameters from the rubric (``verifier: rule``).

They live with the rubric (its loaders validate the parameters at load time); the rule judge
(:mod:`rubric_fast.judges.rule`) runs them.

``verifier_params = {"check": NAME, ...}``; every check also takes ``negate: bool``. Checks:

==================  ==========================================================================================
``regex``           ``pattern`` (required), ``flags`` (subset of "imsx"), ``mode``: search | fullmatch
``contains``        ``text`` or ``any: [...]`` or ``all: [...]``; ``case_sensitive`` (false), ``whole_word`` (false)
``not_contains``    same parameters as ``contains``; met when none of the texts occur
``length``          ``min`` / ``max`` (inclusive), ``unit``: words | chars
``count``           the number of non-overlapping matches of ``pattern`` (``flags`` as for regex; ``m`` for line
                    anchors) lies in ``min`` .. ``max`` (inclusive), e.g. exactly 3 bullet lines
``json``            the response (or its fenced block) is valid JSON; ``required_keys`` optional
``numeric``         the final answer is a number within ``abs_tol`` / ``rel_tol`` of ``answer`` (or the reference)
``normalized_match`` the final answer equals ``answer`` (or the reference) after lower-casing and stripping
                    punctuation, articles and extra spaces
``math_equiv``      the final answer is mathematically equal to ``answer`` (or the reference), via sympy
==================  ==========================================================================================

The final answer is the last ``\\boxed{...}``, else the text after the last "answer:" / "answer is", else the
whole response (``numeric`` takes its last number). Nothing from the data is ever passed to ``eval``: math
strings are checked against a whitelist of characters and names *before* sympy's ``parse_expr`` sees them,
with ``__builtins__`` removed and only the whitelisted sympy functions in scope.
"""

from __future__ import annotations

import ast
import json
import math
import re
import string
from typing import Any, Callable

from .verdict import Verdict


# --------------------------------------------------------------------------------------------- answer extraction
def _last_boxed(text: str) -> str | None:
    i = text.rfind("\\boxed")
    if i == -1:
        return None
    j = text.find("{", i)
    if j == -1:
        return None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1:k].strip()
    return None


_ANSWER_RE = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:)\s*(.+)", re.I)


def final_answer(text: str) -> str:
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    hits = _ANSWER_RE.findall(text)
    if hits:
        return hits[-1].strip().rstrip(".").strip()
    return text.strip()


_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")


def last_number(text: str) -> float | None:
    found = [m.group(0) for m in _NUMBER_RE.finditer(text) if any(ch.isdigit() for ch in m.group(0))]
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


# --------------------------------------------------------------------------------------------- safe math
_MATH_FUNCS = ("sqrt", "sin", "cos", "tan", "asin", "acos", "atan", "log", "ln", "exp", "Abs", "pi", "E", "I",
               "oo", "factorial", "binomial")
_MATH_CHARS = set(string.ascii_letters + string.digits + "+-*/^()., ")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_MAX_MATH_LEN = 200


def _latex_to_plain(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\(?:left|right|displaystyle|,|;|!|quad)", " ", s)
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/").replace("\\pi", "pi")
    s = s.replace("\\infty", "oo").replace("\\ln", "log").replace("\\log", "log")
    for _ in range(5):  # nested \frac{..}{..} and \sqrt{..}
        s2 = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"((\1)/(\2))", s)
        s2 = re.sub(r"\\sqrt\s*\{([^{}]*)\}", r"sqrt(\1)", s2)
        s2 = re.sub(r"\^\s*\{([^{}]*)\}", r"^(\1)", s2)
        if s2 == s:
            break
        s = s2
    s = s.replace("{", "(").replace("}", ")")
    return s.replace("\\", " ")


def parse_math(text: str):
    """Parse a short math answer into a sympy expression without evaluating anything from the data.

    Raises ValueError for anything outside the whitelist (characters, names, length, big exponents).
    """
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication,
        standard_transformations,
        stringify_expr,
    )

    s = _latex_to_plain(text)
    if len(s) > _MAX_MATH_LEN:
        raise ValueError(f"math answer longer than {_MAX_MATH_LEN} characters")
    bad = set(s) - _MATH_CHARS
    if bad:
        raise ValueError(f"characters not allowed in a math answer: {''.join(sorted(bad))!r}")
    if "__" in s or re.search(r"\.\s*[A-Za-z_]", s):
        raise ValueError("attribute access is not allowed in a math answer")
    if re.search(r"(\^|\*\*)\s*\(?\s*\d{4,}", s):
        raise ValueError("exponent too large")
    if s.count(",") and not re.fullmatch(r"[\d,.\s+-]+", s):
        raise ValueError("tuples are not supported")
    s = s.replace(",", "")
    local: dict[str, Any] = {}
    for name in set(_NAME_RE.findall(s)):
        if name in _MATH_FUNCS:
            continue
        if len(name) > 1:  # only whitelisted functions/constants and single-letter symbols
            raise ValueError(f"name not allowed in a math answer: {name!r}")
        local[name] = sympy.Symbol(name)
    constructors = {"Integer": sympy.Integer, "Float": sympy.Float, "Rational": sympy.Rational}
    functions: dict[str, Any] = {}
    for f in _MATH_FUNCS:
        functions[f] = {"ln": sympy.log, "E": sympy.E, "I": sympy.I, "oo": sympy.oo}.get(f) or getattr(sympy, f)
    transformations = standard_transformations + (implicit_multiplication, convert_xor)
    try:
        # sympy only tokenizes and rewrites here (implicit multiplication, ^, number literals); the result
        # is parsed with ast and built node by node from the whitelist: nothing from the data is eval'd
        code = stringify_expr(s, dict(local), {**constructors, **functions}, transformations)
        return _build_math(ast.parse(code.strip(), mode="eval").body, local, constructors, functions)
    except (SyntaxError, TypeError, ValueError, ArithmeticError, RecursionError) as exc:
        raise ValueError(f"cannot parse math answer {text!r}: {type(exc).__name__}") from None


_MAX_EXPONENT = 1000


def _build_math(node, symbols: dict[str, Any], constructors: dict[str, Any], functions: dict[str, Any]):
    """A sympy expression from the ast of sympy's rewritten math text, allowing only arithmetic, number
    literals, single-letter symbols and the whitelisted functions and constants."""
    import sympy

    def build(n):
        if isinstance(n, ast.BinOp):
            left, right = build(n.left), build(n.right)
            if isinstance(n.op, ast.Add):
                return sympy.Add(left, right, evaluate=False)
            if isinstance(n.op, ast.Sub):
                return sympy.Add(left, sympy.Mul(-1, right, evaluate=False), evaluate=False)
            if isinstance(n.op, ast.Mult):
                return sympy.Mul(left, right, evaluate=False)
            if isinstance(n.op, ast.Div):
                return sympy.Mul(left, sympy.Pow(right, -1, evaluate=False), evaluate=False)
            if isinstance(n.op, ast.Pow):
                if right.is_number and abs(complex(right)) > _MAX_EXPONENT:
                    raise ValueError("exponent too large")
                return sympy.Pow(left, right, evaluate=False)
        elif isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            v = build(n.operand)
            return sympy.Mul(-1, v, evaluate=False) if isinstance(n.op, ast.USub) else v
        elif isinstance(n, ast.Name):
            if n.id in symbols:
                return symbols[n.id]
            if n.id in functions and not callable(functions[n.id]):
                return functions[n.id]  # pi, E, I, oo
            if n.id in functions and isinstance(functions[n.id], sympy.Basic):
                return functions[n.id]
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and not n.keywords:
            name = n.func.id
            if name in constructors and all(isinstance(a, ast.Constant) and isinstance(a.value, (int, str))
                                            for a in n.args):
                return constructors[name](*(a.value for a in n.args))
            if name in functions and callable(functions[name]):
                return functions[name](*(build(a) for a in n.args))
        raise ValueError(f"not allowed in a math answer: {ast.dump(n)[:60]}")

    return build(node)


def math_equal(a: str, b: str, *, abs_tol: float = 1e-9) -> bool:
    import sympy

    ea, eb = parse_math(a), parse_math(b)
    try:
        diff = sympy.simplify(ea - eb)
        if diff == 0:
            return True
        if diff.is_number:
            return abs(complex(sympy.N(diff))) <= abs_tol
    except Exception:
        return False
    return False


# --------------------------------------------------------------------------------------------- checks
def _texts(p: dict[str, Any]) -> tuple[list[str], str]:
    if "text" in p:
        return [p["text"]], "any"
    if "any" in p:
        return list(p["any"]), "any"
    if "all" in p:
        return list(p["all"]), "all"
    raise ValueError("needs 'text', 'any' or 'all'")


def _contains(response: str, p: dict[str, Any]) -> tuple[bool, str]:
    texts, mode = _texts(p)
    flags = 0 if p.get("case_sensitive", False) else re.I
    found = []
    for t in texts:
        pat = rf"\b{re.escape(t)}\b" if p.get("whole_word", False) else re.escape(t)
        found.append(re.search(pat, response, flags) is not None)
    ok = all(found) if mode == "all" else any(found)
    hits = [t for t, f in zip(texts, found) if f]
    return ok, f"found {hits}" if hits else f"none of {texts} found"


def _regex(response: str, p: dict[str, Any]) -> tuple[bool, str]:
    flags = 0
    for ch in p.get("flags", ""):
        flags |= {"i": re.I, "m": re.M, "s": re.S, "x": re.X}[ch]
    rx = re.compile(p["pattern"], flags)
    m = rx.fullmatch(response) if p.get("mode", "search") == "fullmatch" else rx.search(response)
    return m is not None, (f"matched {m.group(0)[:40]!r}" if m else f"no match for /{p['pattern']}/")


def _length(response: str, p: dict[str, Any]) -> tuple[bool, str]:
    unit = p.get("unit", "words")
    n = len(response.split()) if unit == "words" else len(response)
    lo, hi = p.get("min"), p.get("max")
    ok = (lo is None or n >= lo) and (hi is None or n <= hi)
    return ok, f"{n} {unit} (bounds {lo}..{hi})"


def _count(response: str, p: dict[str, Any]) -> tuple[bool, str]:
    flags = 0
    for ch in p.get("flags", ""):
        flags |= {"i": re.I, "m": re.M, "s": re.S, "x": re.X}[ch]
    n = len(re.findall(p["pattern"], response, flags))
    lo, hi = p.get("min"), p.get("max")
    return (lo is None or n >= lo) and (hi is None or n <= hi), f"{n} matches of /{p['pattern']}/ (bounds {lo}..{hi})"


def _json(response: str, p: dict[str, Any]) -> tuple[bool, str]:
    text = response.strip()
    m = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.S)
    if m:
        text = m.group(1)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return False, f"invalid JSON: {exc.msg}"
    keys = p.get("required_keys") or []
    if keys:
        if not isinstance(obj, dict):
            return False, "JSON is not an object"
        absent = [k for k in keys if k not in obj]
        if absent:
            return False, f"missing keys {absent}"
    return True, "valid JSON"


def _expected(p: dict[str, Any], reference: str | None) -> str:
    if p.get("answer") is not None:
        return str(p["answer"])
    if reference is None:
        raise LookupError("no 'answer' parameter and no reference answer")
    return final_answer(reference)


def _numeric(response: str, p: dict[str, Any], reference: str | None) -> tuple[bool, str]:
    exp = _expected(p, reference)
    target = last_number(exp)
    if target is None:
        raise LookupError(f"expected answer {exp!r} is not a number")
    got = last_number(final_answer(response))
    if got is None:
        return False, "no number in the answer"
    ok = math.isclose(got, target, rel_tol=float(p.get("rel_tol", 0.0)), abs_tol=float(p.get("abs_tol", 1e-6)))
    return ok, f"answer {got} vs expected {target}"


def _normalized_match(response: str, p: dict[str, Any], reference: str | None) -> tuple[bool, str]:
    exp = normalize_answer(_expected(p, reference))
    got = normalize_answer(final_answer(response))
    return got == exp, f"answer {got!r} vs expected {exp!r}"


def _math_equiv(response: str, p: dict[str, Any], reference: str | None) -> tuple[bool, str]:
    exp = _expected(p, reference)
    got = final_answer(response)
    if normalize_answer(got) == normalize_answer(exp):
        return True, "identical answers"
    try:
        ok = math_equal(got, exp, abs_tol=float(p.get("abs_tol", 1e-9)))
    except ValueError as exc:
        if "expected" in str(exc):
            raise
        return False, f"answer not parseable as math: {exc}"
    return ok, f"answer {got!r} {'==' if ok else '!='} expected {exp!r}"


def _validate_contains(p):
    _texts(p)


def _validate_regex(p):
    if not isinstance(p.get("pattern"), str):
        raise ValueError("needs a string 'pattern'")
    if set(p.get("flags", "")) - set("imsx"):
        raise ValueError("'flags' must be a subset of 'imsx'")
    if p.get("mode", "search") not in ("search", "fullmatch"):
        raise ValueError("'mode' must be search or fullmatch")
    try:
        re.compile(p["pattern"])
    except re.error as exc:
        raise ValueError(f"invalid regex {p['pattern']!r}: {exc}") from None


def _validate_bounds(p):
    """``min`` and/or ``max``: integers >= 0 (length and count rules)."""
    if p.get("min") is None and p.get("max") is None:
        raise ValueError("needs 'min' and/or 'max'")
    for k in ("min", "max"):
        if p.get(k) is not None and (isinstance(p[k], bool) or not isinstance(p[k], int) or p[k] < 0):
            raise ValueError(f"'{k}' must be an integer >= 0")


def _validate_length(p):
    if p.get("unit", "words") not in ("words", "chars"):
        raise ValueError("'unit' must be words or chars")
    _validate_bounds(p)


def _validate_count(p):
    _validate_regex({k: v for k, v in p.items() if k != "mode"})
    _validate_bounds(p)


def _validate_nothing(p):
    return None


# name -> (validate(params), check(response, params, reference) -> (met, reason))
RULE_CHECKS: dict[str, tuple[Callable, Callable]] = {
    "regex": (_validate_regex, lambda r, p, ref: _regex(r, p)),
    "contains": (_validate_contains, lambda r, p, ref: _contains(r, p)),
    "not_contains": (_validate_contains, lambda r, p, ref: (lambda ok, why: (not ok, why))(*_contains(r, p))),
    "length": (_validate_length, lambda r, p, ref: _length(r, p)),
    "count": (_validate_count, lambda r, p, ref: _count(r, p)),
    "json": (_validate_nothing, lambda r, p, ref: _json(r, p)),
    "numeric": (_validate_nothing, _numeric),
    "normalized_match": (_validate_nothing, _normalized_match),
    "math_equiv": (_validate_nothing, _math_equiv),
}


def validate_rule_params(params: dict[str, Any]) -> None:
    """Raise ValueError naming the problem when ``params`` cannot drive a rule check."""
    if not isinstance(params, dict):
        raise ValueError("must be an object with a 'check' key")
    check = params.get("check")
    if check not in RULE_CHECKS:
        raise ValueError(f"unknown rule check {check!r}; accepted: {', '.join(sorted(RULE_CHECKS))}")
    if not isinstance(params.get("negate", False), bool):
        raise ValueError("'negate' must be true or false")
    RULE_CHECKS[check][0](params)


def run_rule(response: str, params: dict[str, Any], reference: str | None = None) -> Verdict:
    """One rule check on one response; the verdict's criterion_id is left empty for the caller."""
    check = params.get("check")
    if check not in RULE_CHECKS:
        return Verdict("", None, "", f"unknown rule check {check!r}")
    try:
        ok, why = RULE_CHECKS[check][1](response, params, reference)
    except LookupError as exc:
        return Verdict("", None, "", f"{check}: {exc}")
    if params.get("negate", False):
        ok, why = not ok, f"not ({why})"
    return Verdict("", 1.0 if ok else 0.0, f"{check}: {why}")
