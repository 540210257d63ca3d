"""Every config in the tree composes and validates; bad values fail naming their key."""

from __future__ import annotations

import json

import pytest
import yaml

from common.config import CONF_DIR, ConfigError, from_json, load_config, to_json
from common.rules import value_at
from common.strategies import STRATEGY_TRAITS


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _own_values(group: str, option: str) -> dict[str, object]:
    """The dotted keys an option file sets itself (its defaults list aside) and their values."""
    path = CONF_DIR / group / f"{option}.yaml"
    text = path.read_text()
    root = "" if text.startswith("# @package _global_") else f"{group}."
    flat: dict[str, object] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key != "defaults":
                    walk(f"{prefix}{key}.", value)
        else:
            flat[prefix.rstrip(".")] = node
    walk(root, yaml.safe_load(text) or {})
    return flat


GROUPS = [d.name for d in sorted(CONF_DIR.iterdir()) if d.is_dir()]


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in _choices(g)])
def test_every_group_option_composes_and_takes_effect(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "manifest":
        for name in ("train", "test"):
            (tmp_path / f"{name}.csv").write_text("image,text,label\n")
            overrides.append(f"data.{name}={tmp_path / name}.csv")
    cfg = load_config(overrides)
    own = _own_values(group, option)
    assert own, f"{group}/{option}.yaml sets nothing"
    for key, value in own.items():
        if value == "???":  # a mandatory value the overrides above supplied
            continue
        got = value_at(cfg, key)
        assert got == value, f"{group}={option}: {key} is {got!r}, the file says {value!r}"


def test_strategy_traits_cover_exactly_the_strategy_options():
    assert set(STRATEGY_TRAITS) == set(_choices("strategy"))


def test_manifest_data_option_composes_with_paths(tmp_path):
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("image,text,label\n")
    test.write_text("image,text,label\n")
    cfg = load_config(["data=manifest", f"data.train={train}", f"data.test={test}"])
    assert cfg.data.source == "manifest" and cfg.data.train == str(train)


def test_modality_dropout_that_could_hide_both_modalities_is_refused():
    with pytest.raises(ConfigError, match="^train.modality_dropout_text"):
        load_config(["train.modality_dropout_text=0.6", "train.modality_dropout_image=0.6"])


def test_fedprox_option_sets_a_positive_mu():
    cfg = load_config(["strategy=fedprox"])
    assert cfg.strategy.name == "fedprox" and cfg.train.proximal_mu > 0


@pytest.mark.parametrize("override, key", [
    ("partition.alpha=0", "partition.alpha"),
    ("partition.alpha=-1", "partition.alpha"),
    ("model.lora.r=0", "model.lora.r"),
    ("strategy.name=fedsomething", "strategy.name"),
    ("strategy.min_train_nodes=99", "strategy.min_train_nodes"),
    ("strategy.fraction_train=1.5", "strategy.fraction_train"),
    ("train.lr=0", "train.lr"),
    ("partition.num_clients=0", "partition.num_clients"),
    ("model.modalities=[smell]", "model.modalities"),
    ("model.modalities=[]", "model.modalities"),
    ("model.audio.clip_seconds=31", "model.audio.clip_seconds"),
    ("skew.missing_audio_rate=1.5", "skew.missing_audio_rate"),
    ("train.modality_dropout_audio=1.0", "train.modality_dropout_audio"),
    ("device=tpu", "device"),
    ("model.lora.r=eight", "model.lora.r"),
    ("train.modality_dropout_text=1.0", "train.modality_dropout_text"),
    ("train.modality_dropout_image=-0.1", "train.modality_dropout_image"),
    ("strategy.round_timeout_s=0", "strategy.round_timeout_s"),
    ("strategy.min_completed_rounds=0", "strategy.min_completed_rounds"),
    (["strategy.rounds=3", "strategy.min_completed_rounds=4"], "strategy.min_completed_rounds"),
    ("simulation.crash_fraction=1.0", "simulation.crash_fraction"),
    (["partition.num_clients=4", "simulation.crash_fraction=0.75"], "simulation.crash_fraction"),
    (["simulation.drop_sites=[0]", "partition.num_clients=3", "simulation.crash_fraction=0.3"],
     "simulation.crash_fraction"),
    ("simulation.straggler_sites=[0]", "simulation.straggler_s"),
    ("simulation.straggler_rounds=[0]", "simulation.straggler_rounds"),
    (["train.modality_dropout_text=0.5", "train.modality_dropout_audio=0.6"],
     "train.modality_dropout_text"),
    (["model.modalities=[image,text]", "skew.missing_audio_clients=0.5"], "skew"),
])
def test_bad_values_fail_with_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(override if isinstance(override, list) else [override])
    message = str(err.value)
    assert key in message and "\n" not in message


def test_manifest_paths_must_exist():
    with pytest.raises(ConfigError, match="data.train"):
        load_config(["data=manifest", "data.train=/nowhere/train.csv", "data.test=/x.csv"])
    with pytest.raises(ConfigError, match="data.train"):
        load_config(["data=manifest"])  # ??? left unset


def test_unknown_group_option_is_a_config_error():
    with pytest.raises(ConfigError, match="strategy"):
        load_config(["strategy=fedmagic"])


def test_json_round_trip_is_exact_and_revalidated(default_cfg):
    assert from_json(to_json(default_cfg)) == default_cfg
    broken = to_json(default_cfg).replace('"alpha": 0.5', '"alpha": -0.5')
    with pytest.raises(ConfigError, match="partition.alpha"):
        from_json(broken)


def test_a_config_json_written_before_a_key_existed_takes_its_default():
    """An older run folder's config.json lacks keys added since: they take the packaged
    default; a key the schema does not know is still refused."""
    cfg = load_config(["model=lite0_minilm_dp", "privacy=local_dp"])
    older = json.loads(to_json(cfg))
    del older["model"]["feature_norm"], older["privacy"]["per_layer_clipping"]
    rebuilt = from_json(json.dumps(older))
    assert rebuilt.model.feature_norm is False and rebuilt.privacy.per_layer_clipping is False
    assert rebuilt.model.projection_dim == 8 and rebuilt.privacy.dp == "local"
    older["model"]["feature_scale"] = 2
    with pytest.raises(ConfigError, match="model.feature_scale: unknown key"):
        from_json(json.dumps(older))
