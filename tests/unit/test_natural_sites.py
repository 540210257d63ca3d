"""Natural splits as data comes: any column, a long tail merged into `other` or dropped."""

from __future__ import annotations

import json

import datasets
import pytest

from common.config import ConfigError, PartitionConfig, load_config
from common.partition import OTHER, natural_sites, partition_indices
from common.rules import check_rules

# 3 big sites (20, 12, 10 rows) and a long tail of 1-row and 3-row sites
SIZES = {"big-a": 20, "big-b": 12, "big-c": 10, "tiny-1": 1, "tiny-2": 1, "small-3": 3}


def _dataset(column: str = "site") -> datasets.Dataset:
    values = [v for v, n in SIZES.items() for _ in range(n)]
    return datasets.Dataset.from_dict({"label": [f"c{i % 3}" for i in range(len(values))],
                                       column: values[::-1]})  # rows not grouped by site


def _cfg(**kw) -> PartitionConfig:
    base = dict(name="natural", num_clients=1, alpha=1.0, min_partition_size=5,
                classes_per_client=2, power=1.0, column="site", holdout_fraction=0.1, on_small="merge")
    return PartitionConfig(**{**base, **kw})


def _sites(ds, parts, column="site") -> list[set[str]]:
    col = ds[column][:]
    return [{col[i] for i in p} for p in parts]


def test_merge_puts_the_long_tail_into_one_other_site():
    ds = _dataset()
    plan = natural_sites(ds, _cfg())
    assert plan.names == ("big-a", "big-b", "big-c", OTHER)
    assert plan.merged == ("small-3", "tiny-1", "tiny-2") and plan.dropped == ()
    parts = partition_indices(ds, _cfg(), 0)
    assert [len(p) for p in parts] == [20, 12, 10, 5]
    assert _sites(ds, parts)[3] == {"small-3", "tiny-1", "tiny-2"}
    assert sorted(i for p in parts for i in p) == list(range(len(ds)))


def test_drop_removes_the_small_sites_rows_and_counts_them():
    ds = _dataset()
    plan = natural_sites(ds, _cfg(on_small="drop"))
    assert plan.names == ("big-a", "big-b", "big-c") and plan.dropped_rows == 5
    assert plan.report() == {"merged_into": None, "merged": [],
                             "dropped": ["small-3", "tiny-1", "tiny-2"], "dropped_rows": 5}
    parts = partition_indices(ds, _cfg(on_small="drop"), 0)
    assert [len(p) for p in parts] == [20, 12, 10]


def test_refuse_names_the_small_sites_and_the_fix():
    with pytest.raises(ConfigError, match=r"^partition.min_partition_size=5 not met by 3 "
                                          r"natural sites.*on_small=merge"):
        natural_sites(_dataset(), _cfg(on_small="refuse"))


def test_a_merged_site_still_too_small_is_refused():
    with pytest.raises(ConfigError, match=r"'other' site merged from 3 small sites \(5 rows\)"
                                          r".*on_small=drop"):
        natural_sites(_dataset(), _cfg(min_partition_size=6))


def test_any_column_can_be_the_site_column():
    ds = _dataset(column="hospital")
    parts = partition_indices(ds, _cfg(column="hospital"), 0)
    assert _sites(ds, parts, "hospital")[:3] == [{"big-a"}, {"big-b"}, {"big-c"}]
    with pytest.raises(ConfigError, match=r"^partition.column='site' is not a column.*hospital"):
        natural_sites(ds, _cfg())


@pytest.mark.parametrize("overrides, key", [
    (["partition=natural", "partition.on_small=rebalance"], "partition.on_small"),
    (["partition=dirichlet", "partition.on_small=merge"], "partition.on_small"),
    (["partition=iid", "partition.on_small=drop"], "partition.on_small"),
])
def test_on_small_modes_refused_outside_their_splits(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key} must be"):
        check_rules(load_config(overrides), check_files=False)


def test_manifest_columns_beyond_the_modalities_are_kept_as_text(tmp_path):
    from common.data import load_manifest

    path = tmp_path / "m.jsonl"
    rows = [{"text": "a", "label": "x", "hospital": "h1", "ward": 3, "_row_id": 9},
            {"text": "b", "label": "y", "hospital": None},
            {"text": "c", "label": "x", "hospital": "h2", "ward": 4.5}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds, _ = load_manifest(path, modalities=["text"])
    assert set(ds.column_names) == {"text", "label", "hospital", "ward"}  # `_` is reserved
    assert ds["hospital"][:] == ["h1", "", "h2"] and ds["ward"][:] == ["3", "", "4.5"]
