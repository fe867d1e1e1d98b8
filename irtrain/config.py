"""Every command's configuration, declared once.

One dataclass per command. Each field has its default and a one-line help
(``opt(default, "help")``); the CLI builds its flags from these fields
(`irtrain/cli/_build.py`), so help text is written exactly once. Python users
build the same dataclass and call ``irtrain.<command>.run(cfg)``.

`load_config(cls, toml_path, overrides)` reads a TOML file, applies flags on top
(flags win), coerces types and validates choices; an unknown key is a
`ConfigError` naming the key and the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from irtrain.errors import ConfigError
from irtrain.losses import KL_ESTIMATORS, PREFERENCE_LOSSES, SFT_LOSSES
from irtrain.models import DTYPES
from irtrain.shards import FORMATS
from irtrain.train.trackers import REPORT_TO

#: the range checks a field may declare (`opt(..., check=NAME)`): test, and what it says
CHECKS: dict[str, tuple[Callable[[float], bool], str]] = {
    "positive": (lambda v: math.isfinite(v) and v > 0, "> 0 and finite"),
    "nonnegative": (lambda v: math.isfinite(v) and v >= 0, ">= 0 and finite"),
    "at_least_1": (lambda v: v >= 1, ">= 1"),
    "at_least_2": (lambda v: v >= 2, ">= 2"),
    "fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "unit_half_open": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "finite": (lambda v: math.isfinite(v), "finite"),
}


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, positional: bool = False,
        check: str | None = None, aliases: tuple[str, ...] = (), flag: str | None = None) -> Any:
    """Declare a config field: its default, one line of help, optional choices, optional range
    check (a key of `CHECKS`; None values pass, for optional fields), optional aliases (other
    names of the same setting, e.g. TRL's `learning_rate` for `lr`: a flag `--learning-rate`
    and a TOML key), optional CLI flag names (`--on/--off` for a bool) when the field's name
    does not make a good flag."""
    assert check is None or check in CHECKS, check
    assert not (positional and aliases), "a positional argument has no flag to alias"
    meta = {"help": help, "choices": choices, "positional": positional, "check": check, "aliases": aliases, "flag": flag}
    if isinstance(default, list):
        items: list[Any] = list(default)
        return field(default_factory=lambda: list(items), metadata=meta)
    return field(default=default, metadata=meta)


def _choices_help(registry: dict[str, Any]) -> str:
    """`name = summary | ...` of a loss or estimator table: the help of the option that picks one."""
    return " | ".join(f"{name} = {entry.summary}" if entry.summary else name for name, entry in registry.items())


class _Validated:
    """Mixin: check every field's `choices` and range after construction, so a bad setting is a
    one-line error naming the flag before anything is loaded or written."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            items = [p.strip() for v in value for p in str(v).split(",") if p.strip()] if isinstance(value, list) else [value]
            for item in items:  # a list field: each of its (comma-separated) items
                if choices and item is not None and item not in choices:
                    raise ConfigError(
                        f"{f.name} = {item!r} is not one of: {', '.join(choices)}"
                    )
            check = f.metadata.get("check")
            if check and value is not None:
                ok, says = CHECKS[check]
                for v in value if isinstance(value, list) else [value]:  # a list: each item
                    if not ok(v):
                        raise ConfigError(f"--{f.name.replace('_', '-')} must be {says}, got {v!r}")


# --------------------------------------------------------------------------- prepare
@dataclass
class PrepareConfig(_Validated):
    """Turn raw conversations into training-ready, memory-mapped shards."""

    inputs: list[str] = opt([], "Input files or directories (JSONL/JSON/Parquet) or Hugging Face datasets (owner/name, or hf:NAME_OR_DIR).", positional=True)
    out: str = opt("", "Output shard directory.")
    tokenizer: str = opt("", "Tokenizer: a local directory (tokenizer.json + tokenizer_config.json) or hub name.")
    format: str = opt("auto", "Input format (auto: from the first row's fields; text = plain language modelling).",
                      choices=("auto", *FORMATS))
    columns: str = opt("", "Rename input columns to irtrain's fields before reading rows: NAME=COLUMN,... "
                       "(e.g. messages=conversations,chosen=preferred).")
    apply_chat_template: bool = opt(
        True, "Render string prompt/completion/chosen/rejected fields with the chat template; --no-chat-template: "
        "plain text as TRL does for non-conversational data (prompt + completion + eos, loss on the completion).",
        flag="--apply-chat-template/--no-chat-template")
    split: str = opt("train", "Dataset split, for Hugging Face dataset names.")
    subset: str | None = opt(None, "Dataset configuration (subset) name, for Hugging Face dataset names.")
    chat_template: str | None = opt(None, "The chat template: a Jinja file, one of the tokenizer's named templates "
                                    "(as transformers' chat_template=NAME, e.g. tool_use), or a built-in style: "
                                    "chatml, llama3, mistral. Default: the tokenizer's own.")
    mask: str = opt("assistant", "Trained tokens: every assistant turn | the last one | all after the prompt | all.",
                    choices=("assistant", "last", "completion", "all"))
    max_len: int = opt(2048, "Maximum tokens per packed row (and per example).", check="at_least_2",
                       aliases=("max_length", "max_seq_length", "sequence_len"))
    truncation: str = opt("drop", "An example longer than --max-len: drop it, or cut tokens from its start (left) or end (right).",
                          choices=("drop", "left", "right"))
    pack: bool = opt(True, "Pack examples into rows of --max-len tokens (best-fit decreasing).", aliases=("packing",))
    shard_rows: int = opt(16384, "Rows per shard file set.", check="at_least_1")
    preview: int = opt(0, "Print N prepared examples with the masked tokens marked.", check="nonnegative")
    skip_invalid: bool = opt(False, "Skip invalid rows (counted in the report) instead of failing.")
    threads: int = opt(0, "Worker threads for the Rust data path (0 = all cores).", check="nonnegative")
    template_vars: list[str] = opt([], "Row fields passed to the chat template as variables besides tools and documents "
                                   "(always passed), comma-separated, e.g. enable_thinking.")


# --------------------------------------------------------------------------- training (shared)
@dataclass
class TrainConfig(_Validated):
    """Fields shared by `sft` and `dpo` (the same loop runs both)."""

    model: str = opt("", "Model to train: a local directory or hub name (AutoModelForCausalLM).", aliases=("model_name_or_path",))
    data: list[str] = opt([], "Shard directories made by `irtrain prepare`.", positional=True)
    out: str = opt("", "Output directory: checkpoints, metrics.jsonl, resolved config.", aliases=("output_dir",))
    dtype: str = opt("auto", "Parameter dtype (auto: fp32 weights + bf16 autocast on GPU, bf16 under DeepSpeed on GPU, fp32 on CPU).",
                     choices=("auto", *DTYPES), aliases=("torch_dtype",))
    attn_implementation: str | None = opt(
        None, "Attention for packed batches (default: flash_attention_2 on GPU if installed, else irtrain_varlen; "
        "sdpa = transformers' N x N block-diagonal mask).")
    trust_remote_code: bool = opt(False, "Allow the model's custom code from the hub.")
    lr: float = opt(5e-6, "Peak learning rate.", check="positive", aliases=("learning_rate",))
    lr_schedule: str = opt("cosine", "Learning-rate schedule after warmup.", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.1, "Fraction of steps for linear warmup.", check="fraction")
    weight_decay: float = opt(0.0, "AdamW weight decay.", check="nonnegative")
    adam_beta1: float = opt(0.9, "AdamW beta1.", check="unit_half_open")
    adam_beta2: float = opt(0.95, "AdamW beta2.", check="unit_half_open")
    adam_eps: float = opt(1e-8, "AdamW epsilon.", check="positive", aliases=("adam_epsilon",))
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0 = no clipping).", check="nonnegative")
    epochs: float = opt(1.0, "Passes over the data (ignored when --max-steps > 0).", check="positive",
                        aliases=("num_train_epochs", "num_epochs"))
    max_steps: int = opt(0, "Optimizer steps to run (0 = from --epochs).", check="nonnegative")
    global_batch: int = opt(128, "Sequences (packed rows) per optimizer step, over all ranks and micro-batches.", check="at_least_1")
    global_batch_tokens: int = opt(0, "If > 0: tokens per optimizer step instead of --global-batch sequences.", check="nonnegative")
    global_batch_docs: int = opt(0, "If > 0: documents (conversations, preference pairs) per optimizer step instead of --global-batch "
                                 "sequences, whatever the packing.", check="nonnegative")
    weights: list[float] = opt([], "Mixture weights, one per data directory (e.g. 0.7,0.3): every step draws packed rows from the "
                               "sources in these proportions, each with its own epochs (default: the directories concatenated).",
                               check="positive")
    micro_batch: int = opt(1, "Packed rows per micro-batch per rank (forward/backward at once, padding-free).", check="at_least_1",
                           aliases=("per_device_train_batch_size", "micro_batch_size"))
    micro_batch_tokens: int = opt(0, "If > 0: at most this many tokens per micro-batch per rank, instead of --micro-batch rows.", check="nonnegative")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    seed: int = opt(0, "Seed for initialisation, data order and dropout.")
    log_steps: int = opt(1, "Write metrics every N steps (metrics.jsonl; a line on stderr when it is not a terminal).", check="at_least_1",
                         aliases=("logging_steps",))
    save_steps: int = opt(0, "Checkpoint every N steps (0 = only at the end and --save-at).", check="nonnegative")
    save_at: str = opt("", "Extra checkpoint steps, comma-separated (early-exit checkpoints), e.g. 50,100,150.")
    save_total_limit: int = opt(0, "Keep at most N periodic checkpoints (0 = keep all; --save-at ones are always kept).", check="nonnegative")
    resume: bool = opt(False, "Resume from the last complete checkpoint in --out.")
    max_bad_steps: int = opt(5, "Stop after this many non-finite steps in a row.", check="at_least_1")
    eval_pairs: str | None = opt(None, "Preference shards for eval/pref_loss and eval/pref_accuracy.")
    eval_steps: int = opt(0, "Evaluate on --eval-pairs every N steps (0 = at start and end only).", check="nonnegative")
    eval_beta: float = opt(0.01, "Beta of the held-out preference loss (paper: 0.01).", check="positive")
    value_temperature: float = opt(1.0, "Temperature tau of the soft value V(s) = tau*logsumexp(l/tau).", check="positive")
    kl_coef: float = opt(0.0, "Weight of the KL-to-reference term (0 = off).", check="nonnegative")
    kl_estimator: str = opt("full", "KL estimator: " + _choices_help(KL_ESTIMATORS) + ".", choices=tuple(KL_ESTIMATORS))
    kl_metrics: bool = opt(True, "Log kl/k1, kl/k2, kl/k3 against the starting model (uses its log-probs, computed once and cached beside the shards).")
    reference_dir: str | None = opt(None, "Where reference log-prob caches live (default: a reference/ folder inside each shard directory).")
    lora_r: int = opt(0, "LoRA rank (0 = full fine-tune). Adapters through peft; checkpoints hold the adapter in peft's format.", check="nonnegative")
    lora_alpha: float | None = opt(None, "LoRA alpha (scale alpha/r; default 2 x --lora-r).", check="positive")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.", check="unit_half_open")
    lora_target: list[str] = opt([], "Modules that get adapters, comma-separated names (default: every linear layer of the decoder, not the LM head).",
                                 aliases=("lora_target_modules",))
    lora_modules_to_save: list[str] = opt([], "Modules trained in full next to the adapters and saved with them (e.g. lm_head,embed_tokens).")
    use_dora: bool = opt(False, "DoRA: weight-decomposed LoRA (magnitude and direction).")
    load_in_4bit: bool = opt(False, "QLoRA: load the base model in 4 bits (nf4, bf16 compute) through bitsandbytes (CUDA only).")
    load_in_8bit: bool = opt(False, "QLoRA: load the base model in 8 bits through bitsandbytes (CUDA only).")
    merge_at_end: bool = opt(False, "With LoRA: also write the merged full model to OUT/merged/ at the end.")
    deepspeed: str | None = opt(None, "Run under DeepSpeed: zero1 | zero2 | zero3 | path to a DeepSpeed JSON config.")
    device: str = opt("auto", "Device for single-process runs (auto, cpu, cuda).")
    tensorboard: bool = opt(True, "With --report-to left unset: log to TensorBoard when it is installed (--no-tensorboard: no tracker).")
    report_to: list[str] = opt([], "Trackers, comma-separated or repeated, with TRL's metric names (default: tensorboard when installed).",
                               choices=REPORT_TO)
    project: str = opt("irtrain", "Project on the trackers: the Trackio project, W&B project, MLflow experiment.")
    run_name: str | None = opt(None, "Run name on the trackers (default: the --out directory's name).")


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on `prepare` shards, with the SFT loss family of FORMULAS.md "SFT losses"."""

    loss: str = opt("ce", "SFT loss, per token (docs/FORMULAS.md \"SFT losses\"): " + _choices_help(SFT_LOSSES) + ".", choices=tuple(SFT_LOSSES),
                    aliases=("loss_type",))
    value_grad: bool = opt(False, "Let gradient flow through the value term dV (off: the stable default).")


@dataclass
class DPOConfig(TrainConfig):
    """Preference optimisation on `prepare` preference/unpaired/ranked shards."""

    lr: float = opt(5e-7, "Peak learning rate.", check="positive", aliases=("learning_rate",))
    loss: str = opt("sigmoid", "Preference loss (docs/FORMULAS.md \"Preference losses\"): " + _choices_help(PREFERENCE_LOSSES) + ".",
                    choices=tuple(PREFERENCE_LOSSES), aliases=("loss_type",))
    beta: float | None = opt(None, "Beta (default per loss: 0.1; simpo 2.0; orpo uses --orpo-lambda instead).", check="positive")
    label_smoothing: float = opt(0.0, "Label smoothing / flip probability epsilon (sigmoid, robust).")
    gamma: float = opt(0.5, "SimPO target margin gamma.", check="finite", aliases=("simpo_gamma",))
    orpo_lambda: float = opt(0.1, "ORPO odds-ratio weight lambda (TRL's ORPO beta).", check="positive")
    desirable_weight: float = opt(1.0, "KTO weight of desirable examples.", check="nonnegative")
    undesirable_weight: float = opt(1.0, "KTO weight of undesirable examples.", check="nonnegative")
    infonca_alpha: float = opt(1e-3, "InfoNCA temperature alpha of the score softmax.", check="positive")
    sft_coef: float = opt(0.0, "Add sft_coef * ce(chosen response) to the loss (RPO-style).", check="nonnegative", aliases=("rpo_alpha",))
    ref_model: str | None = opt(None, "Reference model (default: the starting model); its log-probs are computed once and cached.")
    reference_free: bool = opt(False, "Use no reference at all (simpo, orpo only; no rewards against a reference, no KL metrics).")
    joint_sft: str | None = opt(None, "SFT shards for joint SFT+DPO: loss = ce + lambda * preference loss, lambda adaptive.")
    target_accuracy: float = opt(0.8, "Joint SFT+DPO: target preference accuracy a*.")
    lambda_interval: int = opt(10, "Joint SFT+DPO: adapt lambda every N steps.")
    lambda_init: float = opt(1.0, "Joint SFT+DPO: initial lambda.")
    lambda_delta: float = opt(0.05, "Joint SFT+DPO: halve lambda when a* - accuracy <= delta, else double it.")
    lambda_min: float = opt(1e-3, "Joint SFT+DPO: lower clamp of lambda.")
    lambda_max: float = opt(1e3, "Joint SFT+DPO: upper clamp of lambda.")
    alternate_with: str | None = opt(None, "SFT shards for the alternating schedule SFT_1 -> DPO_1 -> ... -> SFT_K -> DPO_K.")
    rounds: int = opt(2, "Alternating schedule: number of rounds K (each dataset is split into K parts).", check="at_least_1")
    sft_lr: float | None = opt(None, "Alternating schedule: SFT stages' learning rate (default: --lr).", check="positive")


# --------------------------------------------------------------------------- analysis
@dataclass
class ScoreConfig(_Validated):
    """Score states with a model's soft value V(s) and, with a reference, implicit rewards."""

    data: str = opt("", "Shards from `prepare`, or a raw file/directory (chat, preference, or prompt+completion traces), prepared first.", positional=True)
    model: str | None = opt(None, "Model to score: a local directory or hub name.")
    checkpoints: str | None = opt(None, "Score every checkpoint in this directory (each subdirectory with a config.json, by step), besides --model if given.")
    ref_model: str | None = opt(None, "Reference model for implicit rewards beta*log(pi/pi_ref).")
    tokenizer: str | None = opt(None, "Tokenizer for raw data (default: the model's).")
    format: str = opt("auto", "Raw data format (auto: detected from the first row).", choices=("auto", "chat", "preference", "prompt-completion"))
    out: str = opt("", "Output directory: one Parquet table per model and summary.json (raw input is prepared into OUT/prepared).")
    step_delimiter: str = opt("\n\n", "Split responses into steps at this string (\\n, \\t, \\r, \\\\ typed as escapes are unescaped).")
    value_temperature: float = opt(1.0, "Temperature tau of V(s) = tau*logsumexp(l/tau).", check="positive")
    beta: float = opt(0.01, "Beta of the implicit reward and the per-pair DPO loss.", check="positive")
    dtype: str = opt("auto", "Compute dtype (auto: bf16 on GPU, fp32 on CPU).", choices=("auto", *DTYPES))
    batch_tokens: int = opt(8192, "Tokens per padding-free forward pass.", check="at_least_1")
    max_len: int = opt(4096, "Longest sequence scored; longer ones are an error.", check="at_least_2")
    device: str = opt("auto", "Device (auto, cpu, cuda).")
    trust_remote_code: bool = opt(False, "Allow the model's custom code from the hub.")
    labels: list[str] = opt([], "Names shown for the models: one per model in order (--model first, then checkpoints by step), "
                                "or label=path pairs (default: run@step for a run's checkpoint, e.g. sft@200). "
                                "Table file names stay <run>-checkpoint-<step>.")


@dataclass
class RankConfig(_Validated):
    """Kendall tau-b between models' value rankings of the same states."""

    tables: list[str] = opt([], "Score tables (Parquet) or directories of them (`irtrain score --out`); at least two.", positional=True)
    out: str = opt("", "Output directory: tau matrix (Parquet), heatmap (PNG), summary JSON.")
    intersect: bool = opt(False, "Keep only states present in every table (otherwise a missing state is an error).")
    bootstrap: int = opt(0, "Bootstrap resamples (over traces) for 95% confidence intervals (0 = none).", check="nonnegative")
    seed: int = opt(0, "Seed of the bootstrap.")
    labels: list[str] = opt([], "Names shown for the tables: one per table in order, or label=path pairs (a path may be a "
                                "table's name; default: the label score gave, else run@step for a run's checkpoint).")


@dataclass
class QuickstartConfig(_Validated):
    """Run the whole of irtrain on a generated task: prepare -> sft -> dpo -> score -> rank -> report."""

    out: str = opt("irtrain-quickstart", "Output directory for data, models and the report.")
    scale: float = opt(1.0, "Scale the number of examples and steps (tests use a small value).", check="positive")
    seed: int = opt(0, "Seed of data generation and training.")
    threads: int = opt(1, "Torch CPU threads (0 = torch's default). The models are tiny: 1 thread is steady on a busy machine, "
                          "where 2 can stall.", check="nonnegative")


# --------------------------------------------------------------------------- loading
def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, tp: Any, value: Any, where: str) -> Any:
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}{name} may not be empty")
    try:
        if typing.get_origin(base) is list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            item = (typing.get_args(base) or (str,))[0]
            if item is float and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                value = [p for v in value for p in v.split(",") if p]  # --weights 0.7,0.3 (or repeated)
            return [float(v) if item is float else str(v) for v in value]
        if base is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}{name} = {value!r} is not a valid {getattr(base, '__name__', base)}") from None


def aliases(cls: type) -> dict[str, str]:
    """`{alias: field name}` of a config class (`opt(..., aliases=...)`); an alias that is also
    a field name, or names two fields, is a declaration error."""
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        for alias in f.metadata.get("aliases", ()):
            if alias in names or out.get(alias, f.name) != f.name:
                raise AssertionError(f"{cls.__name__}: alias {alias!r} of {f.name!r} clashes with another name")
            out[alias] = f.name
    return out


def _did_you_mean(name: str, known: set[str], alias_of: dict[str, str]) -> str:
    """`; did you mean 'lr'?` for a misspelt key (matched against names and aliases), or ''."""
    match = difflib.get_close_matches(name, sorted(known | set(alias_of)), n=1, cutoff=0.6)
    return f"; did you mean '{alias_of.get(match[0], match[0])}'?" if match else ""


def load_config(cls: type, toml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """Build `cls` from a TOML file (optional) plus overrides (flags win).

    TOML keys and overrides may use dashes or underscores, and a field's aliases. Unknown
    keys raise `ConfigError` (with the closest known name), and so do two names of one field.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    alias_of = aliases(cls)
    values: dict[str, Any] = {}
    if toml_path is not None:
        path = Path(toml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        seen: dict[str, str] = {}
        for key, value in raw.items():
            name = alias_of.get(key.replace("-", "_"), key.replace("-", "_"))
            if name not in known:
                raise ConfigError(f"{path}: unknown config key '{key}' for {cls.__name__}"
                                  f"{_did_you_mean(key.replace('-', '_'), known, alias_of)}")
            if name in seen:
                raise ConfigError(f"{path}: '{seen[name]}' and '{key}' are the same setting ({name}); keep one")
            seen[name] = key
            values[name] = _coerce(name, hints[name], value, f"{path}: ")
    flagged: dict[str, str] = {}
    for key, value in (overrides or {}).items():
        name = alias_of.get(key.replace("-", "_"), key.replace("-", "_"))
        if name not in known:
            raise ConfigError(f"unknown option '{key}' for {cls.__name__}{_did_you_mean(key.replace('-', '_'), known, alias_of)}")
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if name in flagged:
            raise ConfigError(f"{flagged[name]} and {flag} are the same setting; give one")
        flagged[name] = flag
        values[name] = _coerce(name, hints[name], value, "")
    return cls(**values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain JSON/TOML-friendly values."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def config_to_toml(cfg: Any) -> str:
    """Render a resolved config as TOML (None values are left out)."""
    lines = [f"# {type(cfg).__name__}"]
    for name, value in config_to_dict(cfg).items():
        if value is None:
            continue
        if isinstance(value, bool):
            lines.append(f"{name} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{name} = {value!r}")
        elif isinstance(value, list):
            lines.append(f"{name} = [{', '.join(_toml_str(v) for v in value)}]")
        else:
            lines.append(f"{name} = {_toml_str(str(value))}")
    return "\n".join(lines) + "\n"


def _toml_str(s: str) -> str:
    import json

    return json.dumps(s, ensure_ascii=False)
