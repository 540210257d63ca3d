"""The adapter state: the trainable tensors that travel between sites and the server.

`adapter_state` is PEFT's own `get_peft_model_state_dict` (LoRA factors + `modules_to_save`);
nothing frozen is ever in it. (The image-only CNN ablation has no pretrained tower and so no
PEFT wrapper: its state is simply its trainable parameters.) Conversions to and from NumPy keep `common/` Flower-free: the apps
wrap these dicts in Flower records.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict


class AdapterMismatch(ValueError):
    """An incoming adapter state does not fit this model (keys, shapes or dtypes)."""


def adapter_state(model: PeftModel | torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the trainable tensors that travel, detached, on CPU, in a stable key order."""
    state = get_peft_model_state_dict(model) if isinstance(model, PeftModel) else {
        name: p for name, p in model.named_parameters() if p.requires_grad}
    return {k: state[k].detach().to("cpu", copy=True) for k in sorted(state)}


def layout_problem(reference: dict[str, tuple[int, ...]], update: dict[str, np.ndarray]
                   ) -> str | None:
    """Why `update` does not have exactly the reference keys and shapes, or None."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"keys differ from the global adapter: missing {missing[:2]}, unexpected {extra[:2]}"
    for key, shape in reference.items():
        if tuple(update[key].shape) != tuple(shape):
            return f"{key}: shape {tuple(update[key].shape)} != {tuple(shape)}"
    return None


def set_adapter_state(model: PeftModel | torch.nn.Module, state: dict[str, np.ndarray | torch.Tensor]) -> None:
    """Load an adapter state into `model` in place, refusing anything that does not fit."""
    reference = adapter_state(model)
    arrays = {k: np.asarray(v) if not torch.is_tensor(v) else v.cpu().numpy()
              for k, v in state.items()}
    problem = layout_problem({k: tuple(v.shape) for k, v in reference.items()}, arrays)
    if problem:
        raise AdapterMismatch(problem)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])).to(reference[k].dtype)
               for k in reference}
    if isinstance(model, PeftModel):
        result = set_peft_model_state_dict(model, tensors)
    else:
        result = model.load_state_dict(tensors, strict=False)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise AdapterMismatch(f"PEFT did not place keys: {unexpected[:3]}")


def to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Convert an adapter state to NumPy arrays (float32 on the wire)."""
    return {k: v.detach().cpu().float().numpy() for k, v in state.items()}


def state_bytes(state: dict[str, np.ndarray] | dict[str, torch.Tensor]) -> int:
    """Bytes of an adapter state's tensors as sent."""
    return int(sum(v.nbytes if isinstance(v, np.ndarray) else v.numel() * v.element_size()
                   for v in state.values()))


def rejection_reason(reference: dict[str, tuple[int, ...]], update: dict[str, np.ndarray],
                     num_examples: float, check_finite: bool = True) -> str | None:
    """Why a site's update must not be aggregated (None if it is fit to aggregate); NaN/Inf
    are left to the caller when `check_finite` is off (`nonfinite_key` finds them)."""
    problem = layout_problem(reference, update)
    if problem:
        return problem
    for key in reference:
        value = update[key]
        if value.dtype.kind != "f":
            return f"{key}: dtype {value.dtype} is not floating point"
    key = nonfinite_key(update, reference) if check_finite else None
    if key is not None:
        return f"{key}: holds NaN or Inf"
    if not (num_examples > 0 and np.isfinite(num_examples)):
        return f"num-examples must be a positive number (got {num_examples})"
    return None


def nonfinite_key(update: dict[str, np.ndarray], keys: Iterable[str]) -> str | None:
    """The first of `keys` whose array holds NaN or Inf, or None."""
    return next((k for k in keys if not np.isfinite(update[k]).all()), None)


def set_lora_a_trainable(model: torch.nn.Module, trainable: bool) -> None:
    """Freeze (FFA-LoRA) or unfreeze every LoRA A factor."""
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(trainable)


def apply_base_residuals(model: torch.nn.Module, residuals: dict[str, np.ndarray]) -> None:
    """Set each LoRA layer's frozen base weight to pretrained + residual (exact aggregation).

    Layers absent from `residuals` are reset to their pretrained weight, so a cached model
    never keeps a residual from another message.
    """
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "lora_A"):
            continue
        if not hasattr(module, "_fedmm_pretrained"):
            module._fedmm_pretrained = base.weight.detach().clone()  # (out, in)
        prefix = name.removesuffix(".default")
        weight = module._fedmm_pretrained
        if prefix in residuals:
            delta = torch.from_numpy(np.asarray(residuals[prefix])).to(weight)
            if delta.numel() == weight.numel():  # conv layers: (out, in·kh·kw) -> the kernel
                delta = delta.reshape(weight.shape)
            if delta.shape != weight.shape:
                raise AdapterMismatch(f"{prefix}: residual shape {tuple(delta.shape)} != "
                                      f"{tuple(weight.shape)}")
            weight = weight + delta
        base.weight.data.copy_(weight)
