"""Convert the official ASLFeat TensorFlow checkpoint into the state dict of
features.local.aslfeat.ASLFeatNet.

Official variable names (lzx551402/ASLFeat, `models/cnn_wrapper`) and where they go:

    convK/kernel (3,3,I,O)                      -> convK.conv.weight (O,I,3,3)
    convK/bn/moving_{mean,variance}             -> convK.bn.running_{mean,var}
    deform_param/L/{offset,amplitude}/kernel    -> L.conv.{offset,amplitude}.weight (O,I,3,3)
    deform_param/L/{offset,amplitude}/bias      -> L.conv.{offset,amplitude}.bias
    tower/L/instance_max ()                     -> instance_max.L

for K in 0..5, 6_0, 6_1, 6 (the deformable layers' main kernels are `conv6*/kernel` too).
Optimizer slots and step counters a training checkpoint may hold are skipped; any other
variable the model does not use is an error, so a checkpoint of another variant never loads
half-mapped.

TensorFlow is needed only to read the checkpoint: pip install 'retr[tf]'.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from features.convert.tf_checkpoint import import_tensorflow, read_checkpoint
from features.core import CheckpointError

logger = logging.getLogger(__name__)

_LAYER = r"(conv\d(?:_\d)?)"
RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"^{_LAYER}/kernel$"), r"\1.conv.weight"),
    (re.compile(rf"^{_LAYER}/bn/moving_mean$"), r"\1.bn.running_mean"),
    (re.compile(rf"^{_LAYER}/bn/moving_variance$"), r"\1.bn.running_var"),
    (re.compile(rf"^deform_param/{_LAYER}/(offset|amplitude)/kernel$"), r"\1.conv.\2.weight"),
    (re.compile(rf"^deform_param/{_LAYER}/(offset|amplitude)/bias$"), r"\1.conv.\2.bias"),
    (re.compile(rf"^tower/{_LAYER}/instance_max$"), r"instance_max.\1"),
)
TRAINING_STATE = re.compile(r"(^|/)(global_step|beta[12]_power|Adam(_\d+)?|Momentum)$")
"""Variables of a training checkpoint that inference never reads (optimizer slots, counters)."""


def target_key(tf_name: str) -> str | None:
    """The ASLFeatNet state-dict key of one official variable, or None if no rule matches."""
    for pattern, replacement in RULES:
        if pattern.match(tf_name):
            return pattern.sub(replacement, tf_name)
    return None


def map_variables(name_to_array: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Official TF variables (name without ':0' -> array) -> ASLFeatNet state dict (float32).

    4-D kernels go from HWIO to OIHW. Raises CheckpointError listing every unmapped source
    variable, every model key left without a value, and every shape mismatch.
    """
    from features.local.aslfeat import ASLFeatNet

    expected = ASLFeatNet().state_dict()
    state: dict[str, torch.Tensor] = {}
    unmapped, bad_shapes = [], []
    for name in sorted(name_to_array):
        clean = name.removesuffix(":0")
        if TRAINING_STATE.search(clean):
            continue
        key = target_key(clean)
        if key is None or key not in expected:
            unmapped.append(clean)
            continue
        tensor = torch.from_numpy(np.array(name_to_array[name], dtype=np.float32))
        if tensor.ndim == 4:
            tensor = tensor.permute(3, 2, 0, 1).contiguous()
        if tensor.shape != expected[key].shape:
            bad_shapes.append(
                f"{clean} {tuple(tensor.shape)} vs {key} {tuple(expected[key].shape)}"
            )
        state[key] = tensor
    missing = sorted(set(expected) - set(state))
    if unmapped or missing or bad_shapes:
        raise CheckpointError(
            "ASLFeat checkpoint does not match the model: "
            f"unmapped source variables {unmapped}; missing targets {missing}; "
            f"wrong shapes (OIHW) {bad_shapes}"
        )
    return state


def read_tf_checkpoint(src: str | Path) -> dict[str, np.ndarray]:
    """All variables of a TF checkpoint (prefix like model.ckpt-60000, one of its files, or its
    folder) as name -> array. Needs TensorFlow."""
    tf = import_tensorflow("reading the official ASLFeat checkpoint")
    return read_checkpoint(tf, src, src)


def convert_aslfeat(src: str | Path, out: str | Path) -> Path:
    """Convert the official checkpoint `src` to a PyTorch state dict written atomically to `out`.

    Put the result at ~/.cache/retr/weights/aslfeat_v2.pt (or pass it as `weights=`).
    """
    arrays = read_tf_checkpoint(src)
    try:
        state = map_variables(arrays)
    except CheckpointError as exc:
        raise CheckpointError(f"{src}: {exc}") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    torch.save(state, tmp)
    os.replace(tmp, out)
    logger.info("converted %d ASLFeat variables from %s to %s", len(state), src, out)
    return out
