"""Write a partition report: per-site sizes, label counts and modality availability.

`partition.json` holds one record per site; `partition.png` shows a label-count heatmap (sites
on x, labels on y) above a bar chart of site sizes. Rendering uses a bare Agg `Figure`, so no
pyplot state or display is touched.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

MAX_ANNOTATED_CELLS = 600  # above this the heatmap is drawn without per-cell numbers


def partition_records(label_names: list[str], counts: list[dict[str, int]], sizes: list[int],
                      modality: list[dict] | None = None, site_names: list[str] | None = None
                      ) -> list[dict]:
    """Return one JSON-ready record per site (name, size, label counts, modality)."""
    names = site_names or [f"site-{i}" for i in range(len(sizes))]
    lengths = {len(counts), len(sizes), len(names), len(modality or sizes)}
    if len(lengths) != 1:
        raise ValueError(f"per-site inputs differ in length: {sorted(lengths)}")
    unknown = {k for c in counts for k in c} - set(label_names)
    if unknown:
        raise ValueError(f"counts name labels not in label_names: {sorted(unknown)}")
    records = []
    for i, name in enumerate(names):
        record = {"name": name, "size": int(sizes[i]),
                  "label_counts": {lab: int(counts[i].get(lab, 0)) for lab in label_names}}
        if modality is not None:
            record["modality"] = {k: float(v) for k, v in modality[i].items()}
        records.append(record)
    return records


def _plot(path: Path, label_names: list[str], records: list[dict],
          small_sites: dict | None = None) -> None:
    """Draw the label-count heatmap and the site-size bars into `path`."""
    n_sites, n_labels = len(records), len(label_names)
    matrix = np.array([[r["label_counts"][lab] for r in records] for lab in label_names])
    fig = Figure(figsize=(max(6.0, 0.55 * n_sites + 2.5), max(5.0, 0.35 * n_labels + 3.5)),
                 layout="constrained")
    heat, bars = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    image = heat.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    if matrix.size <= MAX_ANNOTATED_CELLS:
        top = matrix.max(initial=0)
        for (y, x), value in np.ndenumerate(matrix):
            heat.text(x, y, str(value), ha="center", va="center", fontsize=7,
                      color="black" if value > top / 2 else "white")
    heat.set_yticks(range(n_labels), label_names)
    heat.set_ylabel("label")
    fig.colorbar(image, ax=[heat, bars], label="samples", shrink=0.8)
    bars.bar(range(n_sites), [r["size"] for r in records], color="tab:gray")
    bars.set_xticks(range(n_sites), [r["name"] for r in records], rotation=45, ha="right")
    bars.set_ylabel("site size")
    note = ""
    if small_sites and (small_sites["merged"] or small_sites["dropped"]):
        note = (f"; {len(small_sites['merged'])} small sites merged into "
                f"{small_sites['merged_into']!r}, {len(small_sites['dropped'])} dropped "
                f"({small_sites['dropped_rows']} rows)")
    fig.suptitle(f"Label counts per site ({n_sites} sites{note})")
    fig.savefig(path, dpi=100)


def write_partition_report(out_dir: Path, label_names: list[str], counts: list[dict[str, int]],
                           sizes: list[int], modality: list[dict] | None = None,
                           site_names: list[str] | None = None, small_sites: dict | None = None
                           ) -> tuple[Path, Path]:
    """Write `partition.json` and `partition.png` into `out_dir`; return their paths.

    `small_sites`: a natural split's merged and dropped sites (common.partition.NaturalSites).
    """
    records = partition_records(label_names, counts, sizes, modality, site_names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "partition.json", out_dir / "partition.png"
    report = {"num_sites": len(records), "labels": list(label_names), "sites": records}
    if small_sites is not None:
        report["small_sites"] = small_sites
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    _plot(png_path, label_names, records, small_sites)
    return json_path, png_path
