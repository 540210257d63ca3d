"""The config schema: one frozen dataclass per consumer, each field with its allowed range.

Values live once, in the Hydra YAML tree under `common/conf/`; the dataclasses here give each
value its type and, as field metadata, its range (`spec(gt=0)`, `spec(one_of=...)`), which
`common.config.validate` checks. The rules about which settings combine are in common/rules.py.
Each consumer reads its own part whole: the ClientApp hands `cfg.train` (`TrainConfig`) to
`train_local`, DP-SGD and the baselines; the ServerApp builds its strategy from `cfg.strategy`;
`cfg.model` builds the model (and, being frozen, is its cache key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.compression import COMPRESSIONS
from common.strategies import LORA_AGGREGATIONS, STRATEGIES

CONF_DIR = Path(__file__).resolve().parent / "conf"
MODALITIES = ("image", "text", "audio")  # also the manifest columns that carry them
DP_MODES = ("none", "server_fixed", "server_adaptive", "client_fixed", "client_adaptive", "local")
CENTRAL_DP = ("server_fixed", "server_adaptive", "client_fixed", "client_adaptive")
TRACKERS = ("tensorboard", "mlflow")  # server/tracking.py


class ConfigError(ValueError):
    """A config value a user set is out of range; the message names the key."""


def spec(*, gt: float | None = None, ge: float | None = None, lt: float | None = None,
         le: float | None = None, one_of: tuple | None = None, each_gt: float | None = None,
         subset_of: tuple | None = None, nonempty: bool = False) -> Any:
    """A schema field with its allowed range (checked by `validate`)."""
    limits = {k: v for k, v in dict(gt=gt, ge=ge, lt=lt, le=le, one_of=one_of, each_gt=each_gt,
                                     subset_of=subset_of, nonempty=nonempty).items()
              if v is not None and v is not False}
    return field(metadata=limits)


UNIT = dict(ge=0, le=1)  # a probability or a fraction


@dataclass(frozen=True)
class LoraSettings:
    r: int = spec(gt=0)
    alpha: int = spec(gt=0)
    dropout: float = spec(ge=0, lt=1)


@dataclass(frozen=True)
class TextTowerConfig:
    name_or_path: str
    max_length: int = spec(gt=0)
    target_modules: tuple[str, ...] | None  # None: the tower's attention projections
    lora_layers: int = spec(ge=0)  # LoRA only in the top N layers (the rest cached); 0: all


@dataclass(frozen=True)
class VisionTowerConfig:
    name_or_path: str | None  # embedded:, timm or HF model; None: a small CNN from `channels`
    image_size: int = spec(gt=0)
    channels: tuple[int, ...] = spec(each_gt=0)
    target_modules: tuple[str, ...] | None  # None: the tower's defaults; []: frozen tower


@dataclass(frozen=True)
class AudioTowerConfig:
    name_or_path: str  # embedded:whisper-*, or a HF Whisper / wav2vec2 / HuBERT id or folder
    clip_seconds: float = spec(gt=0, le=30)  # every clip cropped or zero-padded to this
    target_modules: tuple[str, ...] | None  # None: the tower's defaults; []: frozen tower


@dataclass(frozen=True)
class ModelConfig:
    text: TextTowerConfig
    vision: VisionTowerConfig
    audio: AudioTowerConfig
    lora: LoraSettings
    fusion: str = spec(one_of=("concat", "gated", "late"))  # how the head fuses the towers
    projection_dim: int = spec(ge=0)  # each tower's features projected to this width (0: none)
    fusion_dim: int = spec(gt=0)
    feature_norm: bool  # each tower's features LayerNorm-ed to unit norm before the head
    # None: the modality columns of the training manifest (common/task.py::resolve_data)
    modalities: tuple[str, ...] | None = spec(subset_of=MODALITIES, nonempty=True)


@dataclass(frozen=True)
class DataConfig:
    source: str = spec(one_of=("demo", "manifest"))
    train: str | None  # manifest paths; for `demo` the generator fills them in
    test: str | None
    labels: tuple[str, ...] | None  # the label set in class order; None: the training manifest's
    demo_dir: str
    demo_train: int = spec(ge=0)
    demo_test: int = spec(ge=0)
    demo_site_by_shape: float = spec(**UNIT)  # demo: chance a row's site is its shape's home
    demo_audio: bool  # the demo adds a sound per row carrying a third factor of the label
    seed: int


@dataclass(frozen=True)
class PartitionConfig:
    name: str = spec(one_of=("iid", "dirichlet", "pathological", "quantity", "natural"))
    num_clients: int = spec(gt=0)
    alpha: float = spec(gt=0)              # dirichlet: concentration (smaller = more label skew)
    min_partition_size: int = spec(ge=0)
    classes_per_client: int = spec(ge=1)   # pathological: labels each site holds
    power: float = spec(ge=0)              # quantity: site sizes proportional to (i + 1) ** -power
    column: str                            # natural: one site per distinct value of this column
    holdout_fraction: float = spec(ge=0, lt=1)  # of each site's rows, held out (seeded) for
                                                # per-site evaluation, never trained on
    # a site below min_partition_size: refuse; rebalance (synthetic splits); merge into one
    # `other` site or drop its rows (natural splits)
    on_small: str = spec(one_of=("refuse", "rebalance", "merge", "drop"))


@dataclass(frozen=True)
class SkewConfig:
    """Multimodal heterogeneity applied per site after partitioning (seeded, recorded)."""

    missing_image_clients: float = spec(**UNIT)  # fraction of sites without any image
    missing_text_clients: float = spec(**UNIT)   # fraction of sites without any text
    missing_audio_clients: float = spec(**UNIT)  # fraction of sites without any audio
    missing_image_rate: float = spec(**UNIT)     # per-sample probability that the image is absent
    missing_text_rate: float = spec(**UNIT)      # per-sample probability that the text is absent
    missing_audio_rate: float = spec(**UNIT)     # per-sample probability that the audio is absent
    image_noise: float = spec(**UNIT)    # max Gaussian pixel noise std; site i gets [0, max]
    image_blur: float = spec(**UNIT)     # max Gaussian blur (1.0 = sigma of 3 pixels)
    text_corruption: float = spec(**UNIT)  # max per-word drop/swap probability
    label_noise: float = spec(**UNIT)      # max per-sample label flip probability


@dataclass(frozen=True)
class TrainConfig:
    """Local training at a site: what `train_local`, DP-SGD and the baselines read, whole."""

    epochs: int = spec(gt=0)
    batch_size: int = spec(gt=0)
    lr: float = spec(gt=0)
    weight_decay: float = spec(ge=0)
    proximal_mu: float = spec(ge=0)         # FedProx: mu/2 * ||w - w_global||^2 (any strategy)
    absent_class_scale: float = spec(**UNIT)  # FedRS: logit factor for classes a site lacks
    modality_dropout_text: float = spec(ge=0, lt=1)   # chance a row's text is hidden a step
    modality_dropout_image: float = spec(ge=0, lt=1)  # chance its image is
    modality_dropout_audio: float = spec(ge=0, lt=1)  # chance its audio is (one at most per row)
    max_grad_norm: float = spec(ge=0)       # clip each step's gradient norm (0: off)
    label_smoothing: float = spec(ge=0, lt=1)  # cross-entropy label smoothing


@dataclass(frozen=True)
class StrategyConfig:
    """How the server samples and aggregates (its traits: common/strategies.py)."""

    name: str = spec(one_of=STRATEGIES)
    rounds: int = spec(gt=0)
    fraction_train: float = spec(gt=0, le=1)
    sampling: str = spec(one_of=("fixed", "poisson"))  # poisson: each site w.p. fraction_train
    fraction_evaluate: float = spec(**UNIT)
    min_train_nodes: int = spec(ge=1)
    min_available_nodes: int = spec(ge=1)
    lora_aggregation: str = spec(one_of=LORA_AGGREGATIONS)
    modality_weighting: bool  # mean strategies: each tower averaged over rows with its modality
    server_lr: float = spec(gt=0)            # fedadam / fedyogi (eta), fedavgm
    server_momentum: float = spec(ge=0, lt=1)  # fedavgm
    trim_fraction: float = spec(ge=0, lt=0.5)  # fedtrimmedavg: cut this fraction from each end
    num_malicious: int = spec(ge=0)          # krum / multikrum: assumed Byzantine sites per round
    num_to_keep: int = spec(ge=1)            # multikrum: updates averaged after selection
    norm_bound: float = spec(ge=0)           # normbounded: clip each update (0: round's median)
    max_update_norm: float = spec(ge=0)      # reject an update farther than this (0: no bound)
    round_timeout_s: float = spec(gt=0)      # a round goes on without sites silent this long
    min_completed_rounds: int | None = spec(ge=1)  # rounds that must aggregate (None: all)
    compression: str = spec(one_of=COMPRESSIONS)  # the update sites upload (common/compression.py)
    topk_fraction: float = spec(gt=0, le=1)  # compression=topk: share of each tensor sent


@dataclass(frozen=True)
class SimulationConfig:
    client_num_cpus: int = spec(gt=0)
    client_num_gpus: float = spec(ge=0)
    timeout_s: int = spec(gt=0)  # the whole run (per round: strategy.round_timeout_s)
    attack: str = spec(one_of=("none", "scale", "signflip"))  # simulated Byzantine sites
    attack_fraction: float = spec(ge=0, lt=1)  # share of sites that attack (lowest ids)
    attack_scale: float                        # `scale`: the update is multiplied by this
    site_ranks: tuple[int, ...] = spec(each_gt=0)  # LoRA rank per site, cycled; () = model's
    drop_sites: tuple[int, ...]  # partitions whose train fails (dropout tests)
    crash_fraction: float = spec(ge=0, lt=1)  # share of sites crashing each round (seeded)
    straggler_sites: tuple[int, ...]  # partitions that hang in `straggler_rounds`
    straggler_rounds: tuple[int, ...] = spec(each_gt=0)
    straggler_s: float = spec(ge=0)   # how long a straggler hangs before it trains


@dataclass(frozen=True)
class PrivacyConfig:
    """Secure aggregation and differential privacy (common/privacy.py holds the math)."""

    secagg: bool
    num_shares: float = spec(gt=0)        # <= 1: fraction of the sampled sites; else a count > 2
    reconstruction_threshold: float = spec(gt=0)  # <= 1: fraction of num_shares; else a count
    clipping_range: float = spec(gt=0)    # SecAgg+ clips every update coordinate to +-range
    quantization_range: int = spec(gt=0, lt=2**31)  # SecAgg+ integer levels over that range
    max_weight: float = spec(gt=0)        # SecAgg+ largest num-examples of one site
    dp: str = spec(one_of=DP_MODES)
    noise_multiplier: float = spec(ge=0)
    target_epsilon: float = spec(ge=0)    # > 0: solve noise_multiplier before the run
    delta: float = spec(gt=0, lt=1)
    clipping_norm: float = spec(gt=0)
    per_layer_clipping: bool              # local DP-SGD: each tensor clipped to C / sqrt(L)
    target_clipped_quantile: float = spec(**UNIT)
    clip_norm_lr: float = spec(gt=0)
    clipped_count_stddev: float = spec(ge=0)  # 0: Flower's default, num_sampled / 20


PERSONALIZATIONS = ("none", "finetune", "ditto", "fedsa")  # client/personal.py


@dataclass(frozen=True)
class PersonalizationConfig:
    """What each site builds for itself (client/personal.py); saved at the site, never sent."""

    name: str = spec(one_of=PERSONALIZATIONS)
    epochs: int = spec(gt=0)     # finetune: local epochs on the head and LoRA B after the last round
    lr: float = spec(gt=0)       # finetune and ditto: the personal model's learning rate
    ditto_lambda: float = spec(ge=0)  # ditto: lambda/2 * ||v - w_global||^2 pulls v to the global


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    data: DataConfig
    partition: PartitionConfig
    skew: SkewConfig
    train: TrainConfig
    strategy: StrategyConfig
    simulation: SimulationConfig
    privacy: PrivacyConfig
    personalization: PersonalizationConfig
    seed: int
    device: str = spec(one_of=("auto", "cpu", "cuda"))
    output_dir: str
    baselines: tuple[str, ...] = spec(subset_of=("centralized", "local"))
    resume: bool  # continue the run in output_dir from its last complete round
    logging: tuple[str, ...] = spec(subset_of=TRACKERS)  # per-round metrics also go to these
