"""Joint SFT+DPO with an adaptive λ (FORMULAS.md "Multi-objective and alternating SFT/DPO",
seed 001 App. D; the paper found it hurts, the tool exists to reproduce and study that).

`irtrain dpo --joint-sft SFT_DIR`: the SFT shards join the training data, so every step
samples both kinds of rows; the loss is `L_sft + λ·L_pref` with `L_sft` the per-token `ce`
of the SFT rows (reduced by the SFT tokens of the step) and `L_pref` the preference loss
(mean over the step's pairs). Every `--lambda-interval` steps the preference accuracy of
those steps (`rewards/accuracies`, reduced over ranks by the loop) is compared with
`--target-accuracy` (`adapt_lambda`). `joint/lambda` is logged every step.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from irtrain.config import DPOConfig
from irtrain.errors import ConfigError, ShardError
from irtrain.shards import SFT_FORMATS, ShardSet


def adapt_lambda(lam: float, accuracy: float, cfg: DPOConfig) -> float:
    """FORMULAS.md "Multi-objective and alternating SFT/DPO": if a* - acc <= delta then
    lambda/2 else 2 lambda, clamped to [min, max].

    (Preference accuracy close enough to the target: weigh the preference term less.)"""
    new = lam / 2 if cfg.target_accuracy - accuracy <= cfg.lambda_delta else lam * 2
    return float(min(max(new, cfg.lambda_min), cfg.lambda_max))


def check_joint_config(cfg: DPOConfig) -> None:
    if cfg.alternate_with:
        raise ConfigError("--joint-sft and --alternate-with are two different schedules: give one")
    if cfg.loss == "kto":
        raise ConfigError("--joint-sft adapts lambda on the preference accuracy, which kto (unpaired data) does not have")
    if not 0 < cfg.target_accuracy <= 1:
        raise ConfigError(f"--target-accuracy must be in (0, 1], got {cfg.target_accuracy}")
    if cfg.lambda_interval < 1:
        raise ConfigError(f"--lambda-interval must be >= 1, got {cfg.lambda_interval}")
    if cfg.lambda_delta < 0:
        raise ConfigError(f"--lambda-delta must be >= 0, got {cfg.lambda_delta}")
    if not 0 < cfg.lambda_min <= cfg.lambda_init <= cfg.lambda_max:
        raise ConfigError(f"need 0 < --lambda-min <= --lambda-init <= --lambda-max, got {cfg.lambda_min}, {cfg.lambda_init}, {cfg.lambda_max}")


def joint_config(cfg: DPOConfig) -> DPOConfig:
    """The run's config with the SFT shards added to its data (idempotent, so a resolved
    config.toml fed back with --resume gives the same data)."""
    check_joint_config(cfg)
    assert cfg.joint_sft is not None
    sft = ShardSet(cfg.joint_sft)
    if sft.format not in SFT_FORMATS:
        raise ShardError(f"--joint-sft {cfg.joint_sft}: needs chat or prompt-completion shards, got `{sft.format}`")
    data = list(cfg.data)
    if str(cfg.joint_sft) not in data:
        data.append(str(cfg.joint_sft))
    if cfg.weights and len(cfg.weights) != len(data):
        raise ConfigError(f"--weights gives {len(cfg.weights)} weight(s) for {len(data)} data source(s): with --joint-sft, "
                          "one per preference directory and a last one for the --joint-sft shards")
    return dataclasses.replace(cfg, data=data)


class AdaptiveLambda:
    """λ and the preference accuracy seen since it last changed: `begin_step(step)` adapts it
    every `--lambda-interval` steps, `end_step(correct, pairs)` adds a step's reduced counts.
    Saved in checkpoints (`state_dict`) for an exact resume."""

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg
        self.lam = float(cfg.lambda_init)
        self.window = [0.0, 0.0]  # (correct, pairs) since lambda last changed

    def begin_step(self, step: int) -> None:
        """Before optimizer step `step` (0-based, so `step` steps are done)."""
        if step > 0 and step % self.cfg.lambda_interval == 0:
            correct, pairs = self.window
            if pairs > 0:
                self.lam = adapt_lambda(self.lam, correct / pairs, self.cfg)
            self.window = [0.0, 0.0]

    def end_step(self, correct: float, pairs: float) -> None:
        self.window = [self.window[0] + correct, self.window[1] + pairs]

    def state_dict(self, step: int) -> dict[str, Any]:
        return {"step": step, "lambda": self.lam, "window": list(self.window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.lam, self.window = float(state["lambda"]), list(state["window"])
