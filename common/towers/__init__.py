"""Pretrained modality towers that share one interface: `forward`, `stem`, `head`, `out_dim`.

    image.py     EfficientNet-Lite (embedded), timm models, HF vision models
    whisper.py   Whisper encoders (embedded: converted from CTranslate2), HF Whisper
    wav2vec2.py  HF wav2vec2 / HuBERT
"""

import os

# Before transformers/huggingface_hub are imported: they read it once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time by default
