"""What the VPPO update consumes and carries: the batch of rollouts (`TrainBatch`, built on
the host by `build_train_batch`) and the training state (`TrainState`), with their shardings."""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vppo_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from vppo_jax.models.qwen2_5_vl.inputs import (
    ModelInputs,
    count_windows,
    largest_frame_windows,
    prepare_inputs,
    vision_inputs,
)
from vppo_jax.parallel import sharding
from vppo_jax.vppo import packing


@flax.struct.dataclass
class TrainBatch:
    """Rollouts ready for the update; every leaf has a leading micro-batch axis M.

    Per-token arrays cover the response window only: the last R positions but one of the
    T-token rows, the positions that predict a response token (responses follow the
    left-padded prompts, so every row's response starts in the same column). Column r of
    `targets` is the token predicted at position T - R - 1 + r; `response_mask[r]` says
    whether it is a response token (the loss covers only those). The vocabulary projection,
    log-probs, entropy and dependency are computed at those R positions only
    (`Qwen2_5_VLForConditionalGeneration.response_hidden_states`). Rows are ordered by group:
    rows g*G .. g*G+G-1 share a prompt, and runs of `prompt_group` rows of a micro-batch were
    checked to share their first T - R tokens and images: the forward runs each run's prompt once.
    """

    inputs: ModelInputs  # (M, b, T) token arrays, images in the slot layout per micro-batch
    targets: jax.Array  # (M, b, R) int32
    response_mask: jax.Array  # (M, b, R) bool
    advantages: jax.Array  # (M, b) GRPO advantages
    old_logp: jax.Array | None = None  # (M, b, R) from score_rollouts, or None (in-pass)
    dependency: jax.Array | None = None  # (M, b, R) from score_rollouts, or None (in-pass)
    old_entropy: jax.Array | None = None  # (M, b, R) for entropy-based TGF
    ref_logp: jax.Array | None = None  # (M, b, R) the reference policy's, from score_rollouts with a KL on
    perturbed_patches: jax.Array | None = None  # (M, S, patch_dim) images I' made on the host ("blacken_pixels")
    # Packed (`build_packed_train_batch`): `inputs` hold each micro-batch's bins (M, K, N) laid
    # out by `packed`, and `rows` (M, b) names each row's rollout row (-1: none, a micro-batch
    # holding fewer than b). None: padded rows, micro-batch after micro-batch in rollout order.
    packed: packing.PackedLayout | None = None
    rows: jax.Array | None = None
    prompt_group: int = flax.struct.field(pytree_node=False, default=1)
    rollout_rows: int = flax.struct.field(pytree_node=False, default=0)  # packed: the rollout's rows

    def token_targets(self) -> jax.Array:
        """The tokens the per-token scores are of, in the inputs' layout: (b, R) targets of the
        response window, or the response slots of the packed bins (K, S); of one micro-batch."""
        return self.targets if self.packed is None else self.packed.targets

    def token_mask(self) -> jax.Array:
        """Which of `token_targets` are response tokens."""
        return self.response_mask if self.packed is None else self.packed.response_mask

    def rows_alone_inputs(self) -> ModelInputs:
        """Inputs where each row has its own prompt and images (to perturb them row by row): a
        padded batch's own, a packed batch's twin bins."""
        if self.packed is None:
            return self.inputs
        if self.packed.rows_alone is None:
            raise ValueError(
                "VPPO's perturbed forward gives each row its own images: build the packed batch with "
                "build_packed_train_batch(rows_alone=True)."
            )
        return self.packed.rows_alone.inputs

    def as_rows(self, values: jax.Array) -> jax.Array:
        """Per-token values of one micro-batch in the inputs' layout -> its (b, R) rows."""
        if self.packed is None:
            return values
        return packing.unpack(values, self.packed, *self.targets.shape[-2:])

    def in_rollout_order(self, values: np.ndarray) -> np.ndarray:
        """Per-row values (M, b) of this batch (on the host) -> (rollout rows,) in rollout order."""
        values = np.asarray(values)
        if self.rows is None:
            return values.reshape(-1)
        rows = np.asarray(self.rows)
        out = np.zeros(self.rollout_rows, values.dtype)
        out[rows[rows >= 0]] = values[rows >= 0]
        return out

    def in_batch_order(self, values: np.ndarray) -> np.ndarray:
        """Per-row values in rollout order (rollout rows,) -> (M, b) as this batch holds its rows."""
        values = np.asarray(values)
        if self.rows is None:
            return values.reshape(self.advantages.shape)
        rows = np.asarray(self.rows)
        return np.where(rows >= 0, values[np.maximum(rows, 0)], 0).astype(values.dtype)

    def packed_minimums(self) -> dict:
        """The shape of this packed batch as `build_packed_train_batch`'s minimums: a later
        batch built with them compiles no new program unless it needs more room."""
        micro_batches, rows, _ = self.targets.shape
        twin = self.packed.rows_alone
        return dict(
            min_micro_batches=micro_batches,
            min_rows=rows,
            min_slots=self.packed.targets.shape[-1],
            min_row_tokens=1 if twin is None else twin.inputs.input_ids.shape[-1],
        )

    @property
    def scored(self) -> bool:
        """Whether pi_old's statistics came with the batch (`score_rollouts`) rather than
        from the update's own forward pass."""
        return self.old_logp is not None


def scored_like(batch: TrainBatch, reference: bool = False) -> TrainBatch:
    """The shapes score_rollouts returns for `batch` (ShapeDtypeStructs), with the reference's
    log-probs when it is given the reference's parameters."""
    scores = jax.ShapeDtypeStruct(batch.targets.shape, jnp.float32)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch).replace(
        old_logp=scores, old_entropy=scores, dependency=scores, ref_logp=scores if reference else None
    )


def batch_shardings(mesh, batch: TrainBatch):
    """Rows (and image patch slots) of every micro-batch over the mesh's batch axes."""
    return sharding.inputs_shardings(mesh, batch, leading=1)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the parameters the update trains (differentiated, in the optimizer state)
    opt_state: Any
    skipped_steps: jax.Array
    # nnx.State of the parameters held fixed (model.freeze_vision's vision tower, LoRA's base
    # weights; empty when all train), in the compute dtype: every parameter is cast to it where
    # it is used, so they compute exactly what the master weights would, in less memory.
    frozen: Any

    @property
    def model_params(self):
        """Every parameter of the model, for nnx.merge with the graphdef."""
        return nnx.merge_state(self.params, self.frozen)


def init_state(
    model: nnx.Module, optimizer: optax.GradientTransformation, trainable: nnx.filterlib.Filter = nnx.Param
) -> tuple[nnx.GraphDef, TrainState]:
    """The state of `model` training its `trainable` parameters (trainer.config.trainable), the
    other parameters frozen. It takes the model's arrays as they are (no copy, but frozen ones
    in another dtype than the compute dtype): once a step has consumed (donated) the state, the
    model object must not be used again."""
    graphdef, params, frozen = nnx.split(model, trainable, nnx.Param)
    compute_dtype = model.config.jnp_dtype
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        skipped_steps=jnp.zeros((), jnp.int32),
        frozen=jax.tree.map(lambda p: p.astype(compute_dtype), frozen),
    )
    return graphdef, state


def train_state_shardings(mesh, optimizer: optax.GradientTransformation, state: TrainState) -> TrainState:
    """Shardings of a TrainState (arrays or ShapeDtypeStructs): parameters by their logical
    axes, the optimizer state like the parameters it mirrors, the counters replicated."""
    params = sharding.param_shardings(mesh, state.params)
    return state.replace(
        step=sharding.replicated(mesh),
        skipped_steps=sharding.replicated(mesh),
        params=params,
        opt_state=sharding.opt_state_shardings(mesh, optimizer, state.opt_state, params),
        frozen=sharding.param_shardings(mesh, state.frozen),
    )


def init_sharded_state(
    model: nnx.Module, optimizer: optax.GradientTransformation, mesh, trainable: nnx.filterlib.Filter = nnx.Param
) -> tuple[nnx.GraphDef, TrainState]:
    """`init_state` on `mesh`: the parameters placed by the sharding rules (from wherever the
    model holds them, e.g. host memory), the optimizer state created already sharded on the
    devices (never whole on one device). The model must not be used afterwards."""
    graphdef, params = nnx.split(model, nnx.Param)
    params_shardings = sharding.param_shardings(mesh, params)
    params = sharding.put(params, params_shardings)
    make = lambda p: init_state(nnx.merge(graphdef, p), optimizer, trainable)[1]
    state_shardings = train_state_shardings(mesh, optimizer, jax.eval_shape(make, params))
    return graphdef, jax.jit(make, in_shardings=(params_shardings,), out_shardings=state_shardings, donate_argnums=0)(
        params
    )


def _images_per_row(config: Qwen2_5_VLConfig, input_ids: np.ndarray, grids: np.ndarray) -> list[int]:
    """How many of the (row-major ordered) images each row holds, from its image tokens."""
    tokens_per_image = (np.prod(grids, axis=1) // config.vision.merge_unit).tolist()
    counts, image = [], 0
    for row in input_ids:
        need, count = int((row == config.image_token_id).sum()), 0
        while need > 0:
            need -= tokens_per_image[image]
            image, count = image + 1, count + 1
        if need:
            raise ValueError("image tokens of a row do not add up to whole images of image_grid_thw")
        counts.append(count)
    return counts


def build_train_batch(
    config: Qwen2_5_VLConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    response_tokens: np.ndarray,
    advantages: np.ndarray,
    pixel_values: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    micro_batches: int = 1,
    perturbed_pixel_values: np.ndarray | None = None,
    response_start: int | None = None,
    prompt_group: int = 1,
) -> TrainBatch:
    """Splits B rows into `micro_batches` consecutive micro-batches with equal shapes.

    `perturbed_pixel_values`, rows like `pixel_values`: the images I' blackened on the host
    (vppo_jax/vppo/pixel_blackening.py), laid out like the originals.

    `prompt_group`: rows come in groups of that many samples of one prompt (a rollout's
    layout); the batch records the runs of rows within a micro-batch that share their
    prompt columns (checked here), so the forward runs each prompt once per run.

    `response_tokens` (B, T) marks the response tokens of each row; none may sit in columns
    1 .. response_start - 1 (default: the first column from 1 on holding one; rollouts pass
    their prompt width, so the window's width is the same every step). Column 0 is never a
    target: no position predicts it. Targets and the response mask are the columns from
    response_start on (see TrainBatch).
    """
    batch, length = input_ids.shape
    if batch % micro_batches:
        raise ValueError(f"{batch} rows do not split into {micro_batches} equal micro-batches.")
    rows = batch // micro_batches
    predicted = np.asarray(response_tokens, bool)[:, 1:]  # columns 1 .. T-1
    if response_start is None:
        columns = np.flatnonzero(predicted.any(0))
        response_start = 1 + int(columns[0]) if len(columns) else length - 1
    if not 1 <= response_start < length or predicted[:, : response_start - 1].any():
        raise ValueError(
            f"response_start={response_start}: response tokens must start at or after it, in [1, {length})."
        )
    targets = input_ids[:, response_start:]
    response_mask = predicted[:, response_start - 1 :]

    # Images of each micro-batch: a contiguous run of images and pixel rows.
    parts, row_images = [], None
    if pixel_values is not None:
        grids = np.asarray(image_grid_thw).reshape(-1, 3)
        per_row = np.asarray(_images_per_row(config, input_ids, grids))
        image_bounds = np.concatenate([[0], np.cumsum(per_row.reshape(micro_batches, rows).sum(1))])
        pixel_bounds = np.concatenate([[0], np.cumsum(np.prod(grids, axis=1))])
        first_image = np.concatenate([[0], np.cumsum(per_row)])  # of each row, and the end
        row_images = [
            (grids[start:end], pixel_values[pixel_bounds[start] : pixel_bounds[end]])
            for start, end in zip(first_image[:-1], first_image[1:])
        ]
        for m in range(micro_batches):
            first, last = image_bounds[m], image_bounds[m + 1]
            pixels = slice(pixel_bounds[first], pixel_bounds[last])
            perturbed = None if perturbed_pixel_values is None else perturbed_pixel_values[pixels]
            parts.append((pixel_values[pixels], grids[first:last], perturbed))
    else:
        parts = [(None, None, None)] * micro_batches

    shared = math.gcd(prompt_group, rows)
    _check_shared_prompts(input_ids[:, :response_start], attention_mask[:, :response_start], row_images, shared)

    # One window layout for all micro-batches, so their vision inputs stack.
    grids = [grid for _, grid, _ in parts if grid is not None]
    windows = max((count_windows(config.vision, grid) for grid in grids), default=1)
    frame_windows = max((largest_frame_windows(config.vision, grid) for grid in grids), default=1)
    inputs = [
        prepare_inputs(
            config,
            input_ids[m * rows : (m + 1) * rows],
            attention_mask[m * rows : (m + 1) * rows],
            pixels,
            grid,
            min_windows=windows,
            min_frame_windows=frame_windows,
        )
        for m, (pixels, grid, _) in enumerate(parts)
    ]
    perturbed_patches = None
    if perturbed_pixel_values is not None:  # the same slot layout, other pixels
        perturbed_patches = np.stack(
            [
                vision_inputs(config.vision, perturbed, grid, windows, frame_windows)[0].patches
                for _, grid, perturbed in parts
            ]
        )
    split = lambda a: a.reshape(micro_batches, rows, *a.shape[1:])
    return TrainBatch(
        inputs=jax.tree.map(lambda *leaves: np.stack(leaves), *inputs),
        targets=split(targets.astype(np.int32)),
        response_mask=split(response_mask.astype(bool)),
        advantages=split(np.asarray(advantages, np.float32)),
        perturbed_patches=perturbed_patches,
        prompt_group=shared,
    )


def _check_shared_prompts(prompt_ids: np.ndarray, prompt_mask: np.ndarray, row_images: list | None, run: int):
    """Raises unless each run of `run` consecutive rows has one prompt: the same tokens, mask and
    images (`row_images`: each row's (grids, pixel rows), or None without images)."""
    for first in range(0, len(prompt_ids), run):
        for row in range(first + 1, first + run):
            same = np.array_equal(prompt_ids[row], prompt_ids[first]) and np.array_equal(
                prompt_mask[row], prompt_mask[first]
            )
            if same and row_images is not None:
                same = all(map(np.array_equal, row_images[row], row_images[first]))
            if not same:
                raise ValueError(
                    f"rows {first} and {row} are in one group of {run} but their prompts (the columns "
                    "before the responses, or their images) differ: pass rows grouped as a rollout "
                    "lays them out (a prompt's samples next to each other), or prompt_group=1."
                )


def build_packed_train_batch(
    config: Qwen2_5_VLConfig,
    groups: list[packing.Group],
    advantages: np.ndarray,
    window: int,
    budget: int,
    shards: int = 1,
    rows_alone: bool = False,
    min_micro_batches: int = 1,
    min_rows: int = 1,
    min_slots: int = 1,
    min_row_tokens: int = 1,
) -> TrainBatch:
    """The groups' rows packed in micro-batches of `shards` bins of `budget` tokens
    (vppo_jax/vppo/packing.py), with one advantage per row (rows numbered group by group), the
    per-row arrays (targets, response mask, advantages, scores) in each micro-batch's rows
    (b of them, `rows` says which) over a response window of `window` tokens.

    A group's prompt runs once for its samples; `rows_alone` adds each bin's twin where each
    row has its own copy of its prompt, for VPPO's perturbed forward (each row its own
    perturbed images). The minimums let batches share one compiled shape."""
    responses = [np.asarray(r) for g in groups for r in g.responses]
    if len(advantages) != len(responses):
        raise ValueError(f"{len(advantages)} advantages for {len(responses)} rows.")
    longest = max(map(len, responses), default=0)
    if longest > window:
        raise ValueError(f"a response of {longest} tokens does not fit in the response window of {window}.")
    packed, rows = packing.pack_micro_batches(
        config, groups, budget, shards, min_micro_batches, min_rows, min_slots, rows_alone, min_row_tokens
    )
    targets = np.zeros((*rows.shape, window), np.int32)
    response_mask = np.zeros(targets.shape, bool)
    for m, r in zip(*np.nonzero(rows >= 0)):
        response = responses[rows[m, r]]
        targets[m, r, : len(response)] = response
        response_mask[m, r, : len(response)] = True
    batch = TrainBatch(
        inputs=packed.inputs,
        targets=targets,
        response_mask=response_mask,
        advantages=np.zeros(rows.shape, np.float32),
        packed=packed.layout,
        rows=rows.astype(np.int32),
        rollout_rows=len(responses),
    )
    return batch.replace(advantages=batch.in_batch_order(np.asarray(advantages, np.float32)))


def build_padded_train_batch(
    config: Qwen2_5_VLConfig,
    groups: list[packing.Group],
    advantages: np.ndarray,
    window: int | None = None,
    micro_batches: int = 1,
) -> TrainBatch:
    """The groups' rows as `build_train_batch` lays out a rollout: prompts left-padded to the
    longest, responses right-padded to `window` (default: the longest response); the layout a
    packed batch of the same groups is measured against (tests, benchmarks/packing.py)."""
    width = max(len(g.prompt) for g in groups)
    window = window or max(len(r) for g in groups for r in g.responses)
    ids, response, pixels, grids = [], [], [], []
    for g in groups:
        for r in g.responses:
            row = np.zeros(width + window, np.int64)
            row[width - len(g.prompt) : width + len(r)] = np.concatenate([g.prompt, r])
            ids.append(row)
            response.append(np.isin(np.arange(width + window), np.arange(width, width + len(r))))
            if g.pixel_values is not None:
                pixels.append(g.pixel_values)
                grids.append(g.image_grid_thw)
    padding = np.array([width - len(g.prompt) for g in groups for _ in g.responses])
    prompt_mask = np.arange(width)[None] >= padding[:, None]
    return build_train_batch(
        config,
        np.stack(ids),
        np.concatenate([prompt_mask, np.stack(response)[:, width:]], axis=1),
        np.stack(response),
        advantages,
        np.concatenate(pixels) if pixels else None,
        np.concatenate(grids) if grids else None,
        micro_batches,
        response_start=width,
        prompt_group=math.gcd(*(len(g.responses) for g in groups)),
    )
