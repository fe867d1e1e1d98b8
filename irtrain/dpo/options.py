"""The loss options of a dpo run, checked and resolved before anything is loaded."""
from __future__ import annotations

from dataclasses import dataclass

from irtrain.config import DPOConfig
from irtrain.errors import ConfigError
from irtrain.losses import PREFERENCE_LOSSES, PreferenceLoss

#: shard formats each loss family trains on (plackett_luce with K = 2 is sigmoid, so pairs work too)
DATA_FORMATS = {"preference": ("preference",), "unpaired": ("unpaired",), "ranked": ("ranked",)}
EXTRA_FORMATS = {"plackett_luce": ("preference",)}

#: the option behind each loss parameter, for error messages
_FLAGS = {"label_smoothing": "--label-smoothing", "gamma": "--gamma", "alpha": "--infonca-alpha",
          "desirable_weight": "--desirable-weight", "undesirable_weight": "--undesirable-weight"}


def allowed_formats(loss: str) -> tuple[str, ...]:
    """The shard formats `loss` trains on."""
    return DATA_FORMATS[PREFERENCE_LOSSES[loss].data_format] + EXTRA_FORMATS.get(loss, ())


def format_hint(loss: str) -> str:
    """What to prepare for `loss`, for the error on shards of another format."""
    fmt = PREFERENCE_LOSSES[loss].data_format
    if loss == "kto":
        return ("kto trains on unpaired shards (one response with a desirable/undesirable label); prepare them with "
                "--format unpaired, or use a paired loss")
    if fmt == "preference":
        return f"{loss} trains on preference shards (chosen and rejected); prepare them with --format preference"
    return f"{loss} trains on ranked shards (K scored candidates); prepare them with --format ranked"


@dataclass(frozen=True)
class LossSetup:
    """The loss of a run as resolved from `DPOConfig`: table entry, beta and its params."""

    name: str
    beta: float
    params: dict[str, float]
    reference: bool  # whether reference log-probs are used at all (False with --reference-free)

    @property
    def spec(self) -> PreferenceLoss:
        return PREFERENCE_LOSSES[self.name]


def resolve_loss(cfg: DPOConfig) -> LossSetup:
    """Check the loss options of `cfg` and resolve beta (ORPO: its lambda) and the loss's
    params. `ConfigError` on anything that does not fit the loss."""
    spec = PREFERENCE_LOSSES[cfg.loss]
    if cfg.reference_free and spec.needs_ref:
        free = ", ".join(n for n, s in PREFERENCE_LOSSES.items() if not s.needs_ref)
        raise ConfigError(f"--reference-free: the {cfg.loss} loss needs a reference model (reference-free losses: {free})")
    if cfg.reference_free and cfg.ref_model:
        raise ConfigError("--reference-free and --ref-model contradict each other: give one")
    if cfg.loss == "orpo":
        if cfg.beta is not None:
            raise ConfigError("orpo has no beta: its weight lambda is --orpo-lambda")
        beta = cfg.orpo_lambda
    else:
        beta = spec.default_beta if cfg.beta is None else cfg.beta
    if not beta > 0:
        raise ConfigError(f"--{'orpo-lambda' if cfg.loss == 'orpo' else 'beta'} must be > 0, got {beta}")
    given = {"label_smoothing": cfg.label_smoothing, "gamma": cfg.gamma, "alpha": cfg.infonca_alpha,
             "desirable_weight": cfg.desirable_weight, "undesirable_weight": cfg.undesirable_weight}
    try:
        params = spec.check_params(**given)
    except ValueError as e:
        key = str(e).split("=", 1)[0]
        raise ConfigError(f"{_FLAGS.get(key, key)}: {e} (loss {cfg.loss})") from None
    if "label_smoothing" in params:
        eps = params["label_smoothing"]
        if not (0.0 <= eps <= 0.5 if cfg.loss == "sigmoid" else 0.0 <= eps < 0.5):
            raise ConfigError(f"--label-smoothing {eps} must be in [0, 0.5{']' if cfg.loss == 'sigmoid' else ')'} for {cfg.loss}")
    if "alpha" in params and not params["alpha"] > 0:
        raise ConfigError(f"--infonca-alpha must be > 0, got {params['alpha']}")
    if cfg.loss == "kto" and (cfg.desirable_weight < 0 or cfg.undesirable_weight < 0):
        raise ConfigError("--desirable-weight and --undesirable-weight must be >= 0")
    if cfg.sft_coef < 0:
        raise ConfigError(f"--sft-coef must be >= 0, got {cfg.sft_coef}")
    return LossSetup(cfg.loss, float(beta), params, reference=not cfg.reference_free)
