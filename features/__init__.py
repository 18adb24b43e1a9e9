"""Feature extraction: images in, global descriptors and local features out.

- `image`: robust image decoding (every odd input becomes HxWx3 uint8 RGB or a clear error).
- `weights`: where each model's checkpoint is found.
- `base`: the local-extractor contract every plug-in implements.
- `local/`: one file per local-feature method.
- `delg/`: the DELG global descriptor (and its local branch).
- `registry`: names -> plug-in classes.
"""

from features.core import (
    CheckpointError,
    ConfigError,
    ImageReadError,
    RetrError,
    WeightsNotFoundError,
)
from features.types import LocalFeatures

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ImageReadError",
    "LocalFeatures",
    "RetrError",
    "WeightsNotFoundError",
]
