"""Lookups of how an array is sharded, as seen at trace time.

JAX records the sharding of an array in its type (``jax.typeof(x).sharding``)
when the array is explicitly sharded over a mesh (``jax.sharding.AxisType.Explicit``,
the default axis type of ``jax.make_mesh`` in recent JAX) and, inside
``jax.shard_map``, the mesh of the mapped axes. Under GSPMD (``jax.jit`` over
arrays placed with ``Auto`` axes) the type carries no partition spec: the
compiler places the values. The optimizers use these helpers to keep reductions
(histograms, norms) local to each shard and to ask for the output sharding
where explicit mode needs one.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from ire_optax._src import sharding
  >>> sharding.explicit_mesh(jnp.zeros(3)) is None
  True
"""

from __future__ import annotations

from typing import Any

import jax


def mesh(x: Any) -> Any:
  """The mesh in the type of ``x``: ``None`` or an empty mesh for an unsharded array.

  Inside ``jax.shard_map`` this is the (abstract) mesh of the mapped axes.
  """
  return getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)


def is_on_one_device(x: Any) -> bool:
  """Whether the type of ``x`` says it lives on one device (no mesh, or a mesh of size 1)."""
  m = mesh(x)
  return m is None or m.empty or m.size == 1


def explicit_mesh(x: Any) -> Any:
  """The mesh ``x`` is explicitly sharded over (some axis of its spec is set), else ``None``.

  Returns ``None`` for an unsharded array, a replicated one, and under GSPMD
  (where the type records no partition spec).
  """
  m = mesh(x)
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None) or ()
  if m is not None and not m.empty and any(a is not None for a in spec):
    return m
  return None


def spec_axes(x: Any, dims: slice = slice(None)) -> frozenset:
  """The mesh axis names in the explicit partition spec of ``x`` (over the ``dims`` of the spec).

  Empty for an unsharded or replicated array, and under GSPMD.
  """
  if explicit_mesh(x) is None:
    return frozenset()
  axes: set = set()
  for entry in tuple(spec(x))[dims]:
    axes.update(entry if isinstance(entry, tuple) else (entry,))
  return frozenset(axes - {None})


def replicated(m: Any) -> jax.sharding.NamedSharding:
  """A ``NamedSharding`` over mesh ``m`` that replicates the value on every device."""
  return jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec())


def spec(x: Any) -> Any:
  """The ``PartitionSpec`` in the type of ``x`` (``None`` when the type records none)."""
  return getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)


def explicit_sharding(x: Any) -> Any:
  """The sharding of ``x`` if its mesh has ``AxisType.Explicit`` axes, else ``None``.

  Only then does JAX need (and accept) :func:`jax.sharding.reshard` and
  ``out_sharding=`` arguments; under GSPMD the compiler places the values.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  explicit = getattr(jax.sharding.AxisType, "Explicit", None)
  axis_types = getattr(getattr(sharding, "mesh", None), "axis_types", ())
  if explicit is None or not any(t == explicit for t in axis_types):
    return None
  return sharding


def reshard(x: Any, partition_spec: Any) -> Any:
  """``jax.sharding.reshard(x, partition_spec)`` for explicit-mode arrays; identity otherwise."""
  return x if explicit_sharding(x) is None else jax.sharding.reshard(x, partition_spec)


def reshard_like(x: Any, like: Any) -> Any:
  """``x`` resharded to the explicit sharding of ``like`` where the two differ; else ``x``."""
  want = explicit_sharding(like)
  if want is None or explicit_sharding(x) is None or jax.typeof(x).sharding == want:
    return x
  return jax.sharding.reshard(x, want)
