"""What each DP-aware choice does to the noise: noised coordinates d and the expected
noise-to-signal ratio z·√d / m of one central-DP release, one choice added at a time.

    python -m benchmarks.dp_coordinates [--sites 200] [--rate 0.1] [--rounds 15] [--epsilon 8]

Builds each model (no training) and counts what a site uploads (common/privacy.py's advice, as
the launcher prints it). The accuracy each setting reaches is in the README's DP sweep.
"""

from __future__ import annotations

import argparse

from benchmarks.measure import emit
from common.config import load_config
from common.privacy import noise_to_signal, resolve_noise_multiplier
from launcher.prepare import noised_coordinates

SERIES = (  # each a list of (choice, the overrides it adds to the ones above it)
    (("lite0_minilm (default), naive LoRA r=8", []),
     ("+ FFA-LoRA, rank 2", ["strategy.lora_aggregation=ffa", "model.lora.r=2"]),
     ("+ projections and head of 16 units", ["model.projection_dim=16", "model.fusion_dim=16"])),
    (("minilm_cnn, naive LoRA r=8 (every text layer)", ["model=minilm_cnn"]),
     ("+ FFA-LoRA (A frozen, not uploaded)", ["strategy.lora_aggregation=ffa"]),
     ("+ rank 2", ["model.lora.r=2"]),
     ("+ LoRA in the top 2 text layers", ["model.text.lora_layers=2"]),
     ("+ half-width CNN [8, 16, 32]", ["model.vision.channels=[8,16,32]"]),
     ("+ head of 16 units (= model=minilm_cnn_dp)", ["model.fusion_dim=16"])),
    (("lite0_minilm_dp: both towers frozen, projections 8, head 16", ["model=lite0_minilm_dp"]),),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites", type=int, default=200)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--epsilon", type=float, default=8.0)
    args = p.parse_args()
    shared = ["privacy=central_dp", f"privacy.target_epsilon={args.epsilon:g}",
              "strategy.sampling=poisson", f"strategy.fraction_train={args.rate:g}",
              f"partition.num_clients={args.sites}", f"strategy.rounds={args.rounds}",
              "model.modalities=[image,text]", "data.labels=[a,b,c,d,e,f]"]
    for steps in SERIES:
        overrides = list(shared)
        for choice, added in steps:
            overrides += added
            cfg = resolve_noise_multiplier(load_config(overrides))
            d = noised_coordinates(cfg)
            emit(figure="dp noised coordinates", choice=choice, noised_coordinates=d,
                 noise_multiplier=round(cfg.privacy.noise_multiplier, 4),
                 noise_to_signal=round(noise_to_signal(cfg, d), 2))


if __name__ == "__main__":
    main()
