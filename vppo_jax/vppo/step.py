"""The VPPO update as one function: scores -> shaping -> loss -> optimizer update.

    state, metrics = train_step(config, optimizer, graphdef, state, batch, key)

(compiled for a mesh by vppo_jax/vppo/programs.py). pi_old's statistics (old log-probs,
entropy, token dependency) must come from the policy that sampled the rollouts (paper
Definition 3.1; docs/algorithm.md#in-pass-and-precomputed-scores). `needs_scoring` decides
where they come from, for the trainer and the planner alike:

* in-pass (`batch.scored` False; one update per rollout batch, so pi_theta = pi_old): each
  micro-batch's forward with gradient gives pi_old = stop_gradient(pi_theta), and VPPO
  adds ONE no-gradient forward on the perturbed images. The cheapest VPPO step: GRPO's
  forward + backward plus one forward. With several micro-batches VPPO needs shaping that
  stays within one (`shaping_is_local`: TGF ranks each response's own tokens; TAS off or
  per group of whole groups), since global TAS ranks the whole batch before the first gradient.
* precomputed (`batch.scored` True): `score_rollouts` ran once per rollout batch with the
  rollout policy; the step shapes the whole batch first, then accumulates gradients.

With `vppo=False` the step is exactly the GRPO/DAPO baseline and traces no perturbed forward.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vppo_jax.vppo import dependency as dependency_lib
from vppo_jax.vppo import packing, perturbation, shaping
from vppo_jax.vppo.batch import TrainBatch, TrainState
from vppo_jax.vppo.logprobs import DEFAULT_CHUNK_SIZE, token_logprobs_and_entropy
from vppo_jax.vppo.loss import LossConfig, LossCounts, loss_counts, loss_sums, total_loss
from vppo_jax.vppo.metrics import step_metrics


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything the compiled step needs to know statically. These defaults are the paper's
    recipe and the experiment config's (vppo_jax/trainer/config.py derives its `algo`
    section from them); docs/algorithm.md explains each."""

    vppo: bool = True  # False: the GRPO/DAPO baseline, no perturbed forward
    group_size: int = 8
    perturbation: str = "blacken"  # "blacken" | "blacken_pixels" (host, the reference's geometry) | "noise" | "gray"
    blacken_prob: float = 0.5
    estimator: str = "k3"  # "k3" | "kl" | "jsd" | "top1_drop"
    tas: bool = True
    tas_mode: str = "dynamic"  # "dynamic" | "static"
    beta_min: float = shaping.DEFAULT_BETA_MIN
    beta_max: float | None = None  # static mode only
    tas_scope: str = "global"  # "global" | "per_group"
    tgf: bool = True
    tgf_mode: str = "dependency"  # "dependency" | "entropy" | "random" | "soft"
    tgf_k: float = 0.4
    temperature: float = 1.0
    vocab_chunk: int = DEFAULT_CHUNK_SIZE  # tokens per chunk when projecting onto the vocabulary
    # PPO-style KL to the reference policy in the reward: the trainer subtracts this times each
    # response's summed loss.kl_estimator(pi_old, pi_ref) from its reward before the advantages.
    kl_penalty_coef: float = 0.0
    loss: LossConfig = LossConfig()

    def __post_init__(self):
        choices = {
            "perturbation": perturbation.PERTURBATIONS,
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
        if self.vppo and self.tgf and self.loss.policy_loss == "gspo":
            # GSPO's loss is one term per response whose gradient reaches all its tokens through
            # s_i: no token has a term of its own for TGF to weight.
            raise ValueError(
                "policy_loss='gspo' has no per-token term for TGF to filter: use policy_loss='gspo_token' "
                "(GSPO's ratio, each token's own gradient) or tgf=False."
            )

    @property
    def uses_reference(self) -> bool:
        """Whether a KL to the reference policy is on (loss term or reward penalty): the scoring
        pass then also gives the reference's log-probs."""
        return bool(self.loss.kl_coef or self.kl_penalty_coef)


def shaping_is_local(config: StepConfig, rows: int, packed: bool = False) -> bool:
    """Whether VPPO's shaping of a micro-batch of `rows` consecutive rows (groups of
    group_size in a row) needs no other micro-batch: TGF ranks each response's own tokens,
    and TAS is off or scoped per group with whole groups in the micro-batch (never sure of
    packed micro-batches: a group's sequences may go to several)."""
    whole_groups = not packed and rows % config.group_size == 0
    return not config.tas or (config.tas_scope == "per_group" and whole_groups)


def needs_scoring(
    config: StepConfig, updates_per_rollout: int, micro_batches: int, rows: int, packed: bool = False
) -> bool:
    """Whether pi_old's statistics need a scoring pass before the updates of micro-batches of
    `rows` rows: a later update on the same rollouts no longer has pi_theta = pi_old, and
    global TAS needs the whole batch's dependency before the first micro-batch's gradient;
    a KL to the reference needs the reference's log-probs, which the scoring pass gives."""
    across = shaped_across(config, micro_batches, rows, packed)
    return updates_per_rollout > 1 or across or config.uses_reference


def shaped_across(config: StepConfig, micro_batches: int, rows: int, packed: bool = False) -> bool:
    """Whether VPPO's shaping of one micro-batch needs the dependency of the others."""
    return config.vppo and micro_batches > 1 and not shaping_is_local(config, rows, packed)


def extra_forwards(
    config: StepConfig, updates_per_rollout: int, micro_batches: int, rows: int, packed: bool = False
) -> tuple[int, int]:
    """Forwards of the batch a step runs besides its updates' own (vppo_jax/flops.py), as
    (with the original images, with perturbed images): the scoring pass's pi_old where one is
    needed and the reference policy's with a KL, and VPPO's perturbed forward (in the scoring
    pass or inside the update)."""
    scoring = needs_scoring(config, updates_per_rollout, micro_batches, rows, packed)
    original = int(scoring) + int(config.uses_reference)
    return original, int(config.vppo)


def response_hidden(model, micro: TrainBatch) -> jax.Array:
    """Final hidden states at the positions that predict `micro.token_targets()` (one micro-batch:
    (b, R, D) of padded rows, (K, S, D) of packed bins' response slots)."""
    if micro.packed is None:
        return model.response_hidden_states(micro.inputs, micro.targets.shape[-1], micro.prompt_group)
    hidden = model.packed_hidden_states(micro.inputs, micro.packed.tree)
    return packing.predicting_hidden(hidden, micro.packed.predicted_by)


def rows_alone_hidden(model, micro: TrainBatch, inputs) -> jax.Array:
    """`response_hidden` of `inputs` laid out as `micro.rows_alone_inputs()` (each row with its
    own prompt and images, perturbed): the same tokens in the same order."""
    if micro.packed is None:
        return model.response_hidden_states(inputs, micro.targets.shape[-1])
    twin = micro.packed.rows_alone
    return packing.predicting_hidden(model.packed_hidden_states(inputs, twin.tree), twin.predicted_by)


def token_scores(config: StepConfig, model, micro: TrainBatch, hidden, key):
    """(log p(o_t), H_t, S_t) of the micro-batch's token targets, in its inputs' layout, under the
    policy whose final hidden states (original images) are `hidden` (`response_hidden`); S_t a
    divergence between its distributions with I and I'."""
    with jax.named_scope("perturbed_forward"):
        if micro.packed is not None and config.perturbation == "blacken_pixels":
            raise ValueError(
                "perturbation='blacken_pixels' (blackened on the host) is not packed: use 'blacken' (the same "
                "Bernoulli patch blackening, drawn in the step) or train.packing=False."
            )
        # Each sample of a prompt gets its own perturbation (as in the reference).
        perturbed = perturbation.perturb_images(
            config.perturbation, micro.rows_alone_inputs(), key, config.blacken_prob, micro.perturbed_patches
        )
        hidden_perturbed = jax.lax.stop_gradient(rows_alone_hidden(model, micro, perturbed))
    with jax.named_scope("dependency"):
        return dependency_lib.scores_with_dependency(
            config.estimator,
            jax.lax.stop_gradient(hidden),
            hidden_perturbed,
            model.unembedding(),
            micro.token_targets(),
            micro.token_mask(),
            config.temperature,
            config.vocab_chunk,
        )


@jax.named_scope("scoring")
def score_rollouts(
    config: StepConfig, graphdef, params, batch: TrainBatch, key: jax.Array, ref_params=None
) -> TrainBatch:
    """Fills old_logp, old_entropy and dependency with the given (rollout) policy, and ref_logp
    with the reference policy's parameters `ref_params` when given; no gradient."""
    model = nnx.merge(graphdef, params)
    reference = None if ref_params is None else nnx.merge(graphdef, ref_params)

    def score(args):
        micro, micro_key = args
        hidden = response_hidden(model, micro)
        if config.vppo:  # one pass over the vocabulary gives the log-probs, entropy and dependency
            scores = token_scores(config, model, micro, hidden, micro_key)
        else:
            logp, entropy = token_logprobs_and_entropy(
                hidden, model.unembedding(), micro.token_targets(), config.temperature, config.vocab_chunk
            )
            scores = logp, entropy, jnp.zeros_like(logp)
        scores = tuple(map(micro.as_rows, scores))
        if reference is None:
            return scores, None
        with jax.named_scope("reference_forward"):
            ref_logp, _ = token_logprobs_and_entropy(
                response_hidden(reference, micro),
                reference.unembedding(),
                micro.token_targets(),
                config.temperature,
                config.vocab_chunk,
            )
        return scores, micro.as_rows(ref_logp)

    keys = jax.random.split(key, batch.targets.shape[0])
    (logp, entropy, dep), ref_logp = jax.lax.map(score, (batch, keys))
    return batch.replace(old_logp=logp, old_entropy=entropy, dependency=dep, ref_logp=ref_logp)


def shape_in_rollout_order(
    config: StepConfig, dependency, entropy, response_mask, key, rows=None, rollout_rows: int = 0
) -> tuple[jax.Array, jax.Array]:
    """`shape_rows` of N rows laid out as `rows` (N,) names them (packed micro-batches; -1: no
    row; None: in rollout order already). Only TAS per group ranks rows by their place (a group's
    rows one after another): for it they go in rollout order and come back."""
    if rows is None or not (config.vppo and config.tas and config.tas_scope == "per_group"):
        return shape_rows(config, dependency, entropy, response_mask, key)
    source = (
        jnp.zeros(rollout_rows, jnp.int32)
        .at[jnp.where(rows >= 0, rows, rollout_rows)]
        .set(jnp.arange(rows.shape[0], dtype=jnp.int32), mode="drop")
    )
    ordered = lambda a: None if a is None else a[source]
    alpha, weights = shape_rows(config, ordered(dependency), ordered(entropy), ordered(response_mask), key)
    back = jnp.maximum(rows, 0)  # a row that is none takes row 0's values, and has no token
    return alpha[back], weights[back]


@jax.named_scope("shaping")
def shape_rows(config: StepConfig, dependency, entropy, response_mask, key) -> tuple[jax.Array, jax.Array]:
    """TAS's advantage scale alpha (N,) and TGF's token weights (N, T) over N rows ranked
    together; ones and the response mask when VPPO (or that part of it) is off."""
    valid = response_mask.any(axis=-1)  # empty responses take no part in min/max (reference)
    if config.vppo and config.tas:
        alpha = shaping.advantage_scale(
            shaping.trajectory_dependency(dependency, response_mask),
            valid,
            config.tas_mode,
            config.beta_min,
            config.beta_max,
            config.tas_scope,
            config.group_size,
        )
    else:
        alpha = jnp.ones(response_mask.shape[:1], jnp.float32)
    if config.vppo and config.tgf:
        weights = shaping.token_filter(config.tgf_mode, response_mask, config.tgf_k, dependency, entropy, key)
    else:
        weights = response_mask.astype(jnp.float32)
    return alpha, weights


def train_step(
    config: StepConfig,
    optimizer: optax.GradientTransformation,
    graphdef,
    state: TrainState,
    batch: TrainBatch,
    key: jax.Array,
) -> tuple[TrainState, dict]:
    """One optimizer update; see the module docstring."""
    micro_batches, rows, length = batch.targets.shape
    if not batch.scored and shaped_across(config, micro_batches, rows, batch.packed is not None):
        raise ValueError(
            "Gradient accumulation with VPPO's global TAS needs precomputed scores: call score_rollouts first."
        )
    if config.loss.kl_coef and batch.ref_logp is None:
        raise ValueError(
            "loss.kl_coef needs the reference's log-probs: call score_rollouts with the reference's parameters first."
        )
    perturb_key, filter_key = jax.random.split(key)

    # Shaping of a scored batch ranks all its rows at once, before any gradient.
    shaped = None
    if batch.scored:
        flat = lambda a: None if a is None else a.reshape(micro_batches * rows, *a.shape[2:])
        alpha, weights = shape_in_rollout_order(
            config,
            flat(batch.dependency),
            flat(batch.old_entropy),
            flat(batch.response_mask),
            filter_key,
            flat(batch.rows),
            batch.rollout_rows,
        )
        shaped = alpha.reshape(micro_batches, rows), weights.reshape(micro_batches, rows, length)

    counts = LossCounts(*loss_counts(batch.response_mask, config.loss.aggregation, batch.rollout_rows or None))

    def micro_loss(params, micro: TrainBatch, shaped_micro, index):
        """Loss of micro-batch `index`, its sums divided by the whole batch's counts (exact
        accumulation), with the per-token statistics the metrics need as auxiliaries."""
        model = nnx.merge(graphdef, params, state.frozen)  # only `params` are differentiated
        with jax.named_scope("policy_forward"):
            hidden = response_hidden(model, micro)
            token_logp, token_entropy = token_logprobs_and_entropy(
                hidden, model.unembedding(), micro.token_targets(), config.temperature, config.vocab_chunk
            )
            logp, entropy = micro.as_rows(token_logp), micro.as_rows(token_entropy)
        if batch.scored:
            old_logp, dep = micro.old_logp, micro.dependency
            alpha, weights = shaped_micro
        else:  # this forward is pi_old's
            old_logp, dep = jax.lax.stop_gradient(logp), None
            # Each micro-batch draws its own perturbations and random TGF (one: the step's keys).
            own = lambda k: k if micro_batches == 1 else jax.random.fold_in(k, index)
            if config.vppo:  # the log-probs and entropy with gradient come from the forward above
                dep = micro.as_rows(token_scores(config, model, micro, hidden, own(perturb_key))[2])
            entropy_old = jax.lax.stop_gradient(entropy)
            alpha, weights = shape_in_rollout_order(
                config, dep, entropy_old, micro.response_mask, own(filter_key), micro.rows, batch.rollout_rows
            )
        with jax.named_scope("loss"):
            ref_logp = micro.ref_logp if config.loss.kl_coef else None
            sums, metric_sums = loss_sums(
                logp, old_logp, micro.advantages, micro.response_mask, alpha, weights, ref_logp, config.loss
            )
            loss = total_loss(sums, counts, config.loss)
        per_token = {"entropy": entropy, "alpha": alpha, "weights": weights, "dependency": dep}
        return loss, (sums, metric_sums, jax.lax.stop_gradient(per_token))

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(grads_sum, xs):
        (loss_m, aux_m), grads_m = grad_fn(state.params, *xs)
        return jax.tree.map(lambda total, g: total + g.astype(jnp.float32), grads_sum, grads_m), (loss_m, aux_m)

    # Gradients add up in fp32 whatever the parameters' dtype.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    micro_batch_index = jnp.arange(micro_batches)
    grads, (losses, (sums, metric_sums, per_token)) = jax.lax.scan(
        accumulate, zeros, (batch, shaped, micro_batch_index)
    )
    loss = losses.sum()
    sums, metric_sums = jax.tree.map(lambda a: a.sum(0), (sums, metric_sums))

    new_state, grad_norm, finite = apply_update(optimizer, state, grads, loss)
    metrics = step_metrics(
        config.vppo, loss, sums, metric_sums, counts, grad_norm, finite, per_token, batch.response_mask
    )
    return new_state, metrics


@jax.named_scope("update")
def apply_update(optimizer: optax.GradientTransformation, state: TrainState, grads, loss):
    """The optimizer's update, unless the loss or the gradient is not finite: then parameters
    and optimizer state stay and the skip is counted. Returns (state, grad norm, finite)."""
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
        frozen=state.frozen,
    )
    return new_state, grad_norm, finite
