"""Configuration fields declared once: type (the annotation), default, help and check together.

    @dataclass
    class RolloutConfig:
        temperature: float = setting(1.0, "sampling temperature; also the loss's log-prob temperature",
                                     check=lambda v: v > 0, accepts="a number > 0")
        engine: str = setting("hf", "generation engine", choices=("hf", "vllm"))

:func:`check_fields` runs the declared checks of one dataclass instance (``ValueError`` naming the dotted key
and what is accepted); :func:`describe` walks a dataclass tree for ``rubric-fast train --help-config``.
Cross-field rules (one key needs another) stay with the code that owns them, beside the fields.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, Iterator

__all__ = ["FieldDoc", "setting", "as_dict", "check_fields", "check_tree", "describe", "format_help", "type_name"]


def setting(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | Any = MISSING,
            choices: tuple | list | None = None, check: Callable[[Any], bool] | None = None,
            accepts: str | None = None, internal: str | None = None, meta: dict[str, Any] | None = None) -> Any:
    """A dataclass field with its help and check.

    ``choices``: the accepted values (``None`` among them for a nullable key). ``check`` / ``accepts``: a
    predicate on the (type-checked) value and the words that say what it accepts. ``internal``: not a user
    setting (the reason is the error a user who sets it gets); hidden from the help. ``meta``: more metadata
    for the code that owns the section (e.g. which judge types take a judge key)."""
    if check is not None and not accepts:
        raise TypeError("setting(check=...) needs accepts=, the words an error shows")
    md: dict[str, Any] = {**(meta or {}), "help": help}
    if choices is not None:
        md["choices"] = tuple(choices)
    if check is not None:
        md["check"] = (check, accepts)
    if internal is not None:
        md["internal"] = internal
    if factory is not MISSING:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


def _shown(v: Any) -> str:
    if v is None:
        return "null"
    if v is True or v is False:
        return "true" if v else "false"
    return str(v)


def accepted(f: dataclasses.Field) -> str:
    """What a field accepts, in words ('' when only its type says it)."""
    md = f.metadata
    if "choices" in md:
        return ", ".join(_shown(c) for c in md["choices"])
    if "check" in md:
        return md["check"][1]
    return ""


def check_fields(obj: Any, prefix: str = "") -> None:
    """Run the declared checks of ``obj``'s own fields (not of nested sections); ValueError naming the key."""
    for f in dataclasses.fields(obj):
        md = f.metadata
        v = getattr(obj, f.name)
        tps = _TYPES.get(f.type)
        if tps is None:
            tps = _TYPES[f.type] = _plain_types(f.type)
        want = _type_error(v, tps)
        if want:
            raise ValueError(f"{prefix}{f.name}: expected {want}, got {v!r}")
        if "choices" in md and v not in md["choices"]:
            raise ValueError(f"{prefix}{f.name}: got {v!r}; accepted: {accepted(f)}")
        if "check" in md and not (v is None and _nullable(f)):
            ok, words = md["check"]
            try:
                good = v is not None and bool(ok(v))
            except TypeError:
                good = False
            if not good:
                raise ValueError(f"{prefix}{f.name}: got {v!r}; expected {words}")


_PLAIN = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}
_TYPES: dict[Any, tuple[type, ...]] = {}  # annotation -> _plain_types(annotation): a config checks every field
_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _plain_types(tp: Any) -> tuple[type, ...]:
    """The annotation as a tuple of plain types, read without evaluating it (no ``typing.get_type_hints``, so
    a config built inside ``torch.compile`` traces): ``"float | None"`` -> ``(float, NoneType)``; ``()`` when
    it holds anything else (containers, other classes: left to the code that reads them)."""
    if not isinstance(tp, str):
        return (tp,) if tp in _WORDS else ()
    names = [n.strip() for n in tp.split("|")]
    if not all(n in _PLAIN for n in names):
        return ()
    return tuple(_PLAIN[n] for n in names)


def _fits(v: Any, t: type) -> bool:
    if t is type(None):
        return v is None
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, numbers.Real) and not isinstance(v, bool)
    return isinstance(v, t)


def _type_error(v: Any, tps: tuple[type, ...]) -> str:
    """'' when ``v`` fits one of the plain types (or there are none to check), else what was expected."""
    if not tps or any(_fits(v, t) for t in tps):
        return ""
    words = [_WORDS[t] for t in tps if t in _WORDS]
    return " or ".join(words) + (" or null" if type(None) in tps else "")


def _nullable(f: dataclasses.Field) -> bool:
    """Whether the annotation allows ``None`` (a check is about the value when one is given)."""
    return "None" in str(f.type) or "Optional" in str(f.type)


def as_dict(obj: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` without the internal fields: what a user can set, as plain data."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if "internal" in f.metadata:
            continue
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out[f.name] = as_dict(v)
        else:
            out[f.name] = copy.deepcopy(v)
    return out


def check_tree(obj: Any, prefix: str = "") -> None:
    """:func:`check_fields` over ``obj`` and every nested dataclass section, depth first."""
    check_fields(obj, prefix)
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            check_tree(v, f"{prefix}{f.name}.")


def type_name(tp: Any) -> str:
    """``int``, ``float or null``, ``list of str``, ... for the help."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list or origin is tuple:
        inner = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {type_name(inner[0])}" if inner else "list"
    if origin is dict:
        return "mapping"
    if tp is Any:
        return "any"
    if tp is bool:
        return "bool"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@dataclass
class FieldDoc:
    key: str
    type: str
    default: str
    help: str
    accepts: str
    section: bool = False


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not MISSING:
        v = f.default
    elif f.default_factory is not MISSING:
        v = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(v):
        return ""
    if isinstance(v, str) and len(v) > 60:
        return repr(v[:57] + "...")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_shown(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_shown(x)}" for k, x in v.items()) + "}"
    return _shown(v)


def describe(cls: type, prefix: str = "") -> Iterator[FieldDoc]:
    """Every user setting of the dataclass tree ``cls``, in declaration order (sections before their keys)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "internal" in f.metadata:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            doc = (tp.__doc__ or "").strip().split("\n\n")[0]
            if doc.startswith(tp.__name__ + "("):  # the dataclass's generated signature, not a docstring
                doc = ""
            yield FieldDoc(prefix + f.name, "section", "", f.metadata.get("help") or " ".join(doc.split()),
                           "", section=True)
            yield from describe(tp, f"{prefix}{f.name}.")
            continue
        yield FieldDoc(prefix + f.name, type_name(tp), _default_text(f), f.metadata.get("help", ""), accepted(f))


def format_help(cls: type, *, width: int = 100, only: str | None = None) -> str:
    """The ``--help-config`` text of ``cls`` (``only``: the keys under this dotted prefix)."""
    import textwrap

    lines: list[str] = []
    for d in describe(cls):
        if only and not (d.key == only or d.key.startswith(only + ".")):
            continue
        depth = d.key.count(".") - (only.count(".") if only else 0)  # a section asked for starts at the margin
        pad = "  " * depth
        if d.section:
            lines.append("")
            lines.append(f"{pad}{d.key}:")
            if d.help:
                lines.extend(textwrap.wrap(d.help, width=width, initial_indent=pad + "  # ",
                                           subsequent_indent=pad + "  # "))
            continue
        head = f"{pad}{d.key} ({d.type})"
        if d.default != "":
            head += f" = {d.default}"
        lines.append(head)
        body = d.help
        if d.accepts:
            body = (body + " " if body else "") + f"[accepted: {d.accepts}]"
        if body:
            lines.extend(textwrap.wrap(body, width=width, initial_indent=pad + "    ",
                                       subsequent_indent=pad + "    "))
    return "\n".join(lines).lstrip("\n") + "\n"
