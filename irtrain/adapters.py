"""LoRA, DoRA and QLoRA through peft: checked before anything is written, applied to the
loaded model, saved in peft's own format, merged on request.

- `lora_spec(cfg, model_path)` checks every adapter flag against the model (built on the
  meta device, nothing loaded) and returns the resolved `LoraSpec` (None: full fine-tune).
- `apply_lora(model, spec, ...)` wraps the base in a peft model; on `--resume` the saved
  adapter weights are put back before the optimizer is built.
- A checkpoint of a LoRA run holds `adapter_config.json` + `adapter_model.safetensors`
  (peft's format: `PeftModel.from_pretrained(base, ckpt)` and transformers' adapter loading
  read it) and `irtrain_base.json`, the identity (hash) of the base it was trained on.
- `AdaptersDisabled(model)` is the base model without copying it: every forward runs under
  peft's `disable_adapter()`. It is dpo's reference and sft's `--kl-estimator full` reference.
- `load_causal_lm(path)` loads a full model directory or an adapter checkpoint (its base,
  then the adapter, merged), so `score`, `rank` and `--model` accept adapter checkpoints.
- `merge_to(base, ckpt, dest)` writes base + adapter as one plain model directory that
  `AutoModelForCausalLM.from_pretrained` loads without peft.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from irtrain.errors import ConfigError
from irtrain.extras import require

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_FILE = "irtrain_base.json"


@dataclass(frozen=True)
class LoraSpec:
    """The resolved adapter settings of a run."""

    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]           # module names (suffixes) that get adapters
    modules_to_save: tuple[str, ...]   # modules trained in full and saved with the adapter
    use_dora: bool
    quantization: str | None           # "4bit" | "8bit" | None
    base_name: str                     # what adapter_config.json names as the base

    def describe(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        q = f", QLoRA {self.quantization}" if self.quantization else ""
        return f"{kind} r={self.r} alpha={self.alpha:g}{q}"


def names(values: list[str] | tuple[str, ...]) -> list[str]:
    """`["q_proj,v_proj", "o_proj"]` -> `["q_proj", "v_proj", "o_proj"]` (flags may repeat or use commas)."""
    return [n.strip() for v in values for n in str(v).split(",") if n.strip()]


def is_adapter_dir(path: str | Path) -> bool:
    """An adapter checkpoint: adapter_config.json and no full model beside it."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def _need_peft(what: str) -> None:
    require("peft", what)


# --------------------------------------------------------------------------- checking
def _meta_model(model_path: Path, trust_remote_code: bool) -> Any:
    """The model's module tree on the meta device (no weights read, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def linear_layers(model: Any) -> list[str]:
    """Leaf names of the decoder's linear layers (`q_proj`, ..., not the LM head), in order."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in out:
                out.append(leaf)
    return out


def _matches(module_names: list[str], target: str) -> bool:
    return any(n == target or n.endswith("." + target) for n in module_names)


def check_quantization(cfg: Any) -> str | None:
    """--load-in-4bit / --load-in-8bit: CUDA and bitsandbytes, one of the two, and LoRA."""
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ConfigError("--load-in-4bit and --load-in-8bit: give one")
    flag = "--load-in-4bit" if cfg.load_in_4bit else "--load-in-8bit" if cfg.load_in_8bit else None
    if flag is None:
        return None
    if not torch.cuda.is_available() or str(cfg.device) == "cpu":
        raise ConfigError(f"{flag} (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has no CUDA device")
    require("bitsandbytes", f"{flag} (QLoRA)")
    if cfg.deepspeed:
        raise ConfigError(f"{flag} (QLoRA) runs on one GPU; it does not combine with --deepspeed")
    return "4bit" if cfg.load_in_4bit else "8bit"


def lora_spec(cfg: Any, model_path: Path) -> LoraSpec | None:
    """Check the adapter flags of `cfg` against the model at `model_path` (nothing loaded,
    nothing written); None for a full fine-tune."""
    targets, to_save = names(cfg.lora_target), names(cfg.lora_modules_to_save)
    if cfg.lora_r == 0:
        for flag, given in (("--use-dora", cfg.use_dora), ("--load-in-4bit", cfg.load_in_4bit), ("--load-in-8bit", cfg.load_in_8bit),
                            ("--merge-at-end", cfg.merge_at_end), ("--lora-target", bool(targets)),
                            ("--lora-modules-to-save", bool(to_save))):
            if given:
                raise ConfigError(f"{flag} needs LoRA: give --lora-r > 0 (0 is a full fine-tune)")
        return None
    _need_peft("--lora-r")
    quantization = check_quantization(cfg)
    if cfg.deepspeed and is_adapter_dir(model_path) and "3" in str(cfg.deepspeed):
        raise ConfigError(f"--model {model_path} is an adapter checkpoint; under ZeRO-3 train from its merged model (--merge-at-end)")
    meta = _meta_model(root_model(model_path), cfg.trust_remote_code)
    module_names = [n for n, _ in meta.named_modules()]
    linear = linear_layers(meta)
    for t in targets:
        if not _matches(module_names, t):
            raise ConfigError(f"--lora-target {t!r} names no module of {cfg.model}; its linear layers are: {', '.join(linear)}")
    for t in to_save:
        if not _matches(module_names, t):
            tops = sorted({n.rsplit(".", 1)[-1] for n in module_names if n})
            raise ConfigError(f"--lora-modules-to-save {t!r} names no module of {cfg.model}; its modules include: {', '.join(tops)}")
    base_name = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else str(cfg.model)
    return LoraSpec(r=cfg.lora_r, alpha=float(cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r),
                    dropout=cfg.lora_dropout, targets=tuple(targets or linear), modules_to_save=tuple(to_save),
                    use_dora=cfg.use_dora, quantization=quantization, base_name=base_name)


def quantization_config(spec: LoraSpec | None) -> Any:
    """transformers' BitsAndBytesConfig for QLoRA (nf4, double quantization, bf16 compute)."""
    if spec is None or spec.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if spec.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


# --------------------------------------------------------------------------- applying
def apply_lora(model: Any, spec: LoraSpec, *, resume_from: Path | None = None, gradient_checkpointing: bool = False) -> Any:
    """Wrap `model` (the base) with fresh adapters, or with the adapter saved in `resume_from`."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training, set_peft_model_state_dict

    if spec.quantization:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,  # type: ignore[arg-type]  # a float alpha is fine
                        target_modules=list(spec.targets),
                        modules_to_save=list(spec.modules_to_save) or None, use_dora=spec.use_dora, bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.peft_config["default"].base_model_name_or_path = spec.base_name
    if resume_from is not None:
        from safetensors.torch import load_file

        weights = load_file(str(resume_from / ADAPTER_WEIGHTS))
        result = set_peft_model_state_dict(model, weights)
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k or "modules_to_save" in k]
        if missing or getattr(result, "unexpected_keys", []):
            raise ConfigError(f"--resume: {resume_from}/{ADAPTER_WEIGHTS} does not fit this run's adapters "
                              f"(missing {missing[:3]}, unexpected {list(getattr(result, 'unexpected_keys', []))[:3]})")
    return model


def peft_model_of(model: Any) -> Any | None:
    """The peft model inside `model` (a DeepSpeed engine, a peft model), or None."""
    inner = getattr(model, "module", model)
    return inner if hasattr(inner, "disable_adapter") and hasattr(inner, "peft_config") else None


def save_base_identity(path: Path, spec: LoraSpec, model_hash: str) -> None:
    (path / BASE_FILE).write_text(json.dumps({"base_model": spec.base_name, "model_hash": model_hash}, indent=2), encoding="utf-8")


class AdaptersDisabled:
    """`model` with its adapters off: the base model, without a copy (peft's disable_adapter
    around every forward). Enough of a module for `packed_token_stats` and `sequence_logps`."""

    def __init__(self, model: Any):
        self._model = model
        peft = peft_model_of(model)
        assert peft is not None, "AdaptersDisabled needs a peft model"
        self.module = peft  # `_head_inputs` reads config / decoder / head from `.module`

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        was_training = self._model.training
        if was_training:
            self._model.eval()  # a reference runs without dropout
        try:
            with self.module.disable_adapter():
                return self._model(*args, **kwargs)
        finally:
            if was_training:
                self._model.train()

    @property
    def training(self) -> bool:
        return bool(self._model.training)

    def eval(self) -> AdaptersDisabled:
        self._model.eval()
        return self

    def train(self, mode: bool = True) -> AdaptersDisabled:
        self._model.train(mode)
        return self


# --------------------------------------------------------------------------- loading adapter checkpoints
def base_of(adapter_dir: str | Path) -> Path:
    """The base model directory an adapter checkpoint names (adapter_config.json)."""
    from irtrain.models import resolve_model

    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the adapter config: {e}") from None
    if not name:
        raise ConfigError(f"{path}: names no base model (base_model_name_or_path)")
    return resolve_model(name, flag=f"the base model of {adapter_dir}")


def root_model(path: Path) -> Path:
    """The full model under a chain of adapter checkpoints (an adapter trained on an adapter
    checkpoint, as the alternating schedule's stages are), or `path` itself."""
    seen = []
    while is_adapter_dir(path):
        if path in seen:
            raise ConfigError(f"{path}: adapter checkpoints name each other as base models")
        seen.append(path)
        path = base_of(path)
    return path


def check_base(adapter_dir: Path, base: Path) -> None:
    """An adapter checkpoint trained on another base than `base` is refused (by the base's hash
    recorded in irtrain_base.json, when the checkpoint has one)."""
    from irtrain.models import model_hash

    record = Path(adapter_dir) / BASE_FILE
    if not record.is_file():
        return
    want = json.loads(record.read_text(encoding="utf-8")).get("model_hash", "")
    have = model_hash(base)
    if want and have != want:
        raise ConfigError(f"{adapter_dir} is an adapter trained on another base model (hash {want[:12]}) than {base} "
                          f"(hash {have[:12]}); give the base it was trained on")


def load_causal_lm(path: str | Path, *, base: Path | None = None, **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)`, or, for an adapter checkpoint,
    its base (`base` or the one its config names, checked by hash) with the adapter merged in."""
    from transformers import AutoModelForCausalLM

    if not is_adapter_dir(path):
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    _need_peft(f"{path} (an adapter checkpoint)")
    from peft import PeftModel

    base_path = base if base is not None else base_of(path)
    check_base(Path(path), base_path)
    model = load_causal_lm(base_path, **kwargs)
    return PeftModel.from_pretrained(model, str(path)).merge_and_unload()


def merge_to(base: Path, adapter_dir: Path, dest: Path, *, tokenizer: Any = None, trust_remote_code: bool = False) -> Path:
    """Write base + adapter as one full model directory `dest` (temporary name, then renamed)."""
    model = load_causal_lm(adapter_dir, base=base, dtype="auto", trust_remote_code=trust_remote_code)
    from irtrain.durable import publish, temp_name

    tmp = temp_name(dest)
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    return publish(tmp, dest)
