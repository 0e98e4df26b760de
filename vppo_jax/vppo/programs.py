"""The update and the rollout scoring compiled for a mesh (vppo_jax/parallel/compile.py).

    train_step = make_train_step(step_config, optimizer, graphdef, mesh)
    state, metrics = train_step(state, batch, key)     # state donated, metrics replicated
    score = make_score_rollouts(step_config, graphdef, mesh)
    batch = score(params, batch, key)                  # old_logp, old_entropy, dependency filled
    batch = score(params, batch, key, ref_params)      # and ref_logp (a KL to the reference)

The state and the batch (NumPy or placed) are placed by the sharding rules; one compile per
batch signature. The planner lowers the same programs (`train_step_program`,
`score_program`) on abstract arguments.
"""

from __future__ import annotations

import functools

import jax
import optax

from vppo_jax.parallel import sharding
from vppo_jax.parallel.compile import Program, ProgramCache
from vppo_jax.vppo.batch import TrainBatch, TrainState, batch_shardings, scored_like, train_state_shardings
from vppo_jax.vppo.step import StepConfig, score_rollouts, train_step


def train_step_program(
    config: StepConfig,
    optimizer: optax.GradientTransformation,
    graphdef,
    mesh,
    state: TrainState,
    batch: TrainBatch,
    key: jax.Array,
    programs: ProgramCache | None = None,
) -> Program:
    """train_step compiled for the signature of (state, batch, key) on `mesh` (arrays or
    ShapeDtypeStructs); the state's buffers
    are donated (reused in place): parameters and optimizer state are never held twice."""

    def build():
        sharding.check_rows(batch.targets.shape[1], mesh, "train batch (rows per micro-batch)")
        state_shardings = train_state_shardings(mesh, optimizer, state)
        return (
            functools.partial(train_step, config, optimizer, graphdef),
            (state_shardings, batch_shardings(mesh, batch), sharding.replicated(mesh)),
            (state_shardings, sharding.replicated(mesh)),
            (0,),
        )

    return (programs or ProgramCache()).get("train_step", mesh, (state, batch, key), build)


def score_program(
    config: StepConfig,
    graphdef,
    mesh,
    params,
    batch: TrainBatch,
    key: jax.Array,
    ref_params=None,
    programs: ProgramCache | None = None,
) -> Program:
    """score_rollouts compiled for the signature of (params, batch, key, ref_params) on `mesh`;
    the reference's parameters (or None) are sharded like the policy's."""

    def build():
        sharding.check_rows(batch.targets.shape[1], mesh, "train batch (rows per micro-batch)")
        ref_shardings = None if ref_params is None else sharding.param_shardings(mesh, ref_params)
        return (
            functools.partial(score_rollouts, config, graphdef),
            (
                sharding.param_shardings(mesh, params),
                batch_shardings(mesh, batch),
                sharding.replicated(mesh),
                ref_shardings,
            ),
            batch_shardings(mesh, scored_like(batch, ref_params is not None)),
            (),
        )

    return (programs or ProgramCache()).get("score_rollouts", mesh, (params, batch, key, ref_params), build)


def make_train_step(config: StepConfig, optimizer: optax.GradientTransformation, graphdef, mesh=None):
    """`step(state, batch, key) -> (state, metrics)` on `mesh` (default: one device)."""
    mesh, programs = sharding.mesh_or_default(mesh), ProgramCache()
    return lambda state, batch, key: train_step_program(config, optimizer, graphdef, mesh, state, batch, key, programs)(
        state, batch, key
    )


def make_score_rollouts(config: StepConfig, graphdef, mesh=None):
    """`score(params, batch, key, ref_params=None) -> batch` with old_logp, old_entropy and
    dependency filled (and ref_logp with `ref_params`), on `mesh`."""
    mesh, programs = sharding.mesh_or_default(mesh), ProgramCache()
    return lambda params, batch, key, ref_params=None: score_program(
        config, graphdef, mesh, params, batch, key, ref_params, programs
    )(params, batch, key, ref_params)
