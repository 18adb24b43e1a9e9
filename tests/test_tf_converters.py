"""The TensorFlow-reading half of the ASLFeat and DELG converters, on real TF checkpoints.

Skipped unless TensorFlow is installed (it is not part of the project environment).
`make test-tf` builds a separate environment with TensorFlow (.venv-tf) and runs these with
RETR_REQUIRE_TF=1, so there they fail instead of skipping; `.ci/run` runs it as a bounded step.

The checkpoints are written the way the official code writes them: ASLFeat with a TF1
`tf.compat.v1.train.Saver` (V2 format) over graph variables carrying the official names, DELG
with `tf.train.Checkpoint` over nested trackable objects whose attribute paths give the
official `train.py` checkpoint keys. The official DELG SavedModel export (the self-check's
TensorFlow reference, `tf_reference`) is not available here and is not exercised.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import require_tensorflow

tf = require_tensorflow()

from features.convert import aslfeat as convert_aslfeat  # noqa: E402
from features.convert import delg as convert_delg  # noqa: E402
from features.core import ConfigError  # noqa: E402
from features.delg.resnet import DelgNet  # noqa: E402
from features.local.aslfeat import ASLFeat  # noqa: E402
from tests.conftest import fixture_dir  # noqa: E402

ASLFEAT = fixture_dir("aslfeat")
DELG = fixture_dir("delg")


# --- ASLFeat: TF1 Saver checkpoint ----------------------------------------------------------


def _aslfeat_variables() -> dict[str, np.ndarray]:
    with np.load(ASLFEAT / "variables.npz") as npz:
        return {k: npz[k].astype(np.float32) for k in npz.files}


def _fixture_names(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return [line.split("\t")[0] for line in lines if line and not line.startswith("#")]


def _save_tf1(variables: dict[str, np.ndarray], prefix: Path) -> str:
    """Graph-mode variables named exactly as given, saved by tf.compat.v1.train.Saver (V2)."""
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        tf_vars = [v1.Variable(value, name=name) for name, value in variables.items()]
        assert [v.op.name for v in tf_vars] == list(variables)  # no uniquifying suffixes
        saver = v1.train.Saver(var_list=tf_vars, write_version=v1.train.SaverDef.V2)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            return saver.save(sess, str(prefix))


@pytest.fixture(scope="module")
def aslfeat_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    variables = _aslfeat_variables()
    assert list(variables) and set(variables) == set(_fixture_names(ASLFEAT / "variables.txt"))
    # a training checkpoint also holds optimizer slots and counters: they must be skipped
    extra = {
        "global_step": np.array(60000, dtype=np.int64),
        "beta1_power": np.array(0.9, dtype=np.float32),
        "conv0/kernel/Adam": np.zeros_like(variables["conv0/kernel"]),
        "conv0/kernel/Adam_1": np.ones_like(variables["conv0/kernel"]),
    }
    prefix = tmp_path_factory.mktemp("aslfeat_tf") / "model.ckpt"
    assert _save_tf1({**variables, **extra}, prefix) == str(prefix)
    return prefix


def test_aslfeat_checkpoint_holds_the_fixture_names(aslfeat_ckpt: Path) -> None:
    stored = dict(tf.train.list_variables(str(aslfeat_ckpt)))
    variables = _aslfeat_variables()
    assert set(variables) <= set(stored)
    assert all(tuple(stored[k]) == variables[k].shape for k in variables)


@pytest.mark.parametrize("form", ["prefix", "index", "data", "meta", "folder"])
def test_aslfeat_conversion_is_exact(aslfeat_ckpt: Path, tmp_path: Path, form: str) -> None:
    src = {
        "prefix": aslfeat_ckpt,
        "index": Path(f"{aslfeat_ckpt}.index"),
        "data": Path(f"{aslfeat_ckpt}.data-00000-of-00001"),
        "meta": Path(f"{aslfeat_ckpt}.meta"),
        "folder": aslfeat_ckpt.parent,
    }[form]
    assert src.exists() or form == "prefix"
    out = convert_aslfeat.convert_aslfeat(src, tmp_path / "aslfeat_v2.pt")
    assert not Path(f"{out}.part").exists()
    state = torch.load(out, weights_only=True)
    expected = convert_aslfeat.map_variables(_aslfeat_variables())
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == torch.float32, key
        assert torch.equal(state[key], value), key


def test_converted_aslfeat_detects_like_the_direct_mapping(
    aslfeat_ckpt: Path, tmp_path: Path
) -> None:
    converted = convert_aslfeat.convert_aslfeat(aslfeat_ckpt, tmp_path / "converted.pt")
    direct = tmp_path / "direct.pt"
    torch.save(convert_aslfeat.map_variables(_aslfeat_variables()), direct)
    gray = np.load(ASLFEAT / "image0_input.npz")["image_gray_uint8"]
    conf = {"pyramid": False, "max_keypoints": 1000}
    mine = ASLFeat(weights=str(converted), **conf).detect(gray)
    ref = ASLFeat(weights=str(direct), **conf).detect(gray)
    assert len(ref.keypoints) == 1000
    for field in ("pixels", "keypoints", "scores", "descriptors"):
        assert torch.equal(getattr(mine, field), getattr(ref, field)), field


# --- DELG: TF2 object-based checkpoint ------------------------------------------------------


@functools.cache
def _delg_variables() -> dict[str, np.ndarray]:
    with np.load(DELG / "delg_r50_random_fp16_weights.npz") as npz:
        return {k: npz[k].astype(np.float32) for k in npz.files}


def _trackable_tree(variables: dict[str, np.ndarray]) -> tf.Module:
    """Nested tf.Modules whose attribute paths are the keys without the value suffix."""
    root = tf.Module()
    for key, value in variables.items():
        *path, leaf = key.removesuffix(convert_delg.VALUE_SUFFIX).split("/")
        node = root
        for part in path:
            if not hasattr(node, part):
                setattr(node, part, tf.Module())
            node = getattr(node, part)
        setattr(node, leaf, tf.Variable(value))
    return root


@pytest.fixture(scope="module", params=["delf_weights", "manager"])
def delg_ckpt(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(checkpoint prefix, key prefix): train.py's `delf_weights` (model.save_weights, keys at
    the root) and a CheckpointManager `ckpt-N` (keys under `model/`, plus optimizer state)."""
    variables = _delg_variables()
    assert set(variables) == set(_fixture_names(DELG / "variables.txt"))
    tree = _trackable_tree(variables)
    folder = tmp_path_factory.mktemp(f"delg_{request.param}")
    if request.param == "delf_weights":
        # Keras save_weights: Checkpoint.write plus the folder's `checkpoint` state file
        ckpt = tf.train.Checkpoint(**{k: getattr(tree, k) for k in _roots(variables)})
        path = ckpt.write(str(folder / "delf_weights"))
        tf.compat.v1.train.update_checkpoint_state(str(folder), path)
        return path, ""
    optimizer = tf.Module()
    optimizer.iter = tf.Variable(np.int64(7))
    optimizer.learning_rate = tf.Variable(np.float32(0.01))
    ckpt = tf.train.Checkpoint(model=tree, optimizer=optimizer)
    manager = tf.train.CheckpointManager(ckpt, str(folder), max_to_keep=1)
    return manager.save(), "model/"


def _roots(variables: dict[str, np.ndarray]) -> list[str]:
    return sorted({k.split("/")[0] for k in variables})


def test_delg_checkpoint_keys_are_the_fixture_keys(delg_ckpt: tuple[str, str]) -> None:
    path, key_prefix = delg_ckpt
    stored = dict(tf.train.list_variables(path))
    variables = _delg_variables()
    for key, value in variables.items():
        assert tuple(stored[key_prefix + key]) == value.shape, key


@pytest.mark.parametrize("form", ["prefix", "index", "folder"])
def test_delg_read_variables_is_exact(delg_ckpt: tuple[str, str], form: str) -> None:
    path, key_prefix = delg_ckpt
    src = {"prefix": Path(path), "index": Path(f"{path}.index"), "folder": Path(path).parent}
    read = convert_delg.read_variables(tf, src[form])
    variables = _delg_variables()
    for key, value in variables.items():
        got = read[key_prefix + key]
        assert got.dtype == np.float32 and np.array_equal(got, value), key
    extra = {k for k in read if k.removeprefix(key_prefix) not in variables}
    assert extra  # the object graph at least
    assert all(convert_delg.TRAINING_ONLY.search(convert_delg.canonical_name(k)) for k in extra)


def test_delg_convert_variables_from_a_tf_checkpoint(
    delg_ckpt: tuple[str, str], tmp_path: Path
) -> None:
    read = convert_delg.read_variables(tf, Path(delg_ckpt[0]))
    with np.load(DELG / "perscale_image0.npz") as npz:  # level 4 is scale 1.0
        refs = {k: npz[f"scale4_{k}"] for k in convert_delg.REFERENCE_KEYS}
        probe = npz["image_rgb"]
    out = tmp_path / "delg_r50.pt"
    errors = convert_delg.convert_variables(read, out, refs, probe)
    assert set(errors) == set(convert_delg.REFERENCE_KEYS)
    assert all(e <= convert_delg.DEFAULT_TOL for e in errors.values())
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["depth"] == 50
    expected = convert_delg.map_variables(_delg_variables(), 50)
    assert ckpt["state_dict"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(ckpt["state_dict"][key], value), key
    DelgNet(50).load_state_dict(ckpt["state_dict"], strict=True)


def test_convert_delg_needs_a_savedmodel_for_the_self_check(
    delg_ckpt: tuple[str, str], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="SavedModel"):
        convert_delg.convert_delg(Path(delg_ckpt[0]), tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
