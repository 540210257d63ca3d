"""Load and validate fedmm's config: Hydra compose, then the schema, then the rules.

    load_config(overrides)   compose the packaged tree (Hydra `compose`, works inside Flower apps)
    validate(dict)           build the frozen `Config` (common/schema.py: types and ranges), then
                             check common/rules.py; raise `ConfigError` naming the key, one line
    to_json / from_json      what travels in Flower's run config (re-validated on arrival)
"""

from __future__ import annotations

import functools
import json
import types
import typing
from dataclasses import asdict, fields, is_dataclass
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.rules import check_rules
from common.schema import (CENTRAL_DP, CONF_DIR, MODALITIES, Config,
                           ConfigError, DataConfig, ModelConfig, PartitionConfig,
                           PrivacyConfig, SimulationConfig, SkewConfig, StrategyConfig,
                           TrainConfig)

__all__ = ["CENTRAL_DP", "CONF_DIR", "MODALITIES", "Config",
           "ConfigError", "DataConfig", "ModelConfig", "PartitionConfig", "PrivacyConfig",
           "SimulationConfig", "SkewConfig", "StrategyConfig", "TrainConfig", "from_json",
           "from_run_config", "load_config", "packaged_defaults", "to_json", "validate", "build"]


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
    """Build the frozen Config, check every field's range, then the rules of common/rules.py."""
    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{getattr(err, 'full_key', '') or 'config'}: "
                              f"{str(err).splitlines()[0]}") from None
    config = build(Config, cfg, "")
    check_rules(config, check_files)
    return config


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from nested dicts: types coerced, ranges checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping (got {data!r})")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (allowed: {sorted(names)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        key = prefix + f.name
        if f.name not in data:
            raise ConfigError(f"{key}: missing (every key has its default in common/conf/)")
        values[f.name] = _coerce(data[f.name], hints[f.name], key)
        _check_limits(values[f.name], f.metadata, key)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as type `hint` (int -> float allowed, lists -> tuples), else ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(value, hint, key)
    if is_dataclass(hint):
        return build(hint, value, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list (got {value!r})")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    ok = {bool: isinstance(value, bool), str: isinstance(value, str),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool)}[hint]
    if not ok:
        raise ConfigError(f"{key} must be {hint.__name__} (got {value!r})")
    return float(value) if hint is float else value


def _check_limits(value: Any, limits: Any, key: str) -> None:
    """Raise ConfigError naming `key` if `value` is outside the field's `spec` range.

    None is an unset value (filled in later, e.g. `model.modalities`): nothing to check.
    """
    if value is None:
        return
    checks = {"gt": (lambda v, b: v > b, "> {}"), "ge": (lambda v, b: v >= b, ">= {}"),
              "lt": (lambda v, b: v < b, "< {}"), "le": (lambda v, b: v <= b, "<= {}"),
              "one_of": (lambda v, b: v in b, "one of {}"),
              "each_gt": (lambda v, b: all(x > b for x in v), "a list of values > {}"),
              "subset_of": (lambda v, b: set(v) <= set(b), "a subset of {}"),
              "nonempty": (lambda v, b: len(v) > 0, "non-empty")}
    for name, bound in limits.items():
        ok, allowed = checks[name]
        if not ok(value, bound):
            shown = list(bound) if isinstance(bound, tuple) else bound
            raise ConfigError(f"{key} must be {allowed.format(shown)} (got {_show(value)})")


def _show(value: Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def to_json(config: Config) -> str:
    """Serialise a validated config (what travels in Flower's run config)."""
    return json.dumps(asdict(config), sort_keys=True)


def from_json(text: str, check_files: bool = True) -> Config:
    """Rebuild and re-validate a config that arrived as JSON (no `_target_` is ever honoured).

    A key added since the config was written (an older run folder's config.json) takes its
    packaged default, as Hugging Face configs do; new keys default to the earlier behaviour.
    """
    return validate(_with_defaults(json.loads(text), packaged_defaults()), check_files)


@functools.lru_cache(maxsize=1)
def packaged_defaults() -> dict:
    """The packaged default config as plain JSON data (composed once per process)."""
    return json.loads(to_json(load_config([])))


def _with_defaults(data: Any, defaults: Any) -> Any:
    if not (isinstance(data, dict) and isinstance(defaults, dict)):
        return data
    return {**defaults, **{k: _with_defaults(v, defaults.get(k)) for k, v in data.items()}}


def from_run_config(text: str, check_files: bool = True) -> Config:
    """The config a Flower run carries (empty: the packaged defaults).

    A deployed site has its own data, not the server's manifests: it passes
    `check_files=False`.
    """
    return from_json(text, check_files) if text else load_config([])
