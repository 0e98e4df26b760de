"""Comparing two ways of computing one update: the parameter change each makes."""

import jax
import jax.numpy as jnp
import numpy as np


def parameter_changes(train_step, state, batches) -> list:
    """(parameter change, metrics) of one step from `state` on each batch (the same key): with
    SGD at rate 1 the change is -gradient."""
    before = jax.tree.map(np.asarray, state.params)
    copy = lambda s: jax.tree.map(jnp.array, s)
    changes = []
    for batch in batches:
        new_state, metrics = train_step(copy(state), batch, jax.random.key(4))
        changes.append((jax.tree.map(lambda a, b: np.asarray(a) - b, new_state.params, before), metrics))
    return changes


def assert_same_update(one, other):
    """Two parameter changes equal within 1e-5, the first one large enough to mean something."""
    assert max(np.abs(g).max() for g in jax.tree.leaves(one)) > 1e-3
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(other)):
        np.testing.assert_allclose(a, b, atol=1e-5)
