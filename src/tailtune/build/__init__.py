"""The build layer: the one place below the entry points (:mod:`tailtune.cli`) that knows
Hydra. It turns a composed config into datamodule, model and Trainer, the same way for
train, eval, predict and :func:`tailtune.load`, so evaluation always rebuilds a model
exactly as training built it.

- :mod:`~tailtune.build.config`: where configs live, Hydra's compose API, the model class a
  config names, the config as plain data (no torch: the entry points use it first);
- :mod:`~tailtune.build.checkpoints`: reading checkpoints (moved classes mapped), the one
  same-split check;
- :mod:`~tailtune.build.data`: the image datamodule, its training sampler, the loss;
- :mod:`~tailtune.build.trainer`: Trainer, callbacks, loggers, the device, what is logged;
- :mod:`~tailtune.build.models`: models from a config or a checkpoint, dispatched on what
  the model class declares (``trains_on_features``, ``builds_on_checkpoint``,
  ``is_ensemble``), and frozen-feature experiments;
- :mod:`~tailtune.build.results`: final metrics of the best checkpoint, test artifacts;
- :mod:`~tailtune.build.ensemble`: members, their training, the combiner and the
  ensemble's assessment, assembling from trained checkpoints.

Each module imports only those above it in this list. Nothing is imported here, so that
:mod:`tailtune.build.config` loads without torch.
"""
