"""Reading official TensorFlow checkpoints: the optional TensorFlow import and variable reading
that every TF converter needs (TensorFlow is imported only here, and only when called)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from features.core import CheckpointError, ConfigError


def import_tensorflow(purpose: str) -> Any:
    """The tensorflow module, or a ConfigError saying that `purpose` needs it and how to get it."""
    try:
        import tensorflow as tf
    except ImportError:
        raise ConfigError(f"{purpose} needs TensorFlow: pip install 'retr[tf]'") from None
    return tf


def read_checkpoint(tf: Any, prefix: str | Path, src: str | Path) -> dict[str, np.ndarray]:
    """Every variable of the TF checkpoint `prefix` (a file name like model.ckpt-60000.index is
    cut back to its prefix) as name -> array; `src` names it in errors."""
    prefix = re.sub(r"\.(index|meta|data-\d+-of-\d+)$", "", str(prefix))
    try:
        reader = tf.train.load_checkpoint(prefix)
        names = reader.get_variable_to_shape_map()
        return {name: reader.get_tensor(name) for name in names}
    except Exception as exc:  # TF raises several unrelated types for unreadable files
        raise CheckpointError(f"cannot read TensorFlow checkpoint {src}: {exc}") from None
