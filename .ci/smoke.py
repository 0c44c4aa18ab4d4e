"""Smoke test of an *installed* ire_optax (CI runs it in a fresh venv, outside the checkout).

Imports the package, checks that it is not the source tree and that ``py.typed`` is
shipped, then builds every optimizer and runs one jitted update of each.
"""

from __future__ import annotations

import importlib.resources
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax

import ire_optax
import ire_optax.sharpness as sh

here = pathlib.Path(__file__).resolve().parents[1]
location = pathlib.Path(ire_optax.__file__).resolve()
assert here not in location.parents, f"imported the checkout, not the install: {location}"
assert importlib.resources.files("ire_optax").joinpath("py.typed").is_file(), "py.typed missing"

# The default selection is pure XLA: nothing built or loaded, no custom call. The opt-in
# native CPU kernel's source ships with the package, builds where a compiler is, and
# matches a sort.
from ire_optax._src import native, selection  # noqa: E402

assert native._SOURCE.is_file(), f"{native._SOURCE} missing"
x = jnp.asarray([3.0, -0.0, 1.0, 2.0, float("nan")])
assert "ire_optax_" not in jax.jit(lambda t: selection.kth_smallest(t, 3)).lower(x).as_text()
assert float(selection.kth_smallest(x, 3)) == 2.0
assert native._state == {}, "the default selection built or loaded the native kernel"
if native._compiler() is not None:
  kth = jax.jit(lambda t: selection.kth_smallest(t, 3, method="native"))
  assert "ire_optax_select" in kth.lower(x).as_text()
  assert native._state == {"ok": True}, "the native CPU kernel did not build"
  assert float(kth(x)) == 2.0
  # Large enough for the sample-bracketed pass, with the compiler flags of this machine.
  big = jax.random.normal(jax.random.key(0), (300_001,))
  tau = jnp.sort(big)[int(0.6 * big.size) - 1]
  for method in ("native", "auto"):
    mask = ire_optax.flat_mask({"w": big}, 0.6, method=method)["w"]
    assert bool(jnp.all(mask == (big <= tau))), f"{method} selection differs from a sort"


def loss(p, batch):
  return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)


params = {"w": jnp.ones((3, 2)) * 0.1, "b": jnp.zeros(2)}
batch = {"x": jnp.ones((4, 3)), "y": jnp.ones((4, 2))}
grad_fn = lambda p: jax.grad(loss)(p, batch)  # noqa: E731
logits_fn = lambda p: batch["x"] @ p["w"] + p["b"]  # noqa: E731
sgd = lambda: optax.sgd(0.1, momentum=0.9)  # noqa: E731

optimizers = {
    "ire grad_sq": ire_optax.ire(optax.adamw(1e-2)),
    "ire fisher": ire_optax.ire(optax.adamw(1e-2), curvature="fisher"),
    "ire hutchinson": ire_optax.ire(optax.adamw(1e-2), curvature="hutchinson"),
    "sam": ire_optax.sam(sgd(), rho=0.05),
    "asam": ire_optax.sam(sgd(), rho=1.0, adaptive=True),
    "sala": ire_optax.sala(sgd()),
    "sam-ire": ire_optax.ire(ire_optax.sam(sgd()), kappa=2.0, gamma=0.8),
}
for name, tx in optimizers.items():
  step = jax.jit(lambda p, s, tx=tx: tx.update(grad_fn(p), s, p, grad_fn=grad_fn,
                                               logits_fn=logits_fn))
  updates, state = step(params, tx.init(params))
  assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates)), name

tx = ire_optax.msam(sgd(), rho=0.05, num_microbatches=2)
step = jax.jit(lambda p, s: tx.update(None, s, p, grad_fn=jax.grad(loss), batch=batch))
updates, _ = step(params, tx.init(params))
assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates)), "msam"

report = sh.summary(loss, params, batch, key=jax.random.key(0), num_iters=4, num_samples=2)
assert all(bool(jnp.isfinite(v)) for k, v in report.items() if k != "trace_se"), report

print(f"ire_optax {ire_optax.__version__} from {location.parent} (python {sys.version.split()[0]},"
      f" jax {jax.__version__}, optax {optax.__version__}): {len(optimizers) + 3} checks passed")
