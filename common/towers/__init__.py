"""Pretrained towers with one interface: `forward = head(stem(.))`, `out_dim`, `lora_targets`."""
