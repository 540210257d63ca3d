"""Pretrained modality towers that share one interface: `forward`, `stem`, `head`, `out_dim`."""

import os

# Before transformers/huggingface_hub are imported: they read it once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time by default
