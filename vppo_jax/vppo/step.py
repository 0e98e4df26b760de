"""The VPPO update as ONE compiled function: perturb, dependency, TAS, TGF, loss, optimizer.

    state, metrics = train_step(state, batch, key)      # jax.jit, state donated

A `TrainBatch` holds M micro-batches stacked on a leading axis (M = 1 without gradient
accumulation). Old log-probs and token dependency must come from the policy that sampled
the rollouts (paper Definition 3.1). Two ways to get them:

* in-pass (first update on a rollout batch, so pi_theta = pi_old; M = 1 for VPPO): leave
  `old_logp`/`dependency` as None. The step runs the policy forward with gradient on the
  original images, takes pi_old = stop_gradient(pi_theta) from it, and adds ONE
  no-gradient forward on the perturbed images. This is the cheapest VPPO step: GRPO's
  forward + backward plus one forward.
* precomputed: when one rollout batch feeds several optimizer steps (the reference splits
  384 prompts into 3 steps of 128) or with gradient accumulation, call `score_rollouts`
  once per rollout batch with the rollout policy and pass its outputs in the batch.

With `vppo=False` the step is exactly the GRPO/DAPO baseline and traces no perturbed forward.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vppo_jax.parallel import sharding
from vppo_jax.models.qwen2_5_vl.inputs import ModelInputs
from vppo_jax.vppo import dependency as dependency_lib
from vppo_jax.vppo import perturbation, shaping
from vppo_jax.vppo.loss import LossConfig, LossCounts, loss_counts, loss_sums, total_loss


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything the compiled step needs to know statically (spec defaults)."""

    vppo: bool = True  # False: the GRPO/DAPO baseline, no perturbed forward
    group_size: int = 8
    perturbation: str = "blacken"  # "blacken" | "blacken_pixels" (host, the reference's geometry) | "noise" | "gray"
    blacken_prob: float = 0.5
    estimator: str = "k3"  # "k3" | "kl" | "jsd" | "top1_drop"
    tas: bool = True
    tas_mode: str = "dynamic"  # "dynamic" | "static"
    beta_min: float = 0.9
    beta_max: float | None = None  # static mode only
    tas_scope: str = "global"  # "global" | "per_group"
    tgf: bool = True
    tgf_mode: str = "dependency"  # "dependency" | "entropy" | "random" | "soft"
    tgf_k: float = 0.4
    temperature: float = 1.0
    vocab_chunk: int = 128  # tokens per chunk when projecting onto the vocabulary
    loss: LossConfig = LossConfig()

    def __post_init__(self):
        choices = {
            "perturbation": ("blacken", "blacken_pixels", "noise", "gray"),
            "estimator": tuple(dependency_lib.ESTIMATORS),
            "tas_mode": ("dynamic", "static"),
            "tas_scope": ("global", "per_group"),
            "tgf_mode": ("dependency", "entropy", "random", "soft"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {allowed}.")
        if self.tas_mode == "static" and self.beta_max is None:
            raise ValueError("tas_mode='static' needs beta_max (the paper's ablations use 1.1 or 1.2).")


@flax.struct.dataclass
class TrainBatch:
    """Rollouts ready for the update; every leaf has a leading micro-batch axis M.

    Position t of a row predicts token t + 1: `targets[t]` is that token and
    `response_mask[t]` says whether it is a response token (the loss covers only those).
    Rows are ordered by group: rows g*G .. g*G+G-1 share a prompt.
    """

    inputs: ModelInputs  # (M, b, T) token arrays, images in the slot layout per micro-batch
    targets: jax.Array  # (M, b, T) int32
    response_mask: jax.Array  # (M, b, T) bool
    advantages: jax.Array  # (M, b) GRPO advantages
    old_logp: jax.Array | None = None  # (M, b, T) from score_rollouts, or None (in-pass)
    dependency: jax.Array | None = None  # (M, b, T) from score_rollouts, or None (in-pass)
    old_entropy: jax.Array | None = None  # (M, b, T) for entropy-based TGF
    perturbed_patches: jax.Array | None = None  # (M, S, patch_dim) images I' made on the host ("blacken_pixels")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the model's parameters
    opt_state: Any
    skipped_steps: jax.Array


def init_state(model: nnx.Module, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """The state takes the model's parameter arrays as they are (no copy): once a step has
    consumed (donated) the state, the model object must not be used again."""
    graphdef, params = nnx.split(model, nnx.Param)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
        skipped_steps=jnp.zeros((), jnp.int32),
    )
    return graphdef, state


def init_sharded_state(model: nnx.Module, optimizer: optax.GradientTransformation, mesh) -> tuple[nnx.GraphDef, TrainState]:
    """`init_state` on `mesh`: the parameters placed by the sharding rules (from wherever the
    model holds them, e.g. host memory), the optimizer state created already sharded on the
    devices (never whole on one device). The model must not be used afterwards."""
    graphdef, params = nnx.split(model, nnx.Param)
    params_shardings = sharding.param_shardings(mesh, params)
    params = sharding.put(params, params_shardings)
    make = lambda p: init_state(nnx.merge(graphdef, p), optimizer)[1]
    state_shardings = sharding.train_state_shardings(mesh, optimizer, jax.eval_shape(make, params))
    return graphdef, jax.jit(make, in_shardings=(params_shardings,), out_shardings=state_shardings,
                             donate_argnums=0)(params)


def perturb_images(config: StepConfig, inputs: ModelInputs, key: jax.Array, perturbed_patches=None) -> ModelInputs:
    """The perturbed images I', in patch space; an independent draw per patch slot,
    hence per rollout (each rollout's image occupies its own slots). "blacken_pixels" takes
    the ones the host made (`TrainBatch.perturbed_patches`)."""
    vision = inputs.vision
    if config.perturbation == "blacken_pixels":
        if perturbed_patches is None:
            raise ValueError("perturbation='blacken_pixels' blackens the images on the host: build the batch with "
                             "build_train_batch(perturbed_pixel_values=...).")
        patches = perturbed_patches
    elif config.perturbation == "blacken":
        patches = perturbation.blacken_patches(vision.patches, vision.slot_valid, key, config.blacken_prob)
    elif config.perturbation == "noise":
        patches = perturbation.gaussian_noise(vision.patches, vision.slot_valid, key)
    else:
        patches = perturbation.gray_mask(vision.patches, vision.slot_valid)
    return inputs.replace(vision=vision.replace(patches=patches))


def _token_scores(config: StepConfig, model, inputs, perturbed_patches, targets, response_mask, hidden, key):
    """Token dependency of the rollout policy: KL-type divergence between I and I'."""
    perturbed = perturb_images(config, inputs, key, perturbed_patches)
    hidden_perturbed = jax.lax.stop_gradient(model.hidden_states(perturbed))
    return dependency_lib.token_dependency(
        config.estimator, jax.lax.stop_gradient(hidden), hidden_perturbed, model.unembedding(), targets,
        response_mask, config.temperature, config.vocab_chunk,
    )


def score_rollouts(config: StepConfig, graphdef, params, batch: TrainBatch, key: jax.Array) -> TrainBatch:
    """Fills old_logp, old_entropy and dependency with the given (rollout) policy, no gradient."""
    model = nnx.merge(graphdef, params)

    def score(micro):
        inputs, perturbed_patches, targets, mask, micro_key = micro
        hidden = model.hidden_states(inputs)
        logp, entropy = dependency_lib.token_logprobs_and_entropy(
            hidden, model.unembedding(), targets, config.temperature, config.vocab_chunk
        )
        if config.vppo:
            dep = _token_scores(config, model, inputs, perturbed_patches, targets, mask, hidden, micro_key)
        else:
            dep = jnp.zeros_like(logp)
        return logp, entropy, dep

    keys = jax.random.split(key, batch.targets.shape[0])
    logp, entropy, dep = jax.lax.map(
        score, (batch.inputs, batch.perturbed_patches, batch.targets, batch.response_mask, keys))
    return batch.replace(old_logp=logp, old_entropy=entropy, dependency=dep)


def _shaping(config: StepConfig, dependency, old_entropy, response_mask, key):
    """TAS alpha (M, b) and TGF weights (M, b, T) over the whole batch (all micro-batches)."""
    micro, rows, length = response_mask.shape
    flat = lambda a: a.reshape(micro * rows, *a.shape[2:])
    mask = flat(response_mask)
    valid = mask.any(axis=-1)  # empty responses take no part in min/max (reference)
    if config.vppo and config.tas:
        trajectory = shaping.trajectory_dependency(flat(dependency), mask)
        alpha = shaping.advantage_scale(
            trajectory, valid, config.tas_mode, config.beta_min, config.beta_max, config.tas_scope,
            config.group_size,
        )
    else:
        alpha = jnp.ones((micro * rows,), jnp.float32)
    if config.vppo and config.tgf:
        weights = shaping.token_filter(
            config.tgf_mode, mask, config.tgf_k, flat(dependency),
            None if old_entropy is None else flat(old_entropy), key,
        )
    else:
        weights = mask.astype(jnp.float32)
    return alpha.reshape(micro, rows), weights.reshape(micro, rows, length)


def _dependency_metrics(dependency, response_mask) -> dict[str, jax.Array]:
    mask = response_mask.astype(bool)
    values = jnp.where(mask, dependency, jnp.nan)
    lengths = jnp.maximum(mask.sum(-1), 1)
    trajectory = jnp.where(mask.any(-1), jnp.where(mask, dependency, 0.0).sum(-1) / lengths, jnp.nan)
    return {
        "dependency/token_mean": jnp.nanmean(values),
        "dependency/token_p50": jnp.nanquantile(values, 0.5),
        "dependency/token_p90": jnp.nanquantile(values, 0.9),
        "dependency/token_max": jnp.nanmax(values),
        "dependency/trajectory_mean": jnp.nanmean(trajectory),
    }


def train_step(config: StepConfig, optimizer: optax.GradientTransformation, graphdef,
               state: TrainState, batch: TrainBatch, key: jax.Array) -> tuple[TrainState, dict]:
    """One optimizer update; see the module docstring. Jit with config, optimizer and
    graphdef static and `state` donated (`make_train_step` does both)."""
    in_pass = batch.old_logp is None  # pi_old statistics from this step's own forward
    if in_pass and config.vppo and batch.targets.shape[0] > 1:
        # TAS and TGF need every micro-batch's dependency before the first gradient.
        raise ValueError("Gradient accumulation with VPPO needs precomputed scores: call score_rollouts first.")
    perturb_key, filter_key = jax.random.split(key)
    counts = LossCounts(*loss_counts(batch.response_mask, config.loss.aggregation))

    def micro_loss(params, micro: TrainBatch, alpha_m, weights_m):
        """Loss of one micro-batch, its sums divided by the whole batch's counts (exact
        accumulation). Returns the per-token statistics the metrics need as auxiliaries."""
        model = nnx.merge(graphdef, params)
        hidden = model.hidden_states(micro.inputs)
        logp, entropy = dependency_lib.token_logprobs_and_entropy(
            hidden, model.unembedding(), micro.targets, config.temperature, config.vocab_chunk
        )
        old_logp, dep = micro.old_logp, micro.dependency
        if in_pass:
            old_logp = jax.lax.stop_gradient(logp)
            if config.vppo:
                dep = _token_scores(config, model, micro.inputs, micro.perturbed_patches, micro.targets,
                                    micro.response_mask, hidden, perturb_key)
            alpha_m, weights_m = jax.tree.map(
                lambda a: a[0],
                _shaping(config, None if dep is None else dep[None], jax.lax.stop_gradient(entropy)[None],
                         micro.response_mask[None], filter_key),
            )
        sums, metric_sums = loss_sums(
            logp, old_logp, micro.advantages, micro.response_mask, alpha_m, weights_m, None, config.loss
        )
        per_token = {"entropy": entropy, "alpha": alpha_m, "weights": weights_m, "dependency": dep}
        return total_loss(sums, counts, config.loss), (sums, metric_sums, jax.lax.stop_gradient(per_token))

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    alpha = weights = None
    if not in_pass:
        alpha, weights = _shaping(config, batch.dependency, batch.old_entropy, batch.response_mask, filter_key)

    def accumulate(grads_sum, xs):
        (loss_m, aux_m), grads_m = grad_fn(state.params, *xs)
        return jax.tree.map(lambda total, g: total + g.astype(jnp.float32), grads_sum, grads_m), (loss_m, aux_m)

    # Gradients add up in fp32 whatever the parameters' dtype.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    grads, (losses, (sums, metric_sums, per_token)) = jax.lax.scan(accumulate, zeros, (batch, alpha, weights))
    loss = losses.sum()
    sums, metric_sums = jax.tree.map(lambda a: a.sum(0), (sums, metric_sums))

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient skips the update: parameters and optimizer state stay.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
    )
    metrics = _step_metrics(config, loss, sums, metric_sums, counts, grad_norm, finite, per_token, batch.response_mask)
    return new_state, metrics


def _step_metrics(config, loss, sums, metric_sums, counts, grad_norm, finite, per_token, response_mask):
    tokens = jnp.maximum(counts.tokens, 1.0)
    alpha, weights, entropy = per_token["alpha"], per_token["weights"], per_token["entropy"]
    mask = response_mask.astype(jnp.float32)
    valid_rows = response_mask.any(-1)
    metrics = {name: value / tokens for name, value in metric_sums.items()}
    metrics |= {
        "loss": loss,
        "pg_loss": sums.policy / jnp.maximum(counts.policy, 1.0),
        "entropy_loss": sums.entropy / tokens,
        "entropy": (entropy * mask).sum() / tokens,
        "grad_norm": grad_norm,
        "skipped": (~finite).astype(jnp.float32),
        "response_tokens": counts.tokens,
        "tgf/selected_fraction": (weights * mask).sum() / tokens,
        "tas/alpha_mean": jnp.where(valid_rows, alpha, 0.0).sum() / jnp.maximum(valid_rows.sum(), 1),
        "tas/alpha_min": jnp.min(jnp.where(valid_rows, alpha, jnp.inf)),
        "tas/alpha_max": jnp.max(jnp.where(valid_rows, alpha, -jnp.inf)),
    }
    if config.vppo:
        metrics |= _dependency_metrics(per_token["dependency"], response_mask)
    return metrics


def jit_train_step(config: StepConfig, optimizer: optax.GradientTransformation, graphdef, mesh,
                   state_shardings, batch_shardings):
    """train_step compiled for `mesh` with explicit shardings (what `plan` lowers too). The
    state's buffers are donated (reused in place): params and optimizer state are never held twice."""
    step = sharding.under_mesh(mesh, lambda state, batch, key: train_step(config, optimizer, graphdef, state,
                                                                          batch, key))
    replicated = sharding.replicated(mesh)
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def jit_score_rollouts(config: StepConfig, graphdef, mesh, params_shardings, batch_shardings, scored_shardings):
    score = sharding.under_mesh(mesh, lambda params, batch, key: score_rollouts(config, graphdef, params, batch,
                                                                              key))
    return jax.jit(score, in_shardings=(params_shardings, batch_shardings, sharding.replicated(mesh)),
                   out_shardings=scored_shardings)


def scored_like(batch: TrainBatch) -> TrainBatch:
    """The shapes score_rollouts returns for `batch` (ShapeDtypeStructs)."""
    scores = jax.ShapeDtypeStruct(batch.targets.shape, jnp.float32)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch).replace(
        old_logp=scores, old_entropy=scores, dependency=scores)


def make_train_step(config: StepConfig, optimizer: optax.GradientTransformation, graphdef, mesh=None):
    """`step(state, batch, key) -> (state, metrics)` on `mesh` (default: one device): the state
    and the batch (NumPy or placed) are placed by the sharding rules, the compiled step is
    cached per batch structure, metrics come back replicated, the state is donated."""
    mesh = sharding.mesh_or_default(mesh)
    compiled = {}

    def run(state: TrainState, batch: TrainBatch, key: jax.Array):
        signature = (jax.tree.structure(state), jax.tree.structure(batch))
        if signature not in compiled:
            sharding.check_rows(batch.targets.shape[1], mesh, "train batch (rows per micro-batch)")
            state_shardings = sharding.train_state_shardings(mesh, optimizer, state)
            batch_shardings = sharding.inputs_shardings(mesh, batch, leading=1)
            compiled[signature] = (state_shardings, batch_shardings, jit_train_step(
                config, optimizer, graphdef, mesh, state_shardings, batch_shardings))
        state_shardings, batch_shardings, step = compiled[signature]
        return step(sharding.put(state, state_shardings), sharding.put(batch, batch_shardings),
                    sharding.put(key, sharding.replicated(mesh)))

    return run


def make_score_rollouts(config: StepConfig, graphdef, mesh=None):
    """`score(params, batch, key) -> batch` with old_logp, old_entropy and dependency filled, on `mesh`."""
    mesh = sharding.mesh_or_default(mesh)
    compiled = {}

    def run(params, batch: TrainBatch, key: jax.Array):
        signature = (jax.tree.structure(params), jax.tree.structure(batch))
        if signature not in compiled:
            sharding.check_rows(batch.targets.shape[1], mesh, "train batch (rows per micro-batch)")
            params_shardings = sharding.param_shardings(mesh, params)
            batch_shardings = sharding.inputs_shardings(mesh, batch, leading=1)
            scored_shardings = sharding.inputs_shardings(mesh, scored_like(batch), leading=1)
            compiled[signature] = (params_shardings, batch_shardings, jit_score_rollouts(
                config, graphdef, mesh, params_shardings, batch_shardings, scored_shardings))
        params_shardings, batch_shardings, score = compiled[signature]
        return score(sharding.put(params, params_shardings), sharding.put(batch, batch_shardings),
                     sharding.put(key, sharding.replicated(mesh)))

    return run
