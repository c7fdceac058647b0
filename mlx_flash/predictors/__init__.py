"""Low-rank activation predictors (the paper's section 3.1): per layer, a small classifier of
which FFN neurons a token will need, trained on calibration text, stored in the flash folder.

    python -m mlx_flash.predictors train --model FLASHDIR --data TEXTFILE
    python -m mlx_flash.predictors eval  --model FLASHDIR --data HELDOUT.txt
    model, tok = mlx_flash.load(FLASHDIR, selection="predictor")
"""

from .store import LayerPredictor, PredictorError, Predictors, Storage, predictor_sizes

__all__ = ["LayerPredictor", "PredictorError", "Predictors", "Storage", "predictor_sizes"]
