"""tailtune: transfer learning on class-imbalanced image data (Hydra + Lightning)."""

from __future__ import annotations

__version__ = "0.1.0"


def load(ckpt_path: str, map_location: str = "cpu"):
    """Load a trained tailtune checkpoint as a model that predicts from images.

    The returned LightningModule is in eval mode; ``model.predict_images(x)`` takes a float
    tensor ``[N, 3, H, W]`` in ``[0, 1]`` (any size: the model resizes and normalises itself)
    and returns class probabilities; ``model.class_names`` names the columns.
    """
    from tailtune.build.models import load_checkpoint_model

    return load_checkpoint_model(ckpt_path, map_location=map_location)
