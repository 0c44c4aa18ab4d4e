"""Flax NNX examples for ire_optax (ResNet, ViT, Llama) sharing one training loop."""
