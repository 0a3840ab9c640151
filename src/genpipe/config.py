"""Typed, validated parameters: params.yaml -> frozen pydantic models.

One source of truth. Anything unknown, mistyped or out of range stops the stage before any
work, with the dotted key path (e.g. `tokenizer.codebook_size`) and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from genpipe.data.catalog import SOURCES

PARAMS_FILE = "params.yaml"
SourceName = Literal[tuple(SOURCES)]  # type: ignore[valid-type]  # the one list of sources


class ParamsError(ValueError):
    """params.yaml is unreadable or invalid; the message names each bad key."""


# `register` is a stage name; pydantic warns that it shadows BaseModel.register (unused here).
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Section(BaseModel):
    # no float knob means anything at inf or NaN; "disable" is spelled 0 (or null) instead
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Base(Section):
    preset: str = Field(
        "digits",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="the presets/<name>.yaml (or auto) this file started from: genpipe preset",
    )
    seed: int = Field(0, ge=0, description="seed for every random draw of every stage")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: CUDA when present, else CPU; mps (Apple) only when named"
    )
    compile: bool = Field(
        False, description="torch.compile the model every training loop trains (CUDA only)"
    )
    source: SourceName = "digits"
    source_path: str | None = Field(None, description="folder or download root for the source")


class Prepare(Section):
    train_frac: float = Field(0.7, gt=0, lt=1)
    val_frac: float = Field(0.15, gt=0, lt=1)
    image_size: int = Field(8, ge=4, le=256)
    channels: Literal[1, 3] = 1

    @model_validator(mode="after")
    def _fractions(self) -> Prepare:
        if self.train_frac + self.val_frac >= 1:
            raise ValueError(
                f"val_frac: train_frac + val_frac must be < 1 to leave a test split "
                f"(got {self.train_frac} + {self.val_frac})"
            )
        return self


class Optim(Section):
    """Shared optimisation knobs; every training section embeds one as `optim`."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 disables clipping")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of weights; 0 disables")
    checkpoint_every: int = Field(200, ge=0, description="steps between checkpoints; 0 = never")


class PriorOptim(Optim):
    """The prior's optimisation knobs: `steps: null` takes `prior.steps_by_kind` for the kind
    that runs (kinds converge at different speeds: diffusion needs about 3x AR's steps)."""

    steps: int | None = Field(None, ge=1, description="null = prior.steps_by_kind[kind]")


class Tokenizer(Section):
    channels: list[int] = Field([32, 64], min_length=1)
    num_res_blocks: int = Field(1, ge=0)
    embed_dim: int = Field(64, ge=1)
    quantizer: Literal["vq", "fsq"] = "vq"
    codebook_size: int = Field(128, ge=2)
    code_dim: int | None = Field(None, ge=1, description="projected code dim; null = embed_dim")
    beta: float = Field(0.25, ge=0)
    ema: bool = True
    decay: float = Field(0.99, gt=0, lt=1)
    kmeans_init: bool = True
    dead_code_threshold: float = Field(1.0, ge=0)
    cosine: bool = False
    fsq_levels: list[int] = Field([8, 5, 5, 5], min_length=1)
    recon_loss: Literal["l1", "l2"] = "l2"
    perceptual_weight: float = Field(0.0, ge=0, description="needs the pretrain encoder")
    disc_weight: float = Field(0.0, ge=0, description="PatchGAN hinge loss; 0 disables")
    disc_start: int = Field(500, ge=0)
    disc_layers: int = Field(1, ge=0)
    disc_max_weight: float = Field(1.0, gt=0)
    init_from_ssl: bool = False
    optim: Optim = Optim()

    @model_validator(mode="after")
    def _codes(self) -> Tokenizer:
        if self.quantizer == "vq" and self.code_dim is not None and self.code_dim > self.embed_dim:
            raise ValueError(
                f"code_dim: {self.code_dim} must not exceed embed_dim ({self.embed_dim}): "
                "projected codes are lower-dimensional"
            )
        if self.quantizer == "fsq" and any(level < 2 for level in self.fsq_levels):
            raise ValueError(f"fsq_levels: every level must be >= 2 (got {self.fsq_levels})")
        return self

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)


class Pretrain(Section):
    method: Literal["simclr", "mae"] = "simclr"
    temperature: float = Field(0.2, gt=0, description="NT-Xent temperature (simclr)")
    proj_dim: int = Field(64, ge=1, description="projection head output (simclr)")
    crop_scale: list[float] = Field([0.6, 1.0], min_length=2, max_length=2)
    degrees: float = Field(10.0, ge=0, le=180)
    translate: float = Field(0.1, ge=0, lt=1)
    noise_std: float = Field(0.05, ge=0)
    mask_ratio: float = Field(0.5, gt=0, lt=1, description="share of patches masked (mae)")
    patch_size: int = Field(1, ge=1, description="mae patch size in pixels")
    knn_k: int = Field(5, ge=1)
    optim: Optim = Optim()


class Judge(Section):
    arch: Literal["cnn", "resnet", "mlp"] = "cnn"
    width: int = Field(32, ge=4)
    dropout: float = Field(0.1, ge=0, lt=1)
    seed: int = Field(1, ge=0, description="each judge has its own seed")
    optim: Optim = Optim()


class Judges(Section):
    reward: Judge = Judge(arch="mlp", width=256, dropout=0.2, seed=1)
    evaluator: Judge = Judge(arch="cnn", seed=2)

    @model_validator(mode="after")
    def _independent(self) -> Judges:
        if self.reward.arch == self.evaluator.arch or self.reward.seed == self.evaluator.seed:
            raise ValueError(
                "evaluator: must differ from the reward judge in arch and seed, so reward "
                "hacking shows up in evaluation"
            )
        return self


def _per_kind(
    values: dict[str, Any], minimum: float, expected: str, check_kind: Callable[[str], object]
) -> dict[str, Any]:
    """A `{prior kind: number}` map's check: every kind registered, every number >= minimum.
    The validators pass `prior_kind` in: imports inside validators are no stage's code dep."""
    for kind, value in values.items():
        check_kind(kind)
        if value < minimum:
            raise ValueError(f"{kind}: expected {expected}, got {value}")
    return values


class Prior(Section):
    """The prior over codes. `kind` names a file of models/priors (ar, diffusion, ...); a kind
    reads the knobs below that apply to it (a new kind with knobs of its own adds them here)."""

    kind: str = Field("ar", description="a prior kind of genpipe.models.priors.PRIOR_KINDS")
    dim: int = Field(128, ge=8)
    depth: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    class_dropout: float = Field(0.1, ge=0, lt=1)
    pos: Literal["rope2d", "learned"] = "rope2d"
    cfg_scale: float | None = Field(
        None,
        ge=0,
        description="classifier-free guidance at sampling, for any kind; null = cfg_by_kind",
    )
    cfg_by_kind: dict[str, float] = Field(
        {},
        description="guidance per kind when cfg_scale is null; a kind not listed takes its own",
    )
    guidance_interval: list[float] = Field(
        [0.0, 0.6],
        min_length=2,
        max_length=2,
        description="noise levels guided, as sigma/(alpha+sigma) (diffusion)",
    )
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    formulation: Literal["flow_matching", "edm", "ddpm"] = "flow_matching"
    prediction: Literal["eps", "v"] = Field("v", description="ddpm target")
    sampler: Literal["euler", "heun", "ddim"] = "euler"
    sampling_steps: int = Field(20, ge=1)
    eta: float = Field(0.0, ge=0, description="ddim stochasticity")
    decoding_steps: int = Field(8, ge=1, description="parallel decoding steps (maskgit)")
    choice_temperature: float = Field(
        4.5, ge=0, description="Gumbel noise on which cells to fix first, annealed (maskgit)"
    )
    samples_per_class: int = Field(50, ge=1, description="for the consistency metric")
    align_weight: float = Field(
        0.0,
        ge=0,
        description="REPA: weight of the cosine loss aligning a block's hidden states with the "
        "frozen SSL encoder's features at the same grid cell; 0 = off",
    )
    align_depth: int = Field(1, ge=1, description="REPA: the block (1 = first) that is aligned")
    steps_by_kind: dict[str, int] = Field(
        {"ar": 800, "diffusion": 2400, "maskgit": 800},
        description="training steps per kind, taken when optim.steps is null",
    )
    optim: PriorOptim = PriorOptim()

    @field_validator("kind")
    @classmethod
    def _kind(cls, kind: str) -> str:
        from genpipe.models.priors import prior_kind  # torch: only once params are parsed

        prior_kind(kind)
        return kind

    @field_validator("steps_by_kind")
    @classmethod
    def _steps_by_kind(cls, steps: dict[str, int]) -> dict[str, int]:
        from genpipe.models.priors import prior_kind  # torch: only once params are parsed

        return _per_kind(steps, 1, "at least 1 training step", prior_kind)

    @field_validator("cfg_by_kind")
    @classmethod
    def _cfg_by_kind(cls, scales: dict[str, float]) -> dict[str, float]:
        from genpipe.models.priors import prior_kind

        return _per_kind(scales, 0, "a guidance scale >= 0", prior_kind)

    @property
    def train_steps(self) -> int:
        """The training steps of the kind that runs: optim.steps, else its steps_by_kind."""
        return self.optim.steps if self.optim.steps is not None else self.steps_by_kind[self.kind]

    @property
    def train_optim(self) -> Optim:
        """`optim` with its steps resolved for the kind that runs (what training reads)."""
        return Optim(**{**self.optim.model_dump(), "steps": self.train_steps})

    @model_validator(mode="after")
    def _heads(self) -> Prior:
        if self.optim.steps is None and self.kind not in self.steps_by_kind:
            raise ValueError(
                f"steps_by_kind: no entry for kind {self.kind!r} while optim.steps is null; "
                f"add `{self.kind}: N` here or set prior.optim.steps"
            )
        if self.dim % self.heads:
            raise ValueError(f"heads: dim ({self.dim}) must be divisible by heads ({self.heads})")
        lo, hi = self.guidance_interval
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(
                f"guidance_interval: expected [lo, hi] with 0 <= lo < hi <= 1, got [{lo}, {hi}]"
            )
        if self.eta > 0 and self.sampler != "ddim":
            raise ValueError(
                f"eta: only the ddim sampler takes eta > 0 (sampler is {self.sampler})"
            )
        if self.align_depth > self.depth:
            raise ValueError(
                f"align_depth: must be at most depth ({self.depth}), got {self.align_depth}"
            )
        return self


class Finetune(Section):
    """GRPO fine-tuning of the prior against the reward judge, held near the frozen prior by a
    KL penalty (beta) and a hard bound (kl_bound, KL per sample over the whole generation)."""

    steps: int = Field(60, ge=1, description="policy-gradient steps (one batch of samples each)")
    prompts_per_step: int = Field(10, ge=1, description="class labels per step, cycled")
    group_size: int = Field(8, ge=2, description="samples per prompt; advantages within a group")
    advantage: Literal["grpo", "dr_grpo"] = Field(
        "grpo", description="grpo: centred and divided by the group std; dr_grpo: centred only"
    )
    adv_std_floor: float = Field(
        0.1, ge=0, description="grpo: the group std divided by is at least this (reward units)"
    )
    inner_iters: int = Field(2, ge=1, description="optimiser updates per batch of samples")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip of the importance ratio")
    beta: float = Field(0.05, ge=0, description="weight of the KL penalty to the prior")
    kl_estimator: Literal["auto", "k3", "exact"] = Field(
        "auto",
        description="k3 at the sampled actions, or exact per code (ar); auto: exact where the "
        "kind has it",
    )
    kl_penalty: Literal["loss", "reward"] = Field(
        "loss",
        description="loss: beta * KL added to the loss at the visited states; reward: beta * "
        "log(p_policy / p_prior) of each sample subtracted from its reward (whose optimum is "
        "the tilt p_prior exp(reward / beta))",
    )
    kl_bound: float = Field(5.0, gt=0, description="stop early when the KL per sample passes it")
    rail_window: int = Field(
        5, ge=1, description="batches averaged for the KL bound and for choosing the best step"
    )
    interpolate: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of RL's update saved: prior + x * (RL's kept weights - prior), the "
        "line back to the prior (WiSE-FT, WARP's LITI); 1 = RL's weights",
    )
    ema: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="decay of an EMA of the policy's weights, started at the prior; > 0 keeps "
        "the EMA's weights at the best step instead of the policy's (0 = off)",
    )
    policies: int = Field(
        1,
        ge=1,
        description="GRPO runs from the prior, run i with rollout seed base.seed + i; their kept "
        "weights averaged before `interpolate` (WARP's weight averaging): seed-specific drift "
        "averages out, the shared reward direction does not (cost: x runs)",
    )
    lr: float = Field(1e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 disables clipping")
    rewards: dict[str, float] = Field(
        {"class_confidence": 1.0}, min_length=1, description="reward name -> weight"
    )
    reward_entry_points: dict[str, str] = Field(
        {}, description='your own rewards: name -> "module:function" (see genpipe.rewards)'
    )
    confidence_cap: float = Field(
        0.99, gt=0, le=1, description="class_confidence stops rising at this probability; 1 = off"
    )
    realism_k: int = Field(
        1, ge=1, description="realism: the k-th nearest neighbour whose distance it compares"
    )
    realism_samples_per_class: int = Field(
        500, ge=2, description="realism: frozen-prior samples per class it compares against"
    )
    cfg_scale: float | None = Field(
        None, ge=0, description="guidance while sampling for RL; null = the prior's own, 1 = off"
    )
    temperature: float = Field(1.0, gt=0, description="ar sampling temperature for RL")
    diffusion_eta: float = Field(1.0, gt=0, description="ddim stochasticity for RL (diffusion)")
    diffusion_steps: int = Field(10, ge=2, description="ddim steps while sampling for RL")
    train_step_fraction: float = Field(
        0.5, gt=0, le=1, description="share of denoising steps trained per batch (diffusion)"
    )
    eval_samples_per_class: int = Field(100, ge=2, description="for the before/after metrics")
    checkpoint_every: int = Field(20, ge=0, description="steps between checkpoints; 0 = never")

    @model_validator(mode="after")
    def _rewards(self) -> Finetune:
        from genpipe.rewards import BUILTINS  # torch: only once params are parsed

        for name, spec in self.reward_entry_points.items():
            if name in BUILTINS:
                raise ValueError(
                    f"reward_entry_points.{name}: shadows the built-in reward; pick another name"
                )
            if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", spec):
                raise ValueError(
                    f"reward_entry_points.{name}: expected 'module:function', got {spec!r}"
                )
        allowed = ", ".join(sorted({*BUILTINS, *self.reward_entry_points}))
        for name in self.rewards:
            if name not in BUILTINS and name not in self.reward_entry_points:
                raise ValueError(
                    f"rewards.{name}: unknown reward; allowed: {allowed} "
                    "(add your own under finetune.reward_entry_points)"
                )
        return self


class Evaluate(Section):
    samples_per_class: int = Field(100, ge=2, description="generated images per class")
    knn_k: int = Field(3, ge=1, description="k of the k-NN precision/recall manifolds")


class Register(Section):
    prior: Literal["finetuned", "base"] = "finetuned"
    # the gate compares bootstrap intervals: only metrics evaluation gives one are offered
    primary_metric: Literal["fid_ratio", "precision", "recall", "class_consistency"] = "fid_ratio"
    margin: float = Field(
        1.0,
        ge=0,
        description="promote only if the candidate beats the champion by more than this many "
        "combined half-widths of their intervals (0: any gain)",
    )


class Params(Section):
    base: Base = Base()
    prepare: Prepare = Prepare()
    pretrain: Pretrain = Pretrain()
    judges: Judges = Judges()
    tokenizer: Tokenizer = Tokenizer()
    prior: Prior = Prior()
    finetune: Finetune = Field(default_factory=Finetune)  # built on parse: imports rewards
    evaluate: Evaluate = Evaluate()
    register: Register = Register()

    @model_validator(mode="after")
    def _cross_section(self) -> Params:
        size, f = self.prepare.image_size, self.tokenizer.downsample
        if size % f or size // f < 2:
            raise ValueError(
                f"tokenizer.channels: {len(self.tokenizer.channels)} levels downsample by {f}, "
                f"which must divide prepare.image_size ({size}) and leave a grid of at least 2x2"
            )
        return self

    def pick(self, *keys: str) -> dict[str, Any]:
        """{key: plain value} of sections (`prior`) or dotted keys (`tokenizer.channels`), as a
        stage declares what it reads: logged to MLflow and hashed for lineage."""
        out: dict[str, Any] = {}
        for key in keys:
            value: Any = self
            for part in key.split("."):
                value = getattr(value, part)
            out[key] = value.model_dump() if isinstance(value, BaseModel) else value
        return out

    def digest(self, *keys: str) -> str:
        """Stable hash of `base` and the named keys, so a run records which params made it."""
        payload = self.pick(*sorted({"base", *keys}))
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _format_errors(exc: ValidationError, path: Path) -> str:
    lines = [f"{path}: invalid parameters (fix these keys and run again):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        msg = err["msg"].removeprefix("Value error, ")
        # validators name their key first ("code_dim: ..."); make it a full dotted path
        if err["type"] == "value_error" and (m := re.match(r"([a-z_][a-z0-9_.]*): (.*)", msg)):
            key, msg = ".".join(filter(None, [key, m.group(1)])), m.group(2)
        if err["type"] == "extra_forbidden":
            msg = "unknown key (a typo? check the section's allowed keys in README)"
        got_repr = (
            "" if isinstance(got, dict) or err["type"] == "value_error" else f" (got {got!r})"
        )
        lines.append(f"  - {key}: {msg}{got_repr}")
    return "\n".join(lines)


def parse_params(raw: Any, path: Path = Path(PARAMS_FILE)) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_format_errors(exc, path)) from None


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that `1e-4` is a float (as in YAML 1.2, and in DVC, which
    reads params.yaml with ruamel), not the string YAML 1.1 makes of an exponent without a dot."""


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_params_yaml(text: str) -> Any:
    """params.yaml text -> plain data, `1e-4` read as a float; raises yaml.YAMLError."""
    return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 - a SafeLoader subclass


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root or pass --params")
    try:
        raw = read_params_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw, path)
