"""The example models in Flax NNX: CIFAR ResNet, Vision Transformer, Llama decoder.

Every model is called as ``model(x, train=...)`` and returns logits with the
class (or vocabulary) axis last. ``train`` only matters for BatchNorm (batch
statistics and running-average updates when ``True``, running averages when
``False``); there is no dropout, so a forward pass is a deterministic function
of the parameters, the BatchNorm statistics and the input.

A model computes in the dtype of its parameters and input (the examples'
``--precision`` casts both): BatchNorm normalises in float32 with float32
running statistics and returns the input's dtype, the embedding is looked up in
its own dtype, and float16 attention runs in float32 on the CPU (XLA:CPU has no
float16 product with float32 accumulation).

Sizes are chosen by presets, from CI-sized toys to the papers' models:

* :class:`ResNet` -- He et al. (2016) CIFAR ResNets, depth ``6n+2``:
  ``toy`` (8 layers, width 4), ``resnet20``, ``resnet32``, ``resnet44``,
  ``resnet56``, ``resnet110`` (width 16-32-64).
* :class:`ViT` -- Dosovitskiy et al. (2021) pre-norm ViT with a class token:
  ``toy``, ``mini``, ``vit-ti`` (192/12/3), ``vit-s`` (384/12/6, the IRE
  paper's ViT-S).
* :class:`Llama` -- Touvron et al. (2023) decoder: RMSNorm, rotary embeddings,
  SwiGLU, causal attention, tied or untied embeddings: ``toy``, ``mini``,
  ``small``, ``60m`` (d 512, 8 layers, 8 heads, SwiGLU 1376: the IRE paper's
  Llama-60M, GaLore's configuration) and ``130m``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

_Args = TypeVar("_Args", bound=tuple)


def keep_dtypes(args: _Args, /, *, dtype: Any = None, inexact: bool = True) -> _Args:
  """A layer's ``promote_dtype`` that leaves its operands' dtypes as they are.

  Flax promotes a layer's input with its variables: the float32 running statistics of a
  BatchNorm would turn a bfloat16 input into float32 output, and ``nnx.Embed`` fixes its
  dtype to its parameters' at construction. With this, BatchNorm computes ``x - mean`` in
  float32 and returns the dtype of its input, scale and bias, and the embedding follows its
  (cast) table.
  """
  del dtype, inexact
  return args


def batch_norm(features: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, momentum=0.9, promote_dtype=keep_dtypes, rngs=rngs)


def attention(q, k, v, *, causal: bool):
  """``jax.nn.dot_product_attention``; float16 in float32 on the CPU, whose dot products
  cannot take float16 operands with float32 accumulation (as the attention's logits do)."""
  run = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  if q.dtype != jnp.float16:
    return run(q, k, v)
  f32 = lambda q, k, v: run(*(a.astype(jnp.float32) for a in (q, k, v))).astype(q.dtype)
  return jax.lax.platform_dependent(q, k, v, cpu=f32, default=run)


# -----------------------------------------------------------------------------
# ResNet (CIFAR family)
# -----------------------------------------------------------------------------

RESNET_PRESETS = {
    "toy": dict(depth=8, width=4),
    "resnet20": dict(depth=20, width=16),
    "resnet32": dict(depth=32, width=16),
    "resnet44": dict(depth=44, width=16),
    "resnet56": dict(depth=56, width=16),
    "resnet110": dict(depth=110, width=16),
}


class BasicBlock(nnx.Module):
  """Two 3x3 conv-BN layers with a residual; a 1x1 conv-BN projection when shapes change."""

  def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=1, use_bias=False,
                          rngs=rngs)
    self.bn1 = batch_norm(cout, rngs=rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, use_bias=False, rngs=rngs)
    self.bn2 = batch_norm(cout, rngs=rngs)
    self.proj: nnx.Conv | None
    self.proj_bn: nnx.BatchNorm | None
    if stride != 1 or cin != cout:
      self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
      self.proj_bn = batch_norm(cout, rngs=rngs)
    else:
      self.proj = self.proj_bn = None

  def __call__(self, x, *, train: bool):
    ura = not train
    y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
    y = self.bn2(self.conv2(y), use_running_average=ura)
    if self.proj is not None and self.proj_bn is not None:
      x = self.proj_bn(self.proj(x), use_running_average=ura)
    return nnx.relu(x + y)


class ResNet(nnx.Module):
  """CIFAR ResNet of depth ``6n + 2``: a stem, three stages of ``n`` blocks, a linear head.

  Stage widths are ``width``, ``2 width`` and ``4 width``; the second and third
  stages halve the resolution. BatchNorm everywhere (momentum 0.9). Where the
  shape changes the shortcut is a 1x1 convolution with BatchNorm (He et al.'s
  option B; their CIFAR models zero-pad instead, which has no parameters: our
  ResNet-20 has 272k parameters, theirs 270k).
  """

  def __init__(self, *, num_classes: int, in_channels: int = 3, depth: int = 20,
               width: int = 16, rngs: nnx.Rngs):
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f"ResNet `depth` must be 6n+2 with n >= 1 (8, 20, 56, ...); got {depth}.")
    n = (depth - 2) // 6
    self.stem = nnx.Conv(in_channels, width, (3, 3), padding=1, use_bias=False, rngs=rngs)
    self.stem_bn = batch_norm(width, rngs=rngs)
    blocks, cin = [], width
    for stage, mult in enumerate((1, 2, 4)):
      for i in range(n):
        stride = 2 if (stage > 0 and i == 0) else 1
        blocks.append(BasicBlock(cin, width * mult, stride, rngs=rngs))
        cin = width * mult
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x, *, train: bool = False):
    x = nnx.relu(self.stem_bn(self.stem(x), use_running_average=not train))
    for block in self.blocks:
      x = block(x, train=train)
    return self.head(jnp.mean(x, axis=(1, 2)))


# -----------------------------------------------------------------------------
# Attention shared by ViT and Llama
# -----------------------------------------------------------------------------


def rotary(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), Llama's rotate-half convention.

  ``x`` has shape ``(B, T, heads, head_dim)`` with an even ``head_dim``.
  """
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[:, None].astype(jnp.float32) * freqs[None, :]  # (T, half)
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention (no biases); optional rotary embeddings and causal mask."""

  def __init__(self, dim: int, heads: int, *, use_bias: bool, rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f"model width {dim} is not divisible by the {heads} heads.")
    self.heads, self.head_dim = heads, dim // heads
    lin = lambda: nnx.Linear(dim, dim, use_bias=use_bias, rngs=rngs)
    self.q, self.k, self.v, self.o = lin(), lin(), lin(), lin()

  def __call__(self, x, *, causal: bool = False, rope: bool = False):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, self.head_dim)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    if rope:
      pos = jnp.arange(t)
      q, k = rotary(q, pos), rotary(k, pos)
    y = attention(q, k, v, causal=causal)
    return self.o(y.reshape(b, t, d))


# -----------------------------------------------------------------------------
# Vision Transformer
# -----------------------------------------------------------------------------

VIT_PRESETS = {
    "toy": dict(dim=16, depth=1, heads=2, mlp_dim=32),
    "mini": dict(dim=64, depth=4, heads=4, mlp_dim=128),
    "vit-ti": dict(dim=192, depth=12, heads=3, mlp_dim=768),
    "vit-s": dict(dim=384, depth=12, heads=6, mlp_dim=1536),
}


class ViTBlock(nnx.Module):
  def __init__(self, dim: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = Attention(dim, heads, use_bias=True, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class ViT(nnx.Module):
  """Vision Transformer: patch embedding, class token, learned positions, pre-norm blocks."""

  def __init__(self, *, num_classes: int, image_size: int, in_channels: int = 3,
               patch_size: int = 4, dim: int = 64, depth: int = 4, heads: int = 4,
               mlp_dim: int = 128, rngs: nnx.Rngs):
    if image_size % patch_size:
      raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}.")
    n = (image_size // patch_size) ** 2
    self.patch = nnx.Conv(in_channels, dim, (patch_size, patch_size), strides=patch_size,
                          padding="VALID", rngs=rngs)
    self.cls = nnx.Param(jnp.zeros((1, 1, dim)))
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, n + 1, dim)))
    self.blocks = nnx.List([ViTBlock(dim, heads, mlp_dim, rngs=rngs) for _ in range(depth)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, x, *, train: bool = False):
    del train  # no BatchNorm or dropout
    x = self.patch(x)
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])
    cls = jnp.broadcast_to(self.cls[...], (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos[...]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x)[:, 0])


# -----------------------------------------------------------------------------
# Llama
# -----------------------------------------------------------------------------

LLAMA_PRESETS = {
    "toy": dict(dim=16, depth=1, heads=2),
    "mini": dict(dim=128, depth=4, heads=4),
    "small": dict(dim=256, depth=6, heads=8),
    "60m": dict(dim=512, depth=8, heads=8, ffn_dim=1376),
    "130m": dict(dim=768, depth=12, heads=12, ffn_dim=2048),
}


def swiglu_hidden(dim: int, multiple_of: int = 32) -> int:
  """Llama's SwiGLU width: 8/3 of ``dim`` rounded up (512 -> 1376)."""
  return multiple_of * math.ceil(int(8 * dim / 3) / multiple_of)


class LlamaBlock(nnx.Module):
  def __init__(self, dim: int, heads: int, ffn_dim: int, *, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(dim, epsilon=1e-6, rngs=rngs)
    self.attn = Attention(dim, heads, use_bias=False, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(dim, epsilon=1e-6, rngs=rngs)
    self.gate = nnx.Linear(dim, ffn_dim, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(dim, ffn_dim, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(ffn_dim, dim, use_bias=False, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.attn_norm(x), causal=True, rope=True)
    h = self.mlp_norm(x)
    return x + self.down(nnx.silu(self.gate(h)) * self.up(h))


class Llama(nnx.Module):
  """Llama-style decoder-only language model returning next-token logits ``(B, T, V)``."""

  def __init__(self, *, vocab_size: int, dim: int = 128, depth: int = 4, heads: int = 4,
               ffn_dim: int | None = None, tie_embeddings: bool = False, rngs: nnx.Rngs):
    ffn_dim = ffn_dim or swiglu_hidden(dim)
    self.embed = nnx.Embed(vocab_size, dim, embedding_init=nnx.initializers.normal(0.02),
                           promote_dtype=keep_dtypes, rngs=rngs)
    self.blocks = nnx.List([LlamaBlock(dim, heads, ffn_dim, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.RMSNorm(dim, epsilon=1e-6, rngs=rngs)
    self.lm_head = None if tie_embeddings else nnx.Linear(dim, vocab_size, use_bias=False,
                                                          rngs=rngs)

  def __call__(self, tokens, *, train: bool = False):
    del train  # no BatchNorm or dropout
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    return self.embed.attend(x) if self.lm_head is None else self.lm_head(x)


# -----------------------------------------------------------------------------
# MLP (flattened images)
# -----------------------------------------------------------------------------

MLP_PRESETS = {
    "toy": dict(depth=1, width=16),
    "small": dict(depth=2, width=128),
    "base": dict(depth=2, width=512),
}


class MLP(nnx.Module):
  """``depth`` hidden ReLU layers of ``width`` units over the flattened image."""

  def __init__(self, num_classes: int, in_features: int, *, depth: int = 2, width: int = 128,
               rngs: nnx.Rngs):
    sizes = [in_features] + [width] * depth
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:], strict=True)])
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # no BatchNorm or dropout
    h = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      h = jax.nn.relu(layer(h))
    return self.head(h)


# -----------------------------------------------------------------------------
# Construction from presets
# -----------------------------------------------------------------------------

# The size presets of each example's model.
PRESETS = {"resnet": RESNET_PRESETS, "vit": VIT_PRESETS, "llama": LLAMA_PRESETS,
           "mlp": MLP_PRESETS}


@dataclasses.dataclass
class ModelSpec:
  """What the training loop needs to know about a built model."""

  model: nnx.Module
  kind: str  # "resnet" | "vit" | "llama"
  config: dict

  @property
  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(self.model, nnx.Param)))


_INIT_CACHE: dict = {}


def create(make: Callable[[], nnx.Module], cache_key=None) -> nnx.Module:
  """Builds ``make()`` with all its initialisers compiled as one XLA program.

  Initialising eagerly compiles one small program per parameter shape, which
  takes tens of seconds for a ResNet on a small CPU; one jitted program
  (compiled without backend optimisations: it runs once) takes a few. With a
  ``cache_key`` the initial state is remembered, so building the same model
  again in this process is free (the arrays are immutable and shared).
  """
  if cache_key is None or cache_key not in _INIT_CACHE:
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.split(make())[1],
                    compiler_options={"xla_backend_optimization_level": 0})()
    if cache_key is None:
      return nnx.merge(graphdef, state)
    if len(_INIT_CACHE) >= 8:
      _INIT_CACHE.pop(next(iter(_INIT_CACHE)))
    _INIT_CACHE[cache_key] = (graphdef, state)
  graphdef, state = _INIT_CACHE[cache_key]
  return nnx.merge(graphdef, state, copy=True)


def _merge(presets: dict, preset: str, overrides: dict) -> dict:
  if preset not in presets:
    raise ValueError(f"unknown size preset {preset!r}; choose from {sorted(presets)}.")
  cfg = dict(presets[preset])
  cfg.update({k: v for k, v in overrides.items() if v is not None})
  return cfg


def build_resnet(preset: str, *, num_classes: int, in_channels: int, seed: int = 0,
                 **overrides) -> ModelSpec:
  cfg = _merge(RESNET_PRESETS, preset, overrides)
  model = create(lambda: ResNet(num_classes=num_classes, in_channels=in_channels,
                               rngs=nnx.Rngs(seed), **cfg),
                 ("resnet", num_classes, in_channels, seed, tuple(sorted(cfg.items()))))
  return ModelSpec(model, "resnet", cfg)


def build_vit(preset: str, *, num_classes: int, image_size: int, in_channels: int,
              seed: int = 0, **overrides) -> ModelSpec:
  cfg = _merge(VIT_PRESETS, preset, overrides)
  if cfg.get("patch_size") is None:
    cfg["patch_size"] = 2 if image_size <= 16 else 4
  model = create(lambda: ViT(num_classes=num_classes, image_size=image_size,
                             in_channels=in_channels, rngs=nnx.Rngs(seed), **cfg),
                 ("vit", num_classes, image_size, in_channels, seed, tuple(sorted(cfg.items()))))
  return ModelSpec(model, "vit", cfg)


def build_mlp(preset: str, *, num_classes: int, in_features: int, seed: int = 0,
              **overrides) -> ModelSpec:
  cfg = _merge(MLP_PRESETS, preset, overrides)
  model = create(lambda: MLP(num_classes, in_features, rngs=nnx.Rngs(seed), **cfg),
                 ("mlp", num_classes, in_features, seed, tuple(sorted(cfg.items()))))
  return ModelSpec(model, "mlp", cfg)


def build_llama(preset: str, *, vocab_size: int, seed: int = 0, **overrides) -> ModelSpec:
  cfg = _merge(LLAMA_PRESETS, preset, overrides)
  model = create(lambda: Llama(vocab_size=vocab_size, rngs=nnx.Rngs(seed), **cfg),
                 ("llama", vocab_size, seed, tuple(sorted(cfg.items()))))
  return ModelSpec(model, "llama", cfg)
