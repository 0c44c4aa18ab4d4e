"""Shared library of the examples: typed configs, data, models, optimizers and the loop.

* :mod:`.config` -- the typed configs of a run (``TrainConfig`` and its ``DataConfig``,
  ``ModelConfig`` and ``OptimizerConfig``).
* :mod:`.data` -- digits / MNIST / CIFAR / text loaders and deterministic batchers.
* :mod:`.models` -- ResNet, ViT and Llama in Flax NNX with size presets.
* :mod:`.optim` -- optimizers from an ``OptimizerConfig``; losses and label noise.
* :mod:`.train` -- ``run(cfg)``, the one training loop: the train step (jitted, or for
  ``shard_map``), evaluation, logs and checkpoints.
* :mod:`.plots` -- the curves of runs as PNG figures.
* :mod:`.cli` -- the examples' command lines, generated from the configs.
"""
