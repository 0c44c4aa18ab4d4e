"""Shared library of the examples: data loaders, models, optimizers and the training loop.

* :mod:`.data` -- digits / MNIST / CIFAR / text loaders and deterministic batchers.
* :mod:`.models` -- ResNet, ViT and Llama in Flax NNX with size presets.
* :mod:`.optim` -- optimizers from command-line arguments; losses and label noise.
* :mod:`.train` -- the jitted train step, evaluation, logs, checkpoints and plots.
* :mod:`.cli` -- the examples' command lines.
"""
