"""Typed config schema for fedmm, validated before any work starts.

Values live once, in the Hydra YAML tree under `common/conf/`; the dataclasses here only give
types and allowed ranges. `load_config(overrides)` composes that tree (Hydra `compose`, so it
works the same inside Flower apps), `validate(cfg)` turns a composed DictConfig into a `Config`
or raises `ConfigError` with one line naming the key and what is allowed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent / "conf"
EMBEDDED_TEXT_ENCODER = "embedded:all-MiniLM-L6-v2"
MODALITIES = ("image", "text")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm",  # mean + server optimizer
              "fedmedian", "fedtrimmedavg", "krum", "multikrum", "normbounded")  # robust
MEAN_STRATEGIES = ("fedavg", "fedprox")  # the only ones `exact` LoRA aggregation composes with
LORA_AGGREGATIONS = ("naive", "ffa", "exact")
ATTACKS = ("none", "scale", "signflip")
BASELINES = ("centralized", "local")
PARTITIONS = ("iid", "dirichlet", "pathological", "quantity", "natural")
ON_SMALL = ("refuse", "rebalance")
DATA_SOURCES = ("demo", "manifest")
DEVICES = ("auto", "cpu", "cuda")
DP_MODES = ("none", "server_fixed", "server_adaptive", "client_fixed", "client_adaptive", "local")
CENTRAL_DP = ("server_fixed", "server_adaptive", "client_fixed", "client_adaptive")


class ConfigError(ValueError):
    """A config value a user set is out of range; the message names the key."""


@dataclass
class LoraConfigSchema:
    r: int
    alpha: int
    dropout: float


@dataclass
class TextTowerConfig:
    name_or_path: str
    max_length: int
    target_modules: list[str] | None = None  # None: the attention projections of the tower


@dataclass
class VisionTowerConfig:
    name_or_path: str | None  # None: a small CNN built from `channels`, trained in full
    image_size: int
    channels: list[int] = field(default_factory=list)
    target_modules: list[str] | None = None


@dataclass
class ModelConfig:
    text: TextTowerConfig
    vision: VisionTowerConfig
    lora: LoraConfigSchema
    fusion_dim: int
    modalities: list[str]


@dataclass
class DataConfig:
    source: str
    train: str | None  # manifest paths; for `demo` they are filled in by the generator
    test: str | None
    demo_dir: str
    demo_train: int
    demo_test: int
    seed: int


@dataclass
class PartitionConfig:
    name: str
    num_clients: int
    alpha: float               # dirichlet: concentration (smaller = more label skew)
    min_partition_size: int
    classes_per_client: int    # pathological: labels each site holds
    power: float               # quantity: site sizes proportional to (i + 1) ** -power
    column: str                # natural: one site per distinct value of this manifest column
    on_small: str              # a site below min_partition_size: refuse or rebalance


@dataclass
class SkewConfig:
    """Multimodal heterogeneity applied per site after partitioning (seeded, recorded)."""

    missing_image_clients: float  # fraction of sites without any image
    missing_text_clients: float   # fraction of sites without any text
    missing_image_rate: float     # per-sample probability that the image is absent
    missing_text_rate: float      # per-sample probability that the text is absent
    image_noise: float            # max Gaussian pixel noise std; site i gets a level in [0, max]
    image_blur: float             # max Gaussian blur (1.0 = sigma of 3 pixels)
    text_corruption: float        # max per-word drop/swap probability
    label_noise: float            # max per-sample label flip probability


@dataclass
class StrategyConfig:
    name: str
    rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_available_nodes: int
    proximal_mu: float
    absent_class_scale: float  # FedRS restricted softmax: logit factor for classes a site lacks
    modality_dropout_text: float   # chance a training row's text is hidden for one step
    modality_dropout_image: float  # chance a training row's image is hidden (never both)
    max_grad_norm: float     # clip each step's gradient to this global norm (0: no clipping)
    local_epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    lora_aggregation: str
    modality_weighting: bool  # fedavg/fedprox: each tower averaged over rows with its modality
    server_lr: float         # fedadam / fedyogi (eta), fedavgm (server learning rate)
    server_momentum: float   # fedavgm
    trim_fraction: float     # fedtrimmedavg: cut this fraction from each end
    num_malicious: int       # krum / multikrum: assumed Byzantine sites per round
    num_to_keep: int         # multikrum: updates averaged after selection
    norm_bound: float        # normbounded: clip each update to this norm (0: the round's median)
    max_update_norm: float   # reject any update farther than this from the global (0: no bound)


@dataclass
class SimulationConfig:
    client_num_cpus: int
    client_num_gpus: float
    timeout_s: int
    attack: str              # simulated Byzantine sites: none / scale / signflip
    attack_fraction: float   # share of sites that attack (the lowest partition ids)
    attack_scale: float      # `scale`: the update is multiplied by this
    site_ranks: list[int]    # LoRA rank per site, cycled; [] = every site uses model.lora.r
    drop_sites: list[int] = field(default_factory=list)  # partitions whose train fails


@dataclass
class PrivacyConfig:
    """Secure aggregation and differential privacy (common/privacy.py holds the math)."""

    secagg: bool
    num_shares: float              # <= 1: fraction of the sampled sites; else a count (> 2)
    reconstruction_threshold: float  # <= 1: fraction of num_shares; else a count
    clipping_range: float          # SecAgg+ clips every update coordinate to [-range, range]
    quantization_range: int        # SecAgg+ integer levels over that range
    max_weight: float              # SecAgg+ largest num-examples of one site
    dp: str                        # one of DP_MODES
    noise_multiplier: float
    target_epsilon: float          # > 0: solve noise_multiplier before the run
    delta: float
    clipping_norm: float
    target_clipped_quantile: float
    clip_norm_lr: float
    clipped_count_stddev: float    # 0: Flower's default, num_sampled / 20


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    partition: PartitionConfig
    skew: SkewConfig
    strategy: StrategyConfig
    simulation: SimulationConfig
    privacy: PrivacyConfig
    seed: int
    device: str
    output_dir: str
    baselines: list[str]  # run after the federation on the same split: centralized, local
    resume: bool          # continue the run in output_dir from its last complete round


def load_config(overrides: list[str] | None = None) -> Config:
    """Compose the packaged Hydra tree with `overrides` and validate it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=list(overrides or []))
        except (OmegaConfBaseException, HydraException) as err:  # unknown key or group option
            text = str(err).split("Config search path")[0]
            raise ConfigError(" ".join(text.split())) from None
    return validate(cfg)


def validate(cfg: DictConfig | dict[str, Any], check_files: bool = True) -> Config:
    """Check types against the schema and values against their ranges (and that files exist)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or "config"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
    _check_ranges(config, check_files)
    return config


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {allowed} (got {value!r})")


def _check_ranges(c: Config, check_files: bool = True) -> None:
    m, d, p, s = c.model, c.data, c.partition, c.strategy
    _require(m.lora.r > 0, "model.lora.r", "> 0", m.lora.r)
    _require(m.lora.alpha > 0, "model.lora.alpha", "> 0", m.lora.alpha)
    _require(0 <= m.lora.dropout < 1, "model.lora.dropout", "in [0, 1)", m.lora.dropout)
    _require(m.fusion_dim > 0, "model.fusion_dim", "> 0", m.fusion_dim)
    _require(m.text.max_length > 0, "model.text.max_length", "> 0", m.text.max_length)
    _require(m.vision.image_size > 0, "model.vision.image_size", "> 0", m.vision.image_size)
    _require(
        m.vision.name_or_path is not None or len(m.vision.channels) > 0,
        "model.vision.channels", "non-empty when model.vision.name_or_path is null",
        m.vision.channels,
    )
    _require(
        len(m.modalities) > 0 and set(m.modalities) <= set(MODALITIES),
        "model.modalities", f"a non-empty subset of {list(MODALITIES)}", m.modalities,
    )
    _require(d.source in DATA_SOURCES, "data.source", f"one of {list(DATA_SOURCES)}", d.source)
    if d.source == "manifest":
        for key, value in (("data.train", d.train), ("data.test", d.test)):
            _require(bool(value), key, "a manifest path when data.source=manifest", value)
            _require(not check_files or Path(str(value)).is_file(), key, "an existing file",
                     value)
    else:
        _require(d.demo_train > 0, "data.demo_train", "> 0", d.demo_train)
        _require(d.demo_test > 0, "data.demo_test", "> 0", d.demo_test)
    _require(p.name in PARTITIONS, "partition.name", f"one of {list(PARTITIONS)}", p.name)
    _require(p.num_clients > 0, "partition.num_clients", "> 0", p.num_clients)
    _require(p.alpha > 0, "partition.alpha", "> 0", p.alpha)
    _require(p.min_partition_size >= 0, "partition.min_partition_size", ">= 0",
             p.min_partition_size)
    _require(p.classes_per_client >= 1, "partition.classes_per_client", ">= 1",
             p.classes_per_client)
    _require(p.power >= 0, "partition.power", ">= 0", p.power)
    _require(p.on_small in ON_SMALL, "partition.on_small", f"one of {list(ON_SMALL)}",
             p.on_small)
    for key, value in vars(c.skew).items():
        _require(0 <= value <= 1, f"skew.{key}", "in [0, 1]", value)
    _require(s.name in STRATEGIES, "strategy.name", f"one of {list(STRATEGIES)}", s.name)
    _require(s.rounds > 0, "strategy.rounds", "> 0", s.rounds)
    _require(0 < s.fraction_train <= 1, "strategy.fraction_train", "in (0, 1]", s.fraction_train)
    _require(0 <= s.fraction_evaluate <= 1, "strategy.fraction_evaluate", "in [0, 1]",
             s.fraction_evaluate)
    _require(1 <= s.min_train_nodes <= p.num_clients, "strategy.min_train_nodes",
             f"in [1, partition.num_clients={p.num_clients}]", s.min_train_nodes)
    _require(1 <= s.min_available_nodes <= p.num_clients, "strategy.min_available_nodes",
             f"in [1, partition.num_clients={p.num_clients}]", s.min_available_nodes)
    _require(s.proximal_mu >= 0, "strategy.proximal_mu", ">= 0", s.proximal_mu)
    _require(s.name != "fedprox" or s.proximal_mu > 0, "strategy.proximal_mu",
             "> 0 with strategy=fedprox", s.proximal_mu)
    _require(0 <= s.absent_class_scale <= 1, "strategy.absent_class_scale", "in [0, 1]",
             s.absent_class_scale)
    for key in ("modality_dropout_text", "modality_dropout_image"):
        _require(0 <= getattr(s, key) < 1, f"strategy.{key}", "in [0, 1)", getattr(s, key))
    _require(s.modality_dropout_text + s.modality_dropout_image <= 1,
             "strategy.modality_dropout_text", "+ strategy.modality_dropout_image <= 1 (a row "
             "never loses both)", s.modality_dropout_text + s.modality_dropout_image)
    _require(s.max_grad_norm >= 0, "strategy.max_grad_norm", ">= 0", s.max_grad_norm)
    _require(s.local_epochs > 0, "strategy.local_epochs", "> 0", s.local_epochs)
    _require(s.batch_size > 0, "strategy.batch_size", "> 0", s.batch_size)
    _require(s.lr > 0, "strategy.lr", "> 0", s.lr)
    _require(s.weight_decay >= 0, "strategy.weight_decay", ">= 0", s.weight_decay)
    _require(s.lora_aggregation in LORA_AGGREGATIONS, "strategy.lora_aggregation",
             f"one of {list(LORA_AGGREGATIONS)}", s.lora_aggregation)
    _require(s.lora_aggregation != "exact" or s.name in MEAN_STRATEGIES,
             "strategy.lora_aggregation", f"naive or ffa with strategy={s.name} (exact folds a "
             f"non-linear residual and composes only with {list(MEAN_STRATEGIES)})",
             s.lora_aggregation)
    _require(s.server_lr > 0, "strategy.server_lr", "> 0", s.server_lr)
    _require(0 <= s.server_momentum < 1, "strategy.server_momentum", "in [0, 1)",
             s.server_momentum)
    _require(0 <= s.trim_fraction < 0.5, "strategy.trim_fraction", "in [0, 0.5)",
             s.trim_fraction)
    _require(s.num_malicious >= 0, "strategy.num_malicious", ">= 0", s.num_malicious)
    _require(s.num_to_keep >= 1, "strategy.num_to_keep", ">= 1", s.num_to_keep)
    _require(s.norm_bound >= 0, "strategy.norm_bound", ">= 0", s.norm_bound)
    _require(s.max_update_norm >= 0, "strategy.max_update_norm", ">= 0", s.max_update_norm)
    sim = c.simulation
    _require(all(r > 0 for r in sim.site_ranks), "simulation.site_ranks", "positive ranks",
             sim.site_ranks)
    _require(sim.attack in ATTACKS, "simulation.attack", f"one of {list(ATTACKS)}", sim.attack)
    _require(0 <= sim.attack_fraction < 1, "simulation.attack_fraction", "in [0, 1)",
             sim.attack_fraction)
    _require(c.device in DEVICES, "device", f"one of {list(DEVICES)}", c.device)
    _require(set(c.baselines) <= set(BASELINES), "baselines", f"a subset of {list(BASELINES)}",
             c.baselines)
    _require(c.simulation.client_num_cpus > 0, "simulation.client_num_cpus", "> 0",
             c.simulation.client_num_cpus)
    _require(c.simulation.timeout_s > 0, "simulation.timeout_s", "> 0", c.simulation.timeout_s)
    from common.privacy import check_privacy  # the privacy keys and what they compose with

    check_privacy(c)


def to_json(config: Config) -> str:
    """Serialise a validated config (what travels in Flower's run config)."""
    return json.dumps(asdict(config), sort_keys=True)


def from_json(text: str, check_files: bool = True) -> Config:
    """Rebuild and re-validate a config that arrived as JSON (no `_target_` is ever honoured)."""
    return validate(json.loads(text), check_files)


def from_run_config(text: str, check_files: bool = True) -> Config:
    """The config a Flower run carries (empty: the packaged defaults).

    A deployed site has its own data, not the server's manifests: it passes
    `check_files=False`.
    """
    return from_json(text, check_files) if text else load_config([])
