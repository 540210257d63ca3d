"""A site uses the global adapter on its own data: predict, evaluate, export a merged model.

    fedmm predict  --adapter runs/RUN/adapter --data /site/new.csv --out preds.csv
    fedmm evaluate --adapter runs/RUN/adapter --data /site/test.csv
    fedmm export   --adapter runs/RUN/adapter --merge --out served-model/

The backbone is rebuilt from the run's model config (`config.json` in the adapter folder, or
in the run folder above it) and the adapter loaded with PEFT. `export --merge` folds LoRA into
the base weights (PEFT `merge_and_unload`) and writes one plain state dict that
`load_merged` reads back without PEFT.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from peft import PeftModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.config import Config, ConfigError, ModelConfig, build, from_json
from common.data import ManifestError, encode, load_manifest
from common.model import (LABELS_FILE, Bundle, build_backbone, load_adapter,
                          read_label_names)
from common.site_metrics import evaluate_by_site, site_summary
from common.task import holdout_split, input_encoding
from common.train import evaluate, pick_device, predict

CONFIG_FILE = "config.json"
MERGED_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "fedmm-model.json"
WEIGHTS_FILE = "adapter_model.safetensors"  # what PEFT's save_pretrained writes


def run_config_for(adapter_dir: Path) -> Config:
    """The config of the run that trained an adapter (beside it, or in the run folder)."""
    for folder in (adapter_dir, adapter_dir.parent, adapter_dir.parent.parent):
        if (folder / CONFIG_FILE).is_file():
            return from_json((folder / CONFIG_FILE).read_text(), check_files=False)
    raise ConfigError(f"{adapter_dir}: no {CONFIG_FILE} in the adapter folder or its run folder")


def model_config_for(adapter_dir: Path) -> ModelConfig:
    """The model config a run's adapter was trained with."""
    return run_config_for(adapter_dir).model


def _model_config(path: Path) -> ModelConfig:
    return build(ModelConfig, json.loads(path.read_text()), "model.")


class AdapterError(ValueError):
    """An adapter folder a user named is incomplete or damaged; the message names the file."""


def check_adapter(adapter_dir: str | Path) -> Path:
    """Refuse an adapter folder with a missing, truncated or corrupt file, in one line."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise AdapterError(f"{adapter_dir}: not an adapter folder (no adapter_config.json)")
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{weights}: missing (the adapter's weights)")
    try:
        with safe_open(str(weights), "np"):  # the header must cover the file exactly
            pass
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{weights}: truncated or corrupt ({err})") from None
    labels = adapter_dir / LABELS_FILE
    try:
        names = json.loads(labels.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{labels}: missing (the label names saved with the adapter)") from None
    except (ValueError, OSError) as err:
        raise AdapterError(f"{labels}: unreadable ({err})") from None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise AdapterError(f"{labels}: not a list of label names")
    return adapter_dir


def load_for_inference(adapter_dir: str | Path) -> Bundle:
    """The global model: backbone + adapter, ready to predict."""
    adapter_dir = check_adapter(adapter_dir)
    return load_adapter(model_config_for(adapter_dir), adapter_dir)


def predict_manifest(bundle: Bundle, manifest: str | Path, out_csv: str | Path,
                     device: str = "auto") -> int:
    """Write one row per usable manifest row: its modality columns, predicted label name,
    confidence (and the label, when the manifest has one)."""
    manifest, out_csv = Path(manifest), Path(out_csv)
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: manifest not found")
    ds, stats = load_manifest(manifest, default_label=bundle.label_names[0],  # placeholder
                              modalities=bundle.cfg.modalities)
    has_truth = "label" in stats.columns
    data = encode(ds, bundle.label_names, input_encoding(bundle.cfg), source=manifest)
    probs = predict(bundle, data, device=pick_device(device)).softmax(-1)  # (N, C)
    confidence, index = probs.max(-1)  # (N,), (N,)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*stats.modalities, "prediction", "confidence"]
                        + (["label"] if has_truth else []))
        for i in range(len(ds)):
            row = [ds[i][m] for m in stats.modalities] + [
                bundle.label_names[int(index[i])], f"{float(confidence[i]):.4f}"]
            writer.writerow(row + ([ds[i]["label"]] if has_truth else []))
    return len(ds)


def evaluate_manifest(bundle: Bundle, manifest: str | Path, device: str = "auto",
                      site_column: str = "site", held_out: tuple[int, float] | None = None
                      ) -> dict:
    """Loss, accuracy and macro-F1 of the global model on a labelled manifest.

    With a `site_column` in the manifest, also each site's figures and their mean, worst site
    and spread (common/site_metrics.py). `held_out=(seed, fraction)`: only the rows a deployed
    site with this manifest held out in the run (common.task.holdout_split).
    """
    ds, _ = load_manifest(manifest, modalities=bundle.cfg.modalities)
    if held_out is not None:
        ds = ds.select(holdout_split(len(ds), *held_out)[1])
        if not len(ds):
            raise ManifestError(f"{manifest}: holds no rows out (under 10 usable rows, or "
                                f"partition.holdout_fraction=0 in the run)")
    data = encode(ds, bundle.label_names, input_encoding(bundle.cfg), source=manifest)
    result = evaluate(bundle, data, device=pick_device(device))
    if site_column in ds.column_names:
        sites = evaluate_by_site(bundle, data, list(ds[site_column]), pick_device(device))
        result.update(sites=sites, **site_summary(sites))
    return result


def export_merged(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold the adapter into the backbone (PEFT merge_and_unload) and write it for serving."""
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    bundle = load_for_inference(adapter_dir)
    model = bundle.model.merge_and_unload() if isinstance(bundle.model, PeftModel) else bundle.model
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / MERGED_FILE))
    (out / MODEL_CONFIG_FILE).write_text(json.dumps(asdict(model_config_for(adapter_dir)),
                                                    indent=2))
    (out / "labels.json").write_text(json.dumps(read_label_names(adapter_dir)))
    if "text" in bundle.towers:
        bundle.towers["text"].tokenizer.save_pretrained(out / "tokenizer")
    return out


def load_merged(model_dir: str | Path) -> Bundle:
    """Read a merged export: the plain classifier (no PEFT), its tokenizer and label names."""
    model_dir = Path(model_dir)
    cfg = _model_config(model_dir / MODEL_CONFIG_FILE)
    names = read_label_names(model_dir)
    model, _ = build_backbone(cfg, len(names))
    model.load_state_dict(load_file(str(model_dir / MERGED_FILE)))
    return Bundle(model.requires_grad_(False).eval(), names, cfg)
