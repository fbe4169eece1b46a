"""Run and site settings shared by the coordinator and the sites.

One pydantic model per configuration file or table, so that a typo or a bad
value is refused with the field's name before anything trains.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: Default bound on |value| in an arriving global model (SiteConfig ``max-model-abs``).
DEFAULT_MAX_MODEL_ABS = 1e4
#: Default noise (σ per histogram bin) on a site's evaluation release; see docs/privacy.md for its ε cost.
DEFAULT_EVALUATION_NOISE = 10.0


class ConfigError(Exception):
    """A configuration file or table is invalid; the message names the field and the fix."""


def describe_validation(source: str | Path, err: ValidationError, fix: str) -> str:
    """A pydantic error as one message: the file, each field and its problem, then ``fix``."""
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  - {field}: {e['msg']}")
    lines.append(fix)
    return "\n".join(lines)


def _explain(source: str, err: ValidationError) -> ConfigError:
    return ConfigError(describe_validation(source, err, "Fix the field(s) above and start again."))


#: Aggregation strategies a run may name (Flower's Message-API strategies of the same names).
Strategy = Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "bulyan"]
#: The strategies that tolerate a malicious site: each needs to see every site's update on its own.
ROBUST_STRATEGIES: tuple[str, ...] = ("fedmedian", "fedtrimmedavg", "krum", "bulyan")
#: Default bound on the L2 norm of one site's update (reply − global model); see docs/deployment.md.
DEFAULT_MAX_UPDATE_NORM = 100.0


class RunConfig(BaseModel):
    """Settings of one federated run: `[tool.flwr.app.config]` in pyproject.toml.

    Keys use Flower's kebab-case (``num-server-rounds``); unknown keys are
    refused so that a misspelt setting is never silently ignored.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    num_server_rounds: int = Field(20, ge=1, alias="num-server-rounds")
    strategy: Strategy = "fedavg"
    fraction_train: float = Field(1.0, gt=0.0, le=1.0, alias="fraction-train")
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0, alias="fraction-evaluate")
    min_train_nodes: int = Field(2, ge=1, alias="min-train-nodes")
    min_evaluate_nodes: int = Field(2, ge=1, alias="min-evaluate-nodes")
    min_available_nodes: int = Field(2, ge=1, alias="min-available-nodes")
    proximal_mu: float = Field(0.01, ge=0.0, alias="proximal-mu")
    server_lr: float = Field(0.01, gt=0.0, alias="server-lr")
    local_epochs: int = Field(2, ge=1, alias="local-epochs")
    batch_size: int = Field(256, ge=1, alias="batch-size")
    lr: float = Field(0.01, gt=0.0)
    lr_schedule: Literal["constant", "cosine"] = Field("constant", alias="lr-schedule")  # over the run's rounds
    optimizer: Literal["sgd", "adam"] = "adam"
    keep_optimizer_state: bool = Field(True, alias="keep-optimizer-state")  # on the site's disk, never sent
    noise_multiplier: float = Field(0.5, ge=0.0, alias="noise-multiplier")
    max_grad_norm: float = Field(1.0, gt=0.0, alias="max-grad-norm")
    # Record-level DP at the sites (issue 5): the run's accountant, noise calibration to each
    # site's cap (noise-multiplier is then the floor), Opacus' per-sample-gradient mode (same
    # guarantee in every mode; "auto" = the fastest measured for the study's network, models.registry.DEFAULT_MODE).
    accountant: Literal["rdp", "prv"] = "prv"
    calibrate_noise: bool = Field(True, alias="calibrate-noise")
    grad_sample_mode: Literal["auto", "hooks", "functorch", "ew", "ghost"] = Field("auto", alias="grad-sample-mode")
    # A multiple of 4 (models.network.IMAGE_MULTIPLE): the scattering front end subsamples by 4.
    image_size: int = Field(64, ge=16, le=512, multiple_of=4, alias="image-size")
    # The study (models.study.Study) as canonical JSON; "" is the default study (binary soft-tissue CT at
    # image-size). A study carries its own image size. `medfed run --study FILE` and `medfed simulate` set it.
    study: str = ""
    # Coordinator only: the folder the study's initial weights are read from (the study file's folder).
    study_dir: str = Field("", alias="study-dir")
    # Coordinator only: the consortium's release key; set, the end of a run writes a signed release/.
    release_key: str = Field("", alias="release-key")
    device: Literal["cpu", "cuda"] = "cpu"
    out_dir: str = Field("medfed-out", alias="out-dir")
    demo_dir: str = Field("", alias="demo-dir")
    round_timeout: float = Field(900.0, gt=0.0, alias="round-timeout")
    seed: int = 0
    # Deployment (issue 6): a stable run name keys each site's ledger across a resume.
    run_name: str = Field("", alias="run-name", pattern=r"^[A-Za-z0-9._-]*$")
    resume: bool = False
    # Secure aggregation (Flower's SecAgg+): the strategy only ever sees the sum of the updates.
    secagg: bool = False
    secagg_num_shares: float = Field(1.0, gt=0.0, alias="secagg-num-shares")  # <=1: fraction of sampled sites
    secagg_threshold: float = Field(0.67, gt=0.0, alias="secagg-threshold")   # <=1: fraction of the shares
    secagg_clipping_range: float = Field(8.0, gt=0.0, alias="secagg-clipping-range")
    # SecAgg+ scales each model by its weight (training examples) / max-weight before clipping it to
    # ± clipping-range; a site refuses when that would clip (site_client.secagg.range_problem).
    secagg_max_weight: float = Field(10000.0, gt=0.0, alias="secagg-max-weight")
    # Site-level DP (issue 5, second layer): Flower's DP wrappers; the coordinator reports site-level ε.
    site_dp: Literal["off", "client-fixed", "server-fixed", "server-adaptive"] = Field("off", alias="site-dp")
    site_dp_noise_multiplier: float = Field(1.0, gt=0.0, alias="site-dp-noise-multiplier")
    site_dp_clipping_norm: float = Field(1.0, gt=0.0, alias="site-dp-clipping-norm")
    site_dp_delta: float = Field(1e-5, gt=0.0, lt=1.0, alias="site-dp-delta")
    site_dp_target_quantile: float = Field(0.5, ge=0.0, le=1.0, alias="site-dp-target-quantile")
    site_dp_clip_lr: float = Field(0.2, gt=0.0, alias="site-dp-clip-lr")
    site_sampling: Literal["fixed", "poisson"] = Field("fixed", alias="site-sampling")
    # A malicious site (docs/deployment.md): aggregation weights, the update-norm bound (0: none),
    # what krum/bulyan assume and how much fedtrimmedavg cuts from each tail.
    site_weights: Literal["uniform", "reported"] = Field("uniform", alias="site-weights")
    max_update_norm: float = Field(DEFAULT_MAX_UPDATE_NORM, ge=0.0, alias="max-update-norm")
    num_malicious_sites: int = Field(1, ge=0, alias="num-malicious-sites")
    trim_beta: float = Field(0.34, ge=0.0, lt=0.5, alias="trim-beta")

    @model_validator(mode="after")
    def _minimums_consistent(self) -> RunConfig:
        if self.min_available_nodes < max(self.min_train_nodes, self.min_evaluate_nodes):
            raise ValueError(
                "min-available-nodes must be at least min-train-nodes and min-evaluate-nodes"
            )
        if self.site_dp != "off" and self.strategy == "fedadam":
            raise ValueError(
                "site-dp needs an averaging strategy (fedavg or fedprox): noise added after FedAdam's "
                "server optimizer is not the Gaussian mechanism on the mean update; set strategy=fedavg"
            )
        if self.secagg and self.site_dp in ("server-fixed", "server-adaptive"):
            raise ValueError(
                "secagg hides each site's update from the coordinator, so it cannot clip them: with "
                "secagg use site-dp=client-fixed (clipping at the sites) or site-dp=off"
            )
        if self.secagg and self.site_sampling == "poisson" and self.site_dp != "off":
            raise ValueError(
                "secagg needs at least 2 sites in every round, which Poisson sampling cannot promise; "
                "with secagg use site-sampling=fixed"
            )
        self._robustness_consistent()
        return self

    def _robustness_consistent(self) -> None:
        """Refuse the strategy combinations that cannot do what they claim (docs/deployment.md)."""
        robust = self.strategy in ROBUST_STRATEGIES
        if robust and self.secagg:
            raise ValueError(
                f"strategy={self.strategy} must see every site's update, but with secagg the coordinator sees only "
                "their sum; use strategy=fedavg with secagg, or secagg=false with a robust strategy"
            )
        if robust and self.site_dp != "off":
            raise ValueError(
                f"site-dp needs a mean of clipped updates (sensitivity C/m); strategy={self.strategy} does not "
                "average them, so the noise would not give the reported site-level epsilon: use strategy=fedavg "
                "or fedprox with site-dp"
            )
        if self.site_weights == "reported" and self.site_dp != "off":
            raise ValueError("site-dp weighs every site the same; use site-weights=uniform with site-dp")
        f, m = self.num_malicious_sites, self.min_train_nodes
        if self.strategy == "krum" and m < 2 * f + 3:
            raise ValueError(f"krum tolerates num-malicious-sites={f} only with at least {2 * f + 3} sites per round "
                             f"(2f+3); raise min-train-nodes (now {m}) or lower num-malicious-sites")
        if self.strategy == "bulyan" and m < 4 * f + 3:
            raise ValueError(f"bulyan tolerates num-malicious-sites={f} only with at least {4 * f + 3} sites per "
                             f"round (4f+3); raise min-train-nodes (now {m}) or lower num-malicious-sites")
        if self.strategy == "fedtrimmedavg" and int(self.trim_beta * m) < f:
            raise ValueError(f"fedtrimmedavg with trim-beta={self.trim_beta:g} cuts {int(self.trim_beta * m)} of "
                             f"min-train-nodes={m} sites from each tail, fewer than num-malicious-sites={f}; raise "
                             "trim-beta (below 0.5) or min-train-nodes")

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
        """Build from Flower's ``context.run_config`` layered over ``base`` (defaults if None)."""
        merged: dict[str, Any] = {} if base is None else base.to_flower()
        merged.update(dict(run_config))
        try:
            return cls.model_validate(merged)
        except ValidationError as err:
            raise _explain("the run config ([tool.flwr.app.config] / --run-config)", err) from None

    def to_flower(self) -> dict[str, Any]:
        """The kebab-case mapping Flower passes around as ``run_config``."""
        return self.model_dump(by_alias=True)

    def with_overrides(self, **overrides: Any) -> RunConfig:
        """A copy with some fields changed (python names), validated again."""
        data = self.model_dump()
        data.update(overrides)
        try:
            return RunConfig.model_validate({RunConfig.model_fields[k].alias or k: v for k, v in data.items()})
        except ValidationError as err:
            raise _explain("run config overrides", err) from None

    @property
    def secagg_uniform_weights(self) -> bool:
        """Site-level DP and site-weights=uniform weigh every site 1, so SecAgg+ sums unweighted models."""
        return self.secagg and (self.site_dp != "off" or self.site_weights == "uniform")

    @property
    def secagg_weight_bound(self) -> float:
        """SecAgg+'s ``max_weight``: 1 when every weight is 1 (no precision lost), else secagg-max-weight."""
        return 1.0 if self.secagg_uniform_weights else self.secagg_max_weight


class RunBounds(BaseModel):
    """What a run may ask of this site (site.toml ``[run-bounds]``); a run outside them is refused.

    The coordinator chooses the run config; these bounds are the site's own, checked
    at the site before anything is trained or evaluated.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    max_server_rounds: int = Field(100, ge=1, alias="max-server-rounds")
    max_local_epochs: int = Field(10, ge=1, alias="max-local-epochs")
    min_batch_size: int = Field(1, ge=1, alias="min-batch-size")
    max_batch_size: int = Field(4096, ge=1, alias="max-batch-size")
    max_lr: float = Field(1.0, gt=0.0, alias="max-lr")
    strategies: tuple[Strategy, ...] = get_args(Strategy)
    max_evaluations: int = Field(100, ge=0, alias="max-evaluations")  # evaluate requests answered per run

    def violations(self, cfg: RunConfig) -> list[str]:
        """Each setting of ``cfg`` outside these bounds, as 'field value vs bound' (empty: within)."""
        out = []
        evaluations = cfg.num_server_rounds if cfg.fraction_evaluate > 0 else 0
        for field, value, key, bound, limit_is_max in (
            ("num-server-rounds", cfg.num_server_rounds, "max-server-rounds", self.max_server_rounds, True),
            ("local-epochs", cfg.local_epochs, "max-local-epochs", self.max_local_epochs, True),
            ("batch-size", cfg.batch_size, "min-batch-size", self.min_batch_size, False),
            ("batch-size", cfg.batch_size, "max-batch-size", self.max_batch_size, True),
            ("lr", cfg.lr, "max-lr", self.max_lr, True),
            ("evaluations (rounds with fraction-evaluate > 0)", evaluations, "max-evaluations", self.max_evaluations,
             True),
        ):
            if (value > bound) if limit_is_max else (value < bound):
                side = "above" if limit_is_max else "below"
                out.append(f"{field} {value:g} is {side} the site's bound {key} = {bound:g}")
        if cfg.strategy not in self.strategies:
            out.append(f"strategy {cfg.strategy!r} is not one of the site's strategies {list(self.strategies)}")
        return out


class OutOfBounds(ConfigError):
    """The run asks more of the site than its ``[run-bounds]`` allow; the message names field and bound."""


class SiteConfig(BaseModel):
    """What a site node needs to know about itself: its `site.toml`.

    In a deployment these come from the SuperNode's ``node_config``; in the
    simulation `medfed demo` writes one `site.toml` per synthetic hospital.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    # Each description is also the comment beside the field in a kit's [site] template (site_template_lines).
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="this site's name in the consortium")
    data_dir: Path = Field(alias="data-dir", description="the de-identified store (`medfed deid run` wrote it)")
    state_dir: Path = Field(alias="state-dir", description="privacy ledger, committed updates (keep and back up)")
    audit_dir: Path | None = Field(None, alias="audit-dir", description="the audit trail (default: DATA/audit)")
    # Ed25519 key that seals the audit trail; default: the one the trail records, else STATE/audit-signing.key.
    audit_key: Path | None = Field(None, alias="audit-key", description="the key that seals the audit trail")
    # The consortium's release public key from the site's kit: a release the coordinator sends at a run's end
    # is kept (STATE/releases/) only if it verifies with this key; unset, none is kept.
    release_key: Path | None = Field(None, alias="release-key",
                                     description="the consortium's release public key (the kit's release-signing.pub)")
    # The site's privacy budget over its LIFETIME: every run on its data, every evaluation, composed.
    epsilon_cap: float = Field(alias="epsilon-cap", gt=0.0,
                               description="the site's privacy budget for its LIFETIME: every run, every evaluation")
    # Optional cap on any one run (None: a run may spend whatever the lifetime cap leaves).
    epsilon_cap_per_run: float | None = Field(None, alias="epsilon-cap-per-run", gt=0.0,
                                              description="optional: the most any one run may spend")
    delta: float = Field(1e-5, gt=0.0, lt=1.0,
                         description="must be below 1/size-bucket (and 1/n for the n training images)")
    # σ of the Gaussian noise on each bin of the evaluation histograms (sensitivity 1): the evaluation's price.
    evaluation_noise: float = Field(DEFAULT_EVALUATION_NOISE, alias="evaluation-noise", gt=0.0,
                                    description="noise on each released evaluation (docs/privacy.md: its epsilon cost)")

    # The coarse training-set size this site publishes instead of its count (FedAvg weight, Poisson
    # rate q = batch-size / size-bucket); unset: derived once from the training split and kept in
    # STATE/enrolment.json (site_client.task.enrolled_size_bucket).
    size_bucket: int | None = Field(None, ge=1, alias="size-bucket", description="the coarse size published "
                                    "instead of n (default: n to 1 digit, rounded down)")
    # A global model holding any |value| above this is refused before any spend: trained weights here
    # are O(1) and the norm layers keep activations at unit scale, so 1e4 is 3+ orders of headroom.
    max_model_abs: float = Field(DEFAULT_MAX_MODEL_ABS, gt=0.0, alias="max-model-abs",
                                 description="a global model with any |value| above this is refused")
    run_bounds: RunBounds = Field(default_factory=RunBounds, alias="run-bounds",
                                  description="what a run may ask of this site; a run outside them is refused")
    approved_studies: tuple[str, ...] = Field((), alias="approved-studies", description=(
        "studies this site serves besides the default one, by SHA-256 (`medfed study check FILE` prints it): "
        "the privacy officer's approval of what is learnt from the site's patients"))

    @field_validator("approved_studies")
    @classmethod
    def _digests(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [d for d in v if not (len(d) == 64 and all(c in "0123456789abcdef" for c in d))]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a study's SHA-256 (64 lower-case hex digits; "
                             "`medfed study check FILE` prints it)")
        return v

    @model_validator(mode="after")
    def _per_run_within_lifetime(self) -> SiteConfig:
        if self.epsilon_cap_per_run is not None and self.epsilon_cap_per_run > self.epsilon_cap:
            raise ValueError(
                f"epsilon-cap-per-run ({self.epsilon_cap_per_run:g}) is above epsilon-cap ({self.epsilon_cap:g}), "
                "the site's lifetime total: lower epsilon-cap-per-run or leave it out"
            )
        return self

    def check_run(self, cfg: RunConfig) -> None:
        """Refuse (:class:`OutOfBounds`) a run config outside this site's ``[run-bounds]``."""
        problems = self.run_bounds.violations(cfg)
        if problems:
            raise OutOfBounds(f"site {self.name} refuses the run: {'; '.join(problems)} (site.toml [run-bounds]; "
                              "the operator can lower the setting, or the site's privacy officer raise the bound)")

    @property
    def audit_path(self) -> Path:
        """The site's audit trail: by default the one de-identification writes (DATA/audit)."""
        return self.audit_dir if self.audit_dir is not None else self.data_dir / "audit"

    @classmethod
    def from_toml(cls, path: Path) -> SiteConfig:
        """Read and validate a `site.toml`; relative paths are relative to the file."""
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"site config {path} does not exist; create it or pass the right path") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"site config {path} is not valid TOML: {err}") from None
        for key in ("data-dir", "state-dir", "audit-dir", "audit-key", "release-key"):
            if key in raw and not Path(raw[key]).is_absolute():
                raw[key] = str((path.parent / raw[key]).resolve())
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise _explain(str(path), err) from None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str) -> SiteConfig:
        """Validate a node_config-like mapping, naming ``source`` in errors."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as err:
            raise _explain(source, err) from None

    def to_toml(self) -> str:
        """Serialise as `site.toml` text (paths absolute), every field from the model itself."""
        return tomli_w.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True))


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (strings and paths escaped by tomli_w), for hand-laid, commented TOML files."""
    return tomli_w.dumps({"v": str(value) if isinstance(value, Path) else value}).removeprefix("v = ").rstrip("\n")


def site_template_lines(values: Mapping[str, Any], commented: Mapping[str, Any] | None = None) -> list[str]:
    """A self-explaining site.toml fragment: ``key = value  # description`` for each :class:`SiteConfig` key in
    ``values`` (by its TOML name), and commented-out examples for the keys in ``commented``, in field order.

    The descriptions live on the model only, so the kit's template and the validator never disagree.
    """
    commented = commented or {}
    unknown = set(values) | set(commented)
    lines = []
    for name, field in SiteConfig.model_fields.items():
        key = field.alias or name
        for source, prefix in ((values, ""), (commented, "# ")):
            if key in source:
                unknown.discard(key)
                setting = f"{prefix}{key} = {toml_value(source[key])}"
                lines.append(f"{setting:<35} # {field.description}" if field.description else setting)
    if unknown:
        raise ValueError(f"not SiteConfig keys: {sorted(unknown)}")
    return lines
