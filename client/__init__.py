"""fedmm ClientApp: a site's local LoRA fine-tuning and evaluation."""
