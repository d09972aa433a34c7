"""``rubric-fast export RUN_DIR [--step N] --out DIR``: the trained policy in Hugging Face format.

The folder it writes holds ``config.json``, ``model.safetensors`` (sharded for large models),
``generation_config.json`` (the rollout's sampling settings) and the tokenizer, so that
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``vllm serve DIR`` load it with no rubric_fast code.
LoRA adapters are merged into the base weights; any checkpoint works, ddp (``state.pt``) or fsdp2-sharded
(``sharded/``, read in a single process). ``checkpoint.export_hf: true`` writes the same folder at the end
of training, from the live policy (``checkpoint.export_dir``, default ``<run_dir>/hf``).

Exit codes: 0 written; 2 bad input (no such run directory, no complete checkpoint, no such step, an output
folder that is not empty).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    MANIFEST,
    SHARDED_DIR,
    STATE_FILE,
    CheckpointError,
    checkpoint_problem,
    list_checkpoints,
)
from .weights import inference_weights


class ExportError(ValueError):
    """The export cannot be made; the message names the argument or file."""


# ------------------------------------------------------------------------------------------------ writing
def _plain_skeleton(model_cfg, tokenizer) -> nn.Module:
    """The policy's architecture without adapters, random weights, on the CPU: what the export fills."""
    from .models import load_policy

    plain = dataclasses.replace(model_cfg, gradient_checkpointing=False,
                                lora=dataclasses.replace(model_cfg.lora, enabled=False))
    return load_policy(plain, tokenizer, torch.device("cpu"), pretrained=False).eval()


def _generation_config(model: nn.Module, tokenizer, rollout_cfg) -> None:
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.bos_token_id = tokenizer.bos_token_id
    if rollout_cfg is not None:  # the sampling the policy was trained with
        gc.do_sample = True
        gc.temperature = rollout_cfg.temperature
        gc.top_p = rollout_cfg.top_p
        gc.top_k = rollout_cfg.top_k if rollout_cfg.top_k > 0 else None
        gc.max_new_tokens = rollout_cfg.max_new_tokens


def export_policy(policy: nn.Module, tokenizer, out: str | Path, *, model_cfg, rollout_cfg=None,
                  is_main: bool = True) -> Path:
    """Write ``policy`` (LoRA merged) with ``tokenizer`` to ``out`` in HF format; returns ``out``.

    A collective under fsdp2 (every rank gathers each parameter; only ``is_main`` keeps and writes). The
    folder appears whole or not at all: written as ``out.tmp`` and renamed, replacing an older ``out``.
    """
    out = Path(out)
    target = _plain_skeleton(model_cfg, tokenizer) if is_main else None
    wanted = dict(target.named_parameters()) if target is not None else {}
    filled: set[str] = set()
    with torch.no_grad():
        for name, t in inference_weights(policy):
            if target is None:
                continue
            if name not in wanted:
                raise ExportError(f"export: the policy has a parameter {name!r} that "
                                  f"{type(target).__name__} built from model.* does not have")
            dst = wanted[name]
            if dst.shape != t.shape:
                raise ExportError(f"export: {name}: policy shape {tuple(t.shape)} != {tuple(dst.shape)}")
            dst.copy_(t.to(device="cpu", dtype=dst.dtype))
            filled.add(name)
    if target is None:
        return out
    missing = sorted(set(wanted) - filled)
    if missing:
        raise ExportError(f"export: no weights for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    _generation_config(target, tokenizer, rollout_cfg)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    target.save_pretrained(str(tmp), safe_serialization=True)
    tok = tokenizer
    tok.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------------ reading a checkpoint
def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint to export: ``RUN_DIR`` itself when it is one, else ``step_N`` or the newest complete one
    under the run's checkpoint directory (``checkpoint.dir`` of its config.yaml, default ``RUN_DIR/checkpoints``)."""
    rd = Path(run_dir)
    if not rd.is_dir():
        raise ExportError(f"RUN_DIR: no such directory: {rd}")
    if (rd / MANIFEST).exists():
        if step is not None:
            raise ExportError(f"--step: {rd} is a checkpoint directory already; give its run directory instead")
        problem = checkpoint_problem(rd)
        if problem:
            raise ExportError(f"RUN_DIR: {problem}")
        return rd
    ckpt_dir = rd / "checkpoints"
    cfg_file = rd / "config.yaml"
    if cfg_file.exists():
        import yaml

        try:
            saved = (yaml.safe_load(cfg_file.read_text()) or {}).get("checkpoint", {}).get("dir")
        except (yaml.YAMLError, AttributeError):
            saved = None
        if saved:
            ckpt_dir = Path(saved)
    found = list_checkpoints(ckpt_dir)
    if not found:
        raise ExportError(f"RUN_DIR: no complete checkpoint in {ckpt_dir} (train with checkpoint.save_final=true "
                          "or checkpoint.every=N)")
    if step is None:
        return found[-1]
    for p in found:
        if int(p.name.split("_")[1]) == step:
            return p
    have = ", ".join(str(int(p.name.split("_")[1])) for p in found)
    raise ExportError(f"--step: no complete checkpoint for step {step} in {ckpt_dir}; available: {have}")


def _section(cls, data: dict[str, Any] | None, prefix: str, source: str):
    from .config import ConfigError, _apply

    obj = cls()
    try:
        _apply(obj, data or {}, prefix, source)
    except ConfigError as exc:
        raise ExportError(str(exc)) from None
    return obj


def load_checkpoint_policy(ckpt: Path, run_dir: Path | None = None):
    """(policy as trained, tokenizer, model config, rollout config) rebuilt on the CPU from a checkpoint."""
    from .config import ModelConfig, RolloutConfig
    from .models import build_char_tokenizer, load_policy, load_tokenizer

    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    saved = state.get("config") or {}
    model_cfg = _section(ModelConfig, saved.get("model"), "model.", str(ckpt / STATE_FILE))
    rollout_cfg = _section(RolloutConfig, saved.get("rollout"), "rollout.", str(ckpt / STATE_FILE))
    tok_dirs = [d / "tokenizer" for d in (run_dir, ckpt.parent.parent) if d is not None]
    tok_dir = next((d for d in tok_dirs if (d / "tokenizer_config.json").exists()), None)
    if tok_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    elif model_cfg.name_or_path == "tiny" and model_cfg.tokenizer is None:
        tokenizer = build_char_tokenizer()  # deterministic: the same vocabulary the run used
    else:
        tokenizer = load_tokenizer(model_cfg)
    policy = load_policy(model_cfg, tokenizer, torch.device("cpu"), pretrained=False)
    if "model" in state:
        policy.load_state_dict(state["model"])
    elif (ckpt / SHARDED_DIR).is_dir():
        _load_sharded_model(ckpt / SHARDED_DIR, policy)
    else:
        raise ExportError(f"{ckpt}: neither model weights in {STATE_FILE} nor a {SHARDED_DIR}/ directory")
    return policy.eval(), tokenizer, model_cfg, rollout_cfg


def _load_sharded_model(path: Path, policy: nn.Module) -> None:
    """The model part of an fsdp2 checkpoint (torch.distributed.checkpoint), read in this one process.

    The trainer saved ``get_state_dict(PolicyForward(policy), optimizer)`` as ``{"model": ..., "optim": ...}``,
    so the model's tensors are stored as ``model.policy.<name>``; only those are read (not the optimizer)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    own = policy.state_dict()
    want = {f"policy.{k}": torch.empty_like(v) for k, v in own.items() if f"model.policy.{k}" in stored}
    if not want:
        raise ExportError(f"{path}: no model tensors (expected keys model.policy.*): not a rubric_fast checkpoint")
    dcp.load({"model": want}, checkpoint_id=str(path), no_dist=True)
    result = policy.load_state_dict({k.removeprefix("policy."): v for k, v in want.items()}, strict=False)
    tied = {n for n, _ in policy.named_parameters(remove_duplicate=False)} - {n for n, _ in policy.named_parameters()}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise ExportError(f"{path}: the checkpoint lacks {', '.join(missing[:5])}: it was written by another model")


def export_checkpoint(run_dir: str | Path, out: str | Path, *, step: int | None = None,
                      force: bool = False) -> tuple[Path, Path]:
    """Export one checkpoint of a run; returns (the checkpoint used, the folder written)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(f"--out: {out} exists and is not an empty directory (pass --force to replace it)")
    ckpt = find_checkpoint(run_dir, step)
    try:
        policy, tokenizer, model_cfg, rollout_cfg = load_checkpoint_policy(ckpt, Path(run_dir))
    except (CheckpointError, OSError, RuntimeError) as exc:
        raise ExportError(f"{ckpt}: cannot load it: {str(exc).splitlines()[0]}") from None
    return ckpt, export_policy(policy, tokenizer, out, model_cfg=model_cfg, rollout_cfg=rollout_cfg)


# ------------------------------------------------------------------------------------------------ command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or one checkpoint directory in it)")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (HF format, safetensors)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")


def run(args: argparse.Namespace) -> int:
    try:
        ckpt, out = export_checkpoint(args.run_dir, args.out, step=args.step, force=args.force)
    except ExportError as exc:
        print(f"rubric-fast export: {exc}", file=sys.stderr)
        return 2
    files = sorted(p.name for p in out.iterdir())
    print(json.dumps({"checkpoint": str(ckpt), "out": str(out), "files": files}))
    return 0
