"""Convert an official DELG TensorFlow model (tensorflow/models `research/delf`, Keras
`delg_model.Delg`) into a retr checkpoint for features.delg.resnet.DelgNet, and refuse to write
it unless the converted network reproduces TensorFlow's outputs on a probe image.

Accepted sources: a `train.py` checkpoint (`delf_weights`, or a CheckpointManager
`ckpt-N` whose keys carry a `model/` prefix) and a SavedModel exported by
`export_local_and_global_model.py` (keys `_model/...`, where nested Keras models number their
variables in creation order). Official name -> retr name:

    backbone/conv1, bn_conv1                      -> conv1, bn1
    backbone/l{2,3,4,5}{a,b,...}                  -> layer{1,2,3,4}.{0,1,...}
      conv2a/bn2a, conv2b/bn2b, conv2c/bn2c       -> conv1/bn1, conv2/bn2, conv3/bn3
      conv_shortcut/bn_shortcut                   -> downsample.0/downsample.1
    backbone/embedding_layer                      -> embedding (the whitening FC)
    attention/conv1, bn_conv1, conv2              -> attention.conv1, attention.bn, attention.conv2
    autoencoder/conv1                             -> autoencoder.conv1

kernel -> weight (conv HWIO -> OIHW, dense [in, out] -> [out, in]); gamma/beta/moving_mean/
moving_variance -> weight/bias/running_mean/running_var.

Ignored, because inference never reads them: the training classifiers (`cosine_weights`,
`scale_factor`, `desc_classification`, `attn_classification`), `autoencoder/conv2` (the
autoencoder's expanding half, used only by the training loss), optimizer state and slot
variables, counters and the object graph. Anything else left unmapped is an error.

TensorFlow is needed only to read the source and run the reference: pip install 'retr[tf]'.
The released TF1-style archives (`r50delg_gldv2clean_20200914` and friends) have not been
checked against this mapping: if their names differ, `map_variables` lists every one it cannot
place instead of writing a half-mapped file.
"""

from __future__ import annotations

import logging
import os
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from features.convert.tf_checkpoint import import_tensorflow, read_checkpoint
from features.core import CheckpointError, ConfigError
from features.delg.resnet import BLOCKS, DelgNet, checkpoint_dict

logger = logging.getLogger(__name__)

VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
TRAINING_ONLY = re.compile(
    r"(^|/)(cosine_weights|scale_factor|desc_classification|attn_classification|optimizer"
    r"|save_counter|global_step|_CHECKPOINTABLE_OBJECT_GRAPH)(/|$)"
    r"|\.OPTIMIZER_SLOT|^autoencoder/conv2/"
)
"""Source variables that inference never reads (see the module docstring)."""

BLOCK_LAYERS = {
    "conv2a": "conv1",
    "bn2a": "bn1",
    "conv2b": "conv2",
    "bn2b": "bn2",
    "conv2c": "conv3",
    "bn2c": "bn3",
    "conv_shortcut": "downsample.0",
    "bn_shortcut": "downsample.1",
}
HEAD_LAYERS = {
    "backbone/conv1": "conv1",
    "backbone/bn_conv1": "bn1",
    "backbone/embedding_layer": "embedding",
    "attention/conv1": "attention.conv1",
    "attention/bn_conv1": "attention.bn",
    "attention/conv2": "attention.conv2",
    "autoencoder/conv1": "autoencoder.conv1",
}
PARAMS = {
    "kernel": "weight",
    "bias": "bias",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}
CONV_VARS = ("kernel", "bias")
BN_VARS = ("gamma", "beta", "moving_mean", "moving_variance")
SAVEDMODEL_ORDER = {
    "block": [
        f"{layer}/{var}"
        for conv, norm in (("conv2a", "bn2a"), ("conv2b", "bn2b"), ("conv2c", "bn2c"))
        + (("conv_shortcut", "bn_shortcut"),)
        for layer, names in ((conv, CONV_VARS), (norm, BN_VARS))
        for var in names
    ],
    "attention": [f"conv1/{v}" for v in CONV_VARS]
    + [f"bn_conv1/{v}" for v in BN_VARS]
    + [f"conv2/{v}" for v in CONV_VARS],
    "autoencoder": [f"conv1/{v}" for v in CONV_VARS] + [f"conv2/{v}" for v in CONV_VARS],
}
"""Creation order of the variables of each nested Keras model: a SavedModel names them
`<model>/variables/<index>`."""

_BLOCK = re.compile(r"^backbone/l([2-5])([a-z])/(\w+)/(\w+)$")
_SAVED = re.compile(r"^(backbone/l[2-5][a-z]|attention|autoencoder)/variables/(\d+)$")


def canonical_name(key: str) -> str:
    """A checkpoint or SavedModel key -> the `train.py` checkpoint path without the value
    suffix, e.g. `_model/backbone/l2a/variables/6/...` -> `backbone/l2a/conv2b/kernel`."""
    name = key.removesuffix(VALUE_SUFFIX).removesuffix(":0")
    name = name.removeprefix("_model/").removeprefix("model/")
    saved = _SAVED.match(name)
    if saved is None:
        return name
    owner, index = saved.group(1), int(saved.group(2))
    order = SAVEDMODEL_ORDER["block" if owner.startswith("backbone/") else owner]
    return f"{owner}/{order[index]}" if index < len(order) else name


def target_key(name: str) -> str | None:
    """The DelgNet state-dict key of one canonical official name, or None."""
    block = _BLOCK.match(name)
    if block is not None:
        stage, letter, layer, var = block.groups()
        if layer not in BLOCK_LAYERS or var not in PARAMS:
            return None
        index = string.ascii_lowercase.index(letter)
        return f"layer{int(stage) - 1}.{index}.{BLOCK_LAYERS[layer]}.{PARAMS[var]}"
    layer, _, var = name.rpartition("/")
    if layer in HEAD_LAYERS and var in PARAMS:
        return f"{HEAD_LAYERS[layer]}.{PARAMS[var]}"
    return None


def to_torch_layout(array: np.ndarray) -> torch.Tensor:
    """float32 tensor in PyTorch layout: conv HWIO -> OIHW, dense [in, out] -> [out, in]."""
    tensor = torch.from_numpy(np.array(array, dtype=np.float32))
    if tensor.ndim == 4:
        return tensor.permute(3, 2, 0, 1).contiguous()
    if tensor.ndim == 2:
        return tensor.T.contiguous()
    return tensor


def infer_depth(tf_vars: Mapping[str, Any]) -> int:
    """50 or 101, from how many l4 blocks the source has."""
    l4 = {m.group(2) for k in tf_vars if (m := _BLOCK.match(canonical_name(k))) and m[1] == "4"}
    for depth, blocks in BLOCKS.items():
        if len(l4) == blocks[2]:
            return depth
    raise CheckpointError(f"cannot tell the ResNet depth: the source has {len(l4)} l4 blocks")


def map_variables(tf_vars: Mapping[str, np.ndarray], depth: int) -> dict[str, torch.Tensor]:
    """Official variables (key -> array) -> DelgNet(depth) state dict (float32, torch layout).

    Raises CheckpointError listing every unmapped source variable, every target left without a
    value, every target mapped twice and every shape mismatch.
    """
    expected = DelgNet(depth).state_dict()
    state: dict[str, torch.Tensor] = {}
    unmapped, twice, bad_shapes = [], [], []
    for key in sorted(tf_vars):
        name = canonical_name(key)
        if TRAINING_ONLY.search(name):
            continue
        target = target_key(name)
        if target is None or target not in expected:
            unmapped.append(key)
            continue
        if target in state:
            twice.append(target)
        state[target] = to_torch_layout(tf_vars[key])
        if state[target].shape != expected[target].shape:
            got, want = tuple(state[target].shape), tuple(expected[target].shape)
            bad_shapes.append(f"{key} {got} vs {target} {want}")
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    if unmapped or missing or twice or bad_shapes:
        raise CheckpointError(
            f"DELG ResNet-{depth} variables do not match the model: "
            f"unmapped source variables {unmapped}; missing targets {missing}; "
            f"mapped twice {twice}; wrong shapes (torch layout) {bad_shapes}"
        )
    for key, value in expected.items():  # BN step counters have no TF counterpart
        state.setdefault(key, value)
    return state


DEFAULT_TOL = 1e-4
"""Largest accepted max|torch - TF| of each self-check output, relative to max|TF|."""
REFERENCE_KEYS = ("raw_global", "attention_prob", "local_feature_map")


def default_probe() -> np.ndarray:
    """A fixed (227, 341, 3) uint8 RGB probe: smooth colour gradients plus noise. Odd sides
    exercise the asymmetric SAME padding."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:227, 0:341].astype(np.float32)
    base = np.stack([xx / 341, yy / 227, 0.5 + 0.5 * np.sin((xx + yy) / 17)], axis=-1)
    noisy = 255 * base + rng.normal(0, 20, base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


@torch.inference_mode()
def torch_outputs(net: DelgNet, probe: np.ndarray) -> dict[str, np.ndarray]:
    """The self-check outputs of `net` on an (H, W, 3) uint8 probe at scale 1, in TF layout:
    raw_global (2048,), attention_prob (h, w), local_feature_map (h, w, 128)."""
    from features.delg.official import normalise

    raw, prob, local = net(normalise(probe, next(net.parameters()).device))
    return {
        "raw_global": raw[0].cpu().numpy(),
        "attention_prob": prob[0].cpu().numpy(),
        "local_feature_map": local[0].permute(1, 2, 0).cpu().numpy(),
    }


def self_check(
    reference_outputs: Mapping[str, np.ndarray],
    torch_model: DelgNet,
    probe: np.ndarray,
    tol: float = DEFAULT_TOL,
) -> dict[str, float]:
    """Compare TF's outputs on `probe` (any of REFERENCE_KEYS, TF layout, scale 1) with the
    converted network's. Returns max|Δ| / max|ref| per output; raises CheckpointError with
    every error when one exceeds `tol` or a shape differs."""
    if not set(reference_outputs) & set(REFERENCE_KEYS):
        raise ValueError(
            f"reference outputs need one of {REFERENCE_KEYS}, got {sorted(reference_outputs)}"
        )
    mine = torch_outputs(torch_model, probe)
    errors: dict[str, float] = {}
    problems = []
    for key in REFERENCE_KEYS:
        if key not in reference_outputs:
            continue
        ref = np.asarray(reference_outputs[key], dtype=np.float32)
        if ref.shape != mine[key].shape:
            problems.append(f"{key} shape {mine[key].shape} vs TF {ref.shape}")
            continue
        errors[key] = float(np.abs(mine[key] - ref).max() / max(np.abs(ref).max(), 1e-12))
        if not errors[key] <= tol:  # also catches NaN
            problems.append(f"{key} relative max|Δ| {errors[key]:.2e} > {tol:.0e}")
    if problems:
        raise CheckpointError(
            f"converted DELG disagrees with TensorFlow on the probe: {'; '.join(problems)}"
        )
    return errors


def write_checkpoint(net: DelgNet, out: str | Path) -> Path:
    """Save {"format", "depth", "state_dict"} atomically (temp file, then os.replace)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    torch.save(checkpoint_dict(net), tmp)
    os.replace(tmp, out)
    return out


def convert_variables(
    tf_vars: Mapping[str, np.ndarray],
    out: str | Path,
    reference_outputs: Mapping[str, np.ndarray],
    probe: np.ndarray,
    depth: int | None = None,
    tol: float = DEFAULT_TOL,
) -> dict[str, float]:
    """Map the variables, load them into DelgNet, self-check against TF's outputs on `probe`,
    and only then write `out`. The TensorFlow-free half of convert_delg; returns the
    self-check errors."""
    depth = depth or infer_depth(tf_vars)
    net = DelgNet(depth)
    net.load_state_dict(map_variables(tf_vars, depth), strict=True)
    errors = self_check(reference_outputs, net.eval(), probe, tol)
    write_checkpoint(net, out)
    logger.info("DELG self-check passed (%s); wrote %s", _fmt(errors), out)
    return errors


def _fmt(errors: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.1e}" for k, v in errors.items())


def convert_delg(
    src: str | Path,
    out: str | Path,
    probe_image: str | Path | None = None,
    tol: float = DEFAULT_TOL,
    reference: str | Path | None = None,
) -> Path:
    """Convert an official DELG model to a retr checkpoint at `out` (e.g.
    ~/.cache/retr/weights/delg_r50_gldv2.pt), checked against TensorFlow first.

    src: an exported SavedModel directory, or a `train.py` checkpoint prefix. The self-check
    runs the SavedModel `reference` (default: `src` itself, which must then be a SavedModel)
    and the converted network on `probe_image` (default: a fixed synthetic image); nothing is
    written when they disagree by more than `tol`.
    """
    from features.image import load_image

    tf = import_tensorflow("converting the official DELG model")
    saved = Path(reference) if reference is not None else Path(src)
    if not (saved / "saved_model.pb").is_file():
        raise ConfigError(
            f"{saved}: the self-check needs an exported SavedModel (the output of "
            "export_local_and_global_model.py, or a released archive): pass it as `reference`"
        )
    probe = load_image(probe_image) if probe_image is not None else default_probe()
    tf_vars = read_variables(tf, Path(src))
    try:
        convert_variables(tf_vars, out, tf_reference(tf, saved, probe), probe, tol=tol)
    except CheckpointError as exc:
        raise CheckpointError(f"{src}: {exc}") from None
    return Path(out)


def read_variables(tf: Any, src: Path) -> dict[str, np.ndarray]:
    """Every variable of a SavedModel directory or a TF checkpoint (prefix, one of its files,
    or its folder) as key -> array."""
    prefix = src / "variables" / "variables" if (src / "saved_model.pb").is_file() else src
    return read_checkpoint(tf, prefix, src)


FEEDS = [
    "input_image:0",
    "input_scales:0",
    "input_abs_thres:0",
    "input_max_feature_num:0",
    "input_global_scales_ind:0",
]
FETCHES = ["boxes:0", "features:0", "scales:0", "scores:0", "global_descriptors:0"]


def tf_reference(tf: Any, saved_model: Path, probe: np.ndarray) -> dict[str, np.ndarray]:
    """Run the exported model on `probe` at scale 1 with no threshold and no cap, and rebuild
    the dense outputs (REFERENCE_KEYS) from its per-cell boxes, features and scores."""
    model = tf.saved_model.load(str(saved_model))
    args = (
        tf.constant(probe),
        tf.constant([1.0]),
        tf.constant(-1.0),  # softplus scores are >= 0: every cell is kept
        tf.constant(1 << 30),
        tf.constant([0]),
    )
    if "serving_default" in getattr(model, "signatures", {}):
        names = [f.split(":")[0] for f in FEEDS]
        out = model.signatures["serving_default"](**dict(zip(names, args, strict=True)))
        boxes, feats, _, scores, glob = (out[f.split(":")[0]].numpy() for f in FETCHES)
    else:  # TF1-style export, as the official extractor loads the released archives
        pruned = model.prune(feeds=FEEDS, fetches=FETCHES)
        boxes, feats, _, scores, glob = (t.numpy() for t in pruned(*args))
    return dense_from_cells(boxes, feats, scores.reshape(-1), glob[0])


def dense_from_cells(
    boxes: np.ndarray, feats: np.ndarray, scores: np.ndarray, raw_global: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-cell outputs at scale 1 (boxes [N, 4] ymin, xmin, ymax, xmax centred on 32 i, 32 j)
    -> attention_prob (h, w), local_feature_map (h, w, D), raw_global (D,)."""
    ij = np.rint((boxes[:, :2] + boxes[:, 2:]) / 2 / 32).astype(int)
    h, w = ij.max(0) + 1
    if len(ij) != h * w or len(np.unique(ij[:, 0] * w + ij[:, 1])) != h * w:
        raise CheckpointError(f"reference export returned {len(ij)} cells, expected {h}x{w}")
    prob = np.zeros((h, w), np.float32)
    local = np.zeros((h, w, feats.shape[1]), np.float32)
    prob[ij[:, 0], ij[:, 1]] = scores
    local[ij[:, 0], ij[:, 1]] = feats
    return {"raw_global": raw_global, "attention_prob": prob, "local_feature_map": local}
