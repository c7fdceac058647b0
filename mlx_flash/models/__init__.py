"""Model architectures mlx-lm lacks, and the lookup that adds them to mlx-lm's.

`get_model_classes(config)` has the signature of `mlx_lm.utils._get_classes`, so it can be passed
to `mlx_lm.utils.load_model(path, get_model_classes=...)`: it returns this package's classes for
the model types defined here (OPT) and mlx-lm's for every other.
"""

from __future__ import annotations

import mlx.nn as nn

from . import opt

# model_type -> the module defining its ModelArgs and Model
MODELS = {"opt": opt}


def get_model_classes(config: dict) -> tuple[type[nn.Module], type]:
    """(Model class, ModelArgs class) for a config.json's `model_type`."""
    module = MODELS.get(config.get("model_type"))
    if module is not None:
        return module.Model, module.ModelArgs
    from mlx_lm.utils import _get_classes

    return _get_classes(config)
