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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rubric_fast.reference.group_advantages import ESTIMATORS, SCALES
from rubric_fast.reference.types import PolicyLossConfig
from rubric_fast.rubric.loaders import FORMATS
from rubric_fast.scoring.config import JudgeConfig
from rubric_fast.scoring.scorer import ScorerConfig
from rubric_fast.settings import as_dict as settings_dict, check_tree, format_help, setting, type_name

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
# Every field is declared once: type (the annotation), default, help and check (rubric_fast/settings.py).
# ``rubric-fast train --help-config`` prints them; docs/config.md maps TRL's GRPOConfig names to these keys.
_INT_GE1 = dict(check=lambda v: v >= 1, accepts="an integer >= 1")
_INT_GE0 = dict(check=lambda v: v >= 0, accepts="an integer >= 0")
_POS = dict(check=lambda v: v > 0, accepts="a number > 0")
_NONNEG = dict(check=lambda v: v >= 0, accepts="a number >= 0")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TinyModelConfig:
    """Shape of the built-in tiny model (``model.name_or_path: tiny``): built from a config, no download."""

    arch: str = setting("llama", "the transformers architecture", choices=("llama", "qwen2"))
    hidden_size: int = setting(64, "hidden size (a multiple of num_heads)", **_INT_GE1)
    num_layers: int = setting(2, "decoder layers", **_INT_GE1)
    num_heads: int = setting(4, "attention heads", **_INT_GE1)
    intermediate_size: int = setting(128, "MLP width", **_INT_GE1)
    tie_word_embeddings: bool = setting(True, "the LM head shares the embedding matrix")


@dataclass
class LoraConfig:
    """LoRA adapters on the policy (the ``lora`` extra: peft); only the adapters train."""

    enabled: bool = setting(False, "train LoRA adapters instead of every weight")
    r: int = setting(8, "adapter rank", **_INT_GE1)
    alpha: float = setting(16.0, "adapter scale numerator (the update is scaled by alpha / r)", **_POS)
    dropout: float = setting(0.0, "dropout on the adapter input", check=lambda v: 0 <= v < 1,
                             accepts="a number in [0, 1)")
    target_modules: list[str] = setting(factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                        help="module names that get adapters")


@dataclass
class ModelConfig:
    """The policy."""

    name_or_path: str = setting("tiny", "a Hugging Face hub id or local folder, pkg:<package> (an installed "
                                "package's folder), or tiny (built from model.tiny, no download)")
    tokenizer: str | None = setting(None, "tokenizer id or folder; null = name_or_path (tiny: a char-level one)")
    gguf_file: str | None = setting(None, "a .gguf file in name_or_path (or auto: the only one), loaded "
                                    "dequantized (rubric_fast/gguf.py)")
    chat_template: str | None = setting(None, "a Jinja chat template (or a file holding one) replacing the "
                                        "tokenizer's; message prompts need one")
    dtype: str = setting("float32", "weights and compute dtype", choices=_DTYPES)
    attn_implementation: str = setting("auto", "attention kernels: auto = flash_attention_2 when flash-attn is "
                                       "installed, else sdpa", choices=("auto", "sdpa", "eager", "flash_attention_2"))
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward (less memory)")
    trust_remote_code: bool = setting(False, "let transformers run the model repository's own code")
    tiny: TinyModelConfig = setting(factory=TinyModelConfig)
    lora: LoraConfig = setting(factory=LoraConfig)


@dataclass
class DataConfig:
    """The training prompts and their rubrics."""

    path: str = setting(str(DEFAULT_DATASET), "a rubric dataset (rubric_fast jsonl, HealthBench, RaR, verl "
                        "parquet, OpenRubrics); relative paths in a config file may be relative to the file")
    format: str = setting("auto", "the dataset's format; auto = from the file", choices=FORMATS)
    prompts_per_step: int = setting(8, "prompts per step for the whole job, split evenly over the ranks (a "
                                    "multiple of the world size)", **_INT_GE1)
    shuffle: bool = setting(True, "shuffle the prompts every epoch (seeded)")
    split: str | None = setting(None, "train only on the prompts whose meta.split is this (e.g. train); null = all")


@dataclass
class ScaffoldConfig:
    """Rubric scaffolding (RuscaRL, Zhou et al. 2025): rubric criteria shown in the system prompt during
    rollout only; sample i of a group of n sees a share (n-1-i)/(n-1) of them, times a sigmoid schedule
    ``1 / (1 + exp(steepness * (progress - midpoint)))`` that decays over training."""

    enabled: bool = setting(False, "show rubric criteria to the sampler (needs algorithm.is_cap)")
    midpoint: float = setting(0.5, "training progress at which the schedule is 0.5",
                              check=lambda v: 0 <= v <= 1, accepts="a number in [0, 1]")
    steepness: float = setting(10.0, "how fast the schedule decays around the midpoint")


@dataclass
class VLLMRolloutConfig:
    """``rollout.engine: vllm`` (rubric_fast/trainer/vllm_engine.py)."""

    mode: str = setting("colocate", "colocate: a vllm.LLM in each trainer process; server: vllm serve URLs",
                        choices=("colocate", "server"))
    endpoints: list[str] = setting(factory=list, help="server: base URLs, e.g. [http://127.0.0.1:8000]")
    sync_dir: str | None = setting(None, "server: where pushed weights are written (readable by the servers); "
                                   "null = <run_dir>/vllm_weights")
    timeout_s: float = setting(600.0, "server: seconds per request (generation, weight push)", **_POS)
    tensor_parallel_size: int = setting(1, "colocate: tensor-parallel GPUs per engine", **_INT_GE1)
    gpu_memory_utilization: float = setting(0.3, "colocate on CUDA: vLLM's share of the GPU (weights + KV cache)",
                                            check=lambda v: 0 < v <= 1, accepts="a number in (0, 1]")
    sleep: bool | str = setting("auto", "colocate on CUDA: release vLLM's memory during the update (auto = on "
                                "CUDA)", choices=("auto", True, False))
    kv_cache_gb: float | None = setting(None, "colocate: KV cache size in GiB (the CPU build's default is 4)",
                                        **_POS)
    max_model_len: int | None = setting(None, "colocate: longest sequence; null = the model's", **_INT_GE1)
    enforce_eager: bool = setting(True, "colocate: no CUDA graphs (they cost memory and capture time per start)")


@dataclass
class RolloutConfig:
    """Sampling the completions."""

    engine: str = setting("hf", "hf: transformers generate on the policy; vllm: see rollout.vllm",
                          choices=("hf", "vllm"))
    num_generations: int = setting(8, "G, completions per prompt (a group)", check=lambda v: v >= 2,
                                   accepts="an integer >= 2 (a group needs a baseline)")
    max_new_tokens: int = setting(256, "longest completion", **_INT_GE1)
    temperature: float = setting(1.0, "sampling temperature; the loss's log-probs use the same one", **_POS)
    top_p: float = setting(1.0, "nucleus sampling", check=lambda v: 0 < v <= 1, accepts="a number in (0, 1]")
    top_k: int = setting(0, "top-k sampling; 0 = off", **_INT_GE0)
    batch_size: int = setting(64, "sequences per generate() call", **_INT_GE1)
    overlap: bool = setting(True, "generate step k+1 while step k is being scored")
    max_staleness: int = setting(1, "drop samples more than this many policy versions old", **_INT_GE0)
    scaffold: ScaffoldConfig = setting(factory=ScaffoldConfig)
    vllm: VLLMRolloutConfig = setting(factory=VLLMRolloutConfig)
    multiturn: MultiTurnConfig = setting(factory=MultiTurnConfig)
    refine: RefineConfig = setting(factory=RefineConfig)


@dataclass
class AlgorithmConfig:
    """The RL algorithm: the policy loss, the advantages and the update loop (docs/methods.md)."""

    policy_loss: PolicyLossConfig = setting(factory=PolicyLossConfig, help="the clipped policy loss, as the ops "
                                            "take it (rubric_fast.PolicyLossConfig)")
    # advantages
    estimator: str = setting("grpo", "group advantage estimator", choices=ESTIMATORS)
    scale: str | None = setting(None, "advantage scaling; null = the estimator's default",
                                choices=SCALES + (None,))
    adv_eps: float = setting(1e-6, "added to the std before dividing", **_POS)
    positive_weight: float = setting(0.1, "W-REINFORCE lambda (weight of positive samples)")
    # loop
    num_iterations: int = setting(1, "optimization passes over each rollout batch (mu in GRPO)", **_INT_GE1)
    mask_truncated_completions: bool = setting(False, "completions cut at max_new_tokens get no loss (DAPO)")
    drop_zero_variance_groups: bool = setting(True, "skip groups whose advantages are all 0 (no signal)")
    reference: str = setting("auto", "the KL reference when policy_loss.beta > 0: a frozen copy, or the LoRA "
                             "base (adapters off); auto = lora_base with LoRA", choices=("auto", "copy", "lora_base"))
    is_cap: float | None = setting(2.0, "truncated importance weight min(pi_old / pi_sampler, is_cap) against "
                                   "the sampler's log-probs; null = off", **_POS)
    advantage_sign: float = setting(1.0, "-1 flips the advantages: a control that must not learn (tests)",
                                    check=lambda v: v in (1.0, -1.0), accepts="1 or -1")
    # OREAL sample weighting (trainer/oreal.py)
    positive_loss_factor: float = setting(1.0, "OREAL: advantages > 0 are multiplied by this", **_NONNEG)
    negative_loss_factor: float = setting(1.0, "OREAL: advantages < 0 are multiplied by this", **_NONNEG)
    best_worst_only: bool = setting(False, "OREAL: train on each group's best and worst response only")
    # dynamic KL reference (T1; trainer/reference_update.py)
    ref_update_interval: int = setting(0, "copy the policy into the reference every N steps; 0 = never (with "
                                       "ref_ema set: every step)", check=lambda v: v >= 0,
                                       accepts="an integer >= 0 (0 = never, unless ref_ema is set: then every step)")
    ref_ema: float | None = setting(None, "theta_ref <- ref_ema * theta_ref + (1 - ref_ema) * theta; null = off",
                                    check=lambda v: 0.0 <= v < 1.0, accepts="a number in [0, 1) or null")
    empg: EMPGConfig = setting(factory=EMPGConfig, help="entropy-modulated per-step advantages (multi-turn)")


@dataclass
class OptimizationConfig:
    """The optimizer (AdamW) and the micro-batches."""

    lr: float = setting(1e-6, "learning rate", **_POS)
    schedule: str = setting("constant", "learning-rate schedule after the warmup",
                            choices=("constant", "linear", "cosine"))
    warmup_steps: int = setting(0, "linear warmup steps", **_INT_GE0)
    grad_clip: float | None = setting(1.0, "gradient norm clip; null = off", **_POS)
    tokens_per_micro_batch: int = setting(8192, "tokens per forward/backward (padding included when "
                                          "padding_free is off)", **_INT_GE1)
    padding_free: bool | str = setting("auto", "pack sequences back to back in one row with per-sequence position "
                                       "ids: auto = with flash_attention_2 (varlen kernels); true = also with sdpa "
                                       "/ eager (exact, via a block-diagonal mask whose attention is quadratic in "
                                       "the row)", choices=("auto", True, False))
    mini_batches: int = setting(1, "optimizer steps per rollout batch and iteration", **_INT_GE1)
    weight_decay: float = setting(0.0, "AdamW weight decay", check=lambda v: v >= 0, accepts="a number >= 0")
    adam_beta1: float = setting(0.9, "AdamW beta1", check=lambda v: 0 <= v < 1, accepts="a number in [0, 1)")
    adam_beta2: float = setting(0.999, "AdamW beta2", check=lambda v: 0 <= v < 1, accepts="a number in [0, 1)")
    adam_eps: float = setting(1e-8, "AdamW epsilon", **_POS)


@dataclass
class DistributedConfig:
    """Rank and world size come from the torchrun environment; these choose how the ranks cooperate."""

    strategy: str = setting("ddp", "ddp: replicated weights, bucketed gradient all-reduce; fsdp2: fully_shard",
                            choices=("ddp", "fsdp2"))
    backend: str = setting("auto", "process group backend; auto = nccl on CUDA, else gloo",
                           choices=("auto", "nccl", "gloo"))
    timeout_s: float = setting(600.0, "seconds for every collective; a dead or stuck rank ends the run with an "
                               "error", **_POS)
    bucket_mb: float = setting(25.0, "ddp: gradient all-reduce bucket size (MiB)", **_POS)
    fsdp_param_dtype: str | None = setting(None, "fsdp2 MixedPrecisionPolicy: compute dtype; null = model.dtype",
                                           choices=(None,) + _DTYPES)
    fsdp_reduce_dtype: str | None = setting("float32", "fsdp2: gradient reduce-scatter dtype; null = the "
                                            "parameter dtype", choices=(None,) + _DTYPES)
    fsdp_reshard_after_forward: bool = setting(True, "fsdp2: free gathered layers after the forward (less memory)")


@dataclass
class CheckpointConfig:
    """Checkpoints (bitwise-exact resume) and the final export."""

    dir: str | None = setting(None, "where checkpoints go; null = <run_dir>/checkpoints")
    every: int = setting(0, "save every N steps; 0 = only at the end", **_INT_GE0)
    keep_last: int = setting(2, "checkpoints kept", **_INT_GE1)
    resume: str = setting("auto", "auto (the newest checkpoint in dir, if any), never, or a checkpoint folder")
    save_final: bool = setting(True, "save a checkpoint after the last step")
    export_hf: bool = setting(False, "at the end of training, write the policy as a Hugging Face folder "
                              "(as rubric-fast export does)")
    export_dir: str | None = setting(None, "where export_hf writes; null = <run_dir>/hf")


@dataclass
class LoggingConfig:
    """Metrics, samples and the run folder."""

    run_dir: str = setting("runs/default", "the run folder: config, metrics.jsonl, samples, checkpoints")
    every: int = setting(1, "log metrics every N steps", **_INT_GE1)
    samples_every: int = setting(10, "log sample responses every N steps; 0 = never", **_INT_GE0)
    num_samples: int = setting(4, "responses per sample log", **_INT_GE0)
    tensorboard: bool = setting(True, "also write TensorBoard events")
    progress: bool = setting(True, "a progress bar on the terminal")
    overwrite: bool = setting(False, "replace a previous run in run_dir (else it is refused unless resumed)")


@dataclass
class RewardConfig:
    """How the judged rubric becomes the training reward (docs/methods.md)."""

    calibration: CalibrationConfig = setting(factory=CalibrationConfig, help="RLCR: calibrated confidence reward")
    pairwise: PairwiseConfig = setting(factory=PairwiseConfig, help="OpenRubrics / Rubric-RM pairwise judging")


@dataclass
class TrainConfig:
    """``rubric-fast train`` configuration."""

    model: ModelConfig = setting(factory=ModelConfig)
    data: DataConfig = setting(factory=DataConfig)
    rollout: RolloutConfig = setting(factory=RolloutConfig)
    judge: JudgeConfig = setting(factory=JudgeConfig)
    scoring: ScorerConfig = setting(factory=ScorerConfig)
    algorithm: AlgorithmConfig = setting(factory=AlgorithmConfig)
    reward: RewardConfig = setting(factory=RewardConfig)
    optimization: OptimizationConfig = setting(factory=OptimizationConfig)
    distributed: DistributedConfig = setting(factory=DistributedConfig)
    checkpoint: CheckpointConfig = setting(factory=CheckpointConfig)
    logging: LoggingConfig = setting(factory=LoggingConfig)
    eval: EvalConfig = setting(factory=EvalConfig, help="held-out evaluation (trainer/evaluate.py)")
    seed: int = setting(0, "the run's seed (sampling uses seed + rank)")
    max_steps: int = setting(100, "training steps", **_INT_GE1)
    max_nan_steps: int = setting(5, "consecutive non-finite losses before the run stops", **_INT_GE1)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", check=lambda v: bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", v)),
                          accepts="auto, cpu, cuda or cuda:N")
    cpu_threads: int = setting(0, "torch intra-op threads on the CPU; 0 = torch's default", **_INT_GE0)


# ------------------------------------------------------------------------------------------------ loading
def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"{_where(source)}{key}: expected {type_name(tp)}, got {value!r}")
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
    items = list(data.items())
    if isinstance(obj, JudgeConfig):  # the type first: switching it clears the previous type's keys
        items.sort(key=lambda kv: kv[0] != "type")
    for name, value in items:
        key = prefix + str(name)
        if isinstance(obj, AlgorithmConfig) and name in _MOVED_TO_POLICY_LOSS:
            _moved(key, source)
            _apply(obj.policy_loss, {name: value}, key.rsplit(".", 1)[0] + ".policy_loss.", source)
            continue
        if name not in fields:
            raise _unknown(key, str(name), list(fields), source)
        _internal(fields[name][0], key, source)
        if isinstance(obj, JudgeConfig) and name == "type" and isinstance(value, str):
            obj.switch_type(value)  # another judge type: the previous type's keys are cleared
        _, tp = fields[name]
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, key + ".", source)
        else:
            setattr(obj, name, _coerce(value, tp, key, source))


# Keys of algorithm.policy_loss that used to sit directly under algorithm: still read there, with a warning.
_MOVED_TO_POLICY_LOSS = frozenset(f.name for f in dataclasses.fields(PolicyLossConfig) if "internal" not in f.metadata)
_moved_keys: dict[str, list[str]] = {}  # source -> the flat keys read while loading (one warning per source)


def _moved(key: str, source: str | None) -> None:
    _moved_keys.setdefault(source or "", []).append(key)


def _warn_moved() -> None:
    import logging

    for source, keys in _moved_keys.items():
        logging.getLogger("rubric_fast").warning(
            "%s%s: now under algorithm.policy_loss (e.g. algorithm.policy_loss.%s); please move %s",
            _where(source or None), ", ".join(keys), keys[0].rsplit(".", 1)[1], "it" if len(keys) == 1 else "them")
    _moved_keys.clear()


def _internal(f: dataclasses.Field, key: str, source: str | None) -> None:
    if "internal" in f.metadata:
        raise ConfigError(f"{_where(source)}{key}: not a setting: {f.metadata['internal']}")


def _mapping_typed(tp: Any) -> bool:
    """Whether a key holds a free mapping (``Any``, ``dict``, ``dict | None``, ...): set key by key below it."""
    if tp is Any or tp is dict or typing.get_origin(tp) is dict:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and any(_mapping_typed(a)
                                                                             for a in typing.get_args(tp))


def set_key(cfg: TrainConfig, dotted: str, value: Any, source: str | None = None) -> None:
    """Set one dotted key (``algorithm.policy_loss.loss``) as ``_apply`` sets it from a file; keys below a
    mapping-typed key (``scoring.guard.check_echo``) add to that mapping."""
    parts = dotted.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts[:-1]):
        if isinstance(obj, dict):
            obj = obj.setdefault(part, {})
            continue
        fields = _fields(type(obj))
        if part not in fields:
            raise _unknown(".".join(parts[:i + 1]), part, list(fields), source)
        child = getattr(obj, part)
        if not dataclasses.is_dataclass(child) and not isinstance(child, dict):
            if not _mapping_typed(fields[part][1]):
                raise ConfigError(f"{_where(source)}{'.'.join(parts[:i + 1])}: not a section (it holds "
                                  f"{type_name(fields[part][1])}); set it as {'.'.join(parts[:i + 1])}=VALUE")
            child = {}  # a mapping-valued key (e.g. scoring.guard) given key by key
            setattr(obj, part, child)
        obj = child
    if isinstance(obj, dict):
        obj[parts[-1]] = value
    else:  # the key's checks, a moved algorithm key, a judge type switch, a whole section: as in a file
        _apply(obj, {parts[-1]: value}, "".join(p + "." for p in parts[:-1]), source)


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
            overridden.add(key)  # before setting it: an error it raises is the override's
            set_key(cfg, key, value, source="override")
        validate(cfg)
        _warn_moved()
    except ConfigError as exc:
        _moved_keys.clear()
        if p is None:
            raise
        raise ConfigError(_locate(str(exc), p, lines, overridden)) from None
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the key and the accepted values: every field's declared check
    (rubric_fast/settings.py), then the rules between keys."""
    try:
        check_tree(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    a = cfg.algorithm
    if a.estimator == "dr_grpo" and a.scale not in (None, "none"):
        raise ConfigError("algorithm.scale: Dr. GRPO removes the std normalisation; use null or none")
    try:
        policy_loss_config(cfg)
    except ValueError as exc:  # PolicyLossConfig's own checks name the field
        raise ConfigError(f"algorithm.policy_loss.{str(exc).removeprefix('PolicyLossConfig.')}") from None
    try:
        cfg.judge.check("judge")  # the keys set belong to judge.type
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if a.reference == "lora_base" and not cfg.model.lora.enabled:
        raise ConfigError("algorithm.reference: lora_base needs model.lora.enabled=true")
    if cfg.rollout.scaffold.enabled and a.is_cap is None:
        raise ConfigError("algorithm.is_cap: rubric scaffolding (rollout.scaffold.enabled) needs the truncated "
                          "importance weight against the scaffolded sampler; set a cap such as 2.0")
    from rubric_fast.rubric.schema import RubricError

    try:
        cfg.scoring.validate()  # its fields, the guard, the aggregation block (e.g. rubicon, docs/methods.md)
    except RubricError as exc:
        raise ConfigError(f"{exc.key}: {str(exc).split(': ', 1)[-1]}") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
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
        if cfg.judge.type not in ("rule", "http", "hf"):
            raise ConfigError(f"judge.type: pairwise judging (reward.pairwise.enabled) works with the rule, http "
                              f"and hf judges; got {cfg.judge.type!r}")
        if cfg.scoring.aggregation is not None:
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


def policy_loss_config(cfg: TrainConfig, normalizer: float | None = None) -> PolicyLossConfig:
    """The ops' PolicyLossConfig: ``algorithm.policy_loss`` with the step's normalizer (set by the loop)."""
    pl = cfg.algorithm.policy_loss
    if normalizer is None and pl.aggregation == "constant":
        normalizer = 1.0  # placeholder for validation; the loop sets max_new_tokens * global sequences
    return pl.replace(normalizer=normalizer)


def help_config(only: str | None = None) -> str:
    """``rubric-fast train --help-config``: every key with its type, default, help and accepted values."""
    return format_help(TrainConfig, only=only)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The run's config as plain data (logged, saved as config.yaml, loadable again): every user setting;
    the judge with only the keys that are set."""
    d = settings_dict(cfg)
    d["judge"] = cfg.judge.to_dict()
    return d
