"""Shared library of the examples: data loaders, models, optimizers and the training loop.

* :mod:`.data` -- digits / MNIST / CIFAR / text loaders and deterministic batchers.
* :mod:`.models` -- ResNet, ViT and Llama in Flax NNX with size presets.
* :mod:`.optim` -- optimizers from command-line arguments; losses and label noise.
* :mod:`.train` -- the train step (jitted, or for ``shard_map``), evaluation, logs and
  checkpoints.
* :mod:`.plots` -- the curves of runs as PNG figures.
* :mod:`.cli` -- the examples' command lines.
"""
