"""Continuous batching: a fixed number of decode slots per device, each taking the next row of
the rollout as soon as its row ends, so no step is spent on a finished row while rows wait.

    params = dataclasses.replace(params, continuous_slots=32)
    rollout = continuous.generate(model, batch, keys, params)  # sampling.generate's tokens

The prompts are prefilled once, all of them (`sampling.prefill`), and the prompt cache stays
one row per prompt: a slot reads its prompt's row by index (the slot's block table is that
one entry), so the G samples of a prompt share it, whichever slots they land in. The read
is a gather, a copy of slots x prompt length per layer and step unless XLA fuses it into
the attention (not checked): a ragged paged-attention kernel would read the row in place. A slot's
response cache is its own: one ring of max_new_tokens - 1 columns, written at column
(loop step mod length), so that every slot writes the same column at a step and the model's
`decode_step` serves unchanged; a row attends to the columns written since it took the slot.

Row p * G + g draws token t with the uniform of its key folded with t (`_step_uniforms`), as
in waves: a row's tokens depend on its key and prompt, not on its slot or its neighbours.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from vppo_jax.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vppo_jax.models.qwen2_5_vl.text import KVCache
from vppo_jax.parallel import sharding
from vppo_jax.rollout.sampling import (
    _PROGRAMS,
    Prefilled,
    Rollout,
    SamplingParams,
    _decode,
    _empty_block,
    _prefilled_shardings,
    _start_state,
    _step_uniforms,
    ends,
    padded_prompts,
    padded_rows,
    prefill,
    sample_tokens,
    vision_token_ids,
)


@flax.struct.dataclass
class _SlotState:
    loop_step: jax.Array  # steps taken: the ring column written at the next step is loop_step mod its length
    queued: jax.Array  # the next row to take a slot
    row: jax.Array  # (S,) each slot's row; rows (one past the last) when the slot is free
    step: jax.Array  # (S,) the index of the next token of the slot's row
    ring: KVCache  # (S, ...) the slots' response caches
    tokens: jax.Array  # (N, max_new_tokens) and the rest as `sampling._DecodeState`
    mask: jax.Array
    logprobs: jax.Array
    finished: jax.Array


def generate(
    model: Qwen2_5_VLForConditionalGeneration,
    batch: dict,
    keys: jax.Array,
    params: SamplingParams,
    mesh: Mesh | None = None,
    stop_lengths: jax.Array | None = None,
) -> Rollout:
    """`sampling.generate`'s rollout (the same tokens for the same keys), every prompt prefilled
    first, then decoded in `params.continuous_slots` slots per device."""
    if params.continuous_slots < 1:
        raise ValueError(f"continuous_slots={params.continuous_slots}: continuous batching needs at least one slot.")
    prefilled = prefill(model, padded_prompts(batch, keys, params), params, mesh)
    return decode(model, prefilled, keys, params, mesh, stop_lengths)[0]


def decode(
    model: Qwen2_5_VLForConditionalGeneration,
    prefilled: Prefilled,
    keys: jax.Array,
    params: SamplingParams,
    mesh: Mesh | None = None,
    stop_lengths: jax.Array | None = None,
) -> tuple[Rollout, jax.Array]:
    """`sampling.decode`'s rollout, decoded in `params.continuous_slots` slots per device, and
    the decode loop's steps on each device (shards,): slots x steps is the slot-steps spent."""
    mesh = sharding.mesh_or_default(mesh)
    real, keys, *stops = padded_rows(prefilled, params, keys, *([] if stop_lengths is None else [stop_lengths]))
    # The padding prompts' rows are never queued (each device's real rows come first: padding
    # prompts go after every real one).
    is_real = jnp.arange(keys.shape[0]) < real
    graphdef, state = nnx.split(model)
    args = (state, prefilled.replace(real_rows=None), keys, is_real, *stops)
    rollout, steps = _compiled(graphdef, args, params, mesh)(*args)
    return jax.tree.map(lambda a: a[:real], rollout), steps


def _compiled(graphdef, args: tuple, params: SamplingParams, mesh: Mesh):
    """The slots' decode loop compiled for the shapes of its arguments: state, prefilled, keys,
    is_real and, if given, stop_lengths."""
    state, prefilled, *per_row = args
    return _PROGRAMS.get(
        ("continuous", graphdef, params),
        mesh,
        args,
        lambda: (
            functools.partial(_decode, _decode_rows, graphdef, params, mesh),
            (
                sharding.param_shardings(mesh, state),
                _prefilled_shardings(mesh, prefilled),
                *sharding.rows_shardings(mesh, per_row),
            ),
            lambda out: sharding.replicated(mesh),
            (),
        ),
    )


def _decode_rows(
    graphdef,
    layers_graphdef,
    params: SamplingParams,
    stacks,
    rest,
    layers,
    prefilled: Prefilled,
    keys,
    is_real,
    stop_lengths=None,
) -> tuple[Rollout, jax.Array]:
    """One device's rows through its slots, in one `lax.while_loop` that runs until every real row has ended."""
    model = nnx.merge(graphdef, stacks, rest)
    layers = nnx.merge(layers_graphdef, layers)
    rows, slots = keys.shape[0], params.continuous_slots
    ring_length = max(params.max_new_tokens - 1, 1)  # a row feeds back at most max_new_tokens - 1 tokens
    uniforms = _step_uniforms(keys, params.max_new_tokens)
    queue = jnp.sum(is_real, dtype=jnp.int32)
    empty = _start_state(rows, params)
    start = _SlotState(
        loop_step=jnp.int32(0),
        queued=jnp.int32(0),
        row=jnp.full((slots,), rows, jnp.int32),
        step=jnp.zeros((slots,), jnp.int32),
        ring=_empty_block(prefilled.cache, slots, ring_length),
        tokens=empty.tokens,
        mask=empty.mask,
        logprobs=empty.logprobs,
        finished=empty.finished,
    )
    busy = lambda state: jnp.any(state.row < rows) | (state.queued < queue)
    step = functools.partial(_step, model, layers, params, prefilled, uniforms, stop_lengths, queue, ring_length)
    state = jax.lax.while_loop(busy, step, start)
    rollout = Rollout(tokens=state.tokens, mask=state.mask, logprobs=state.logprobs, truncated=~state.finished)
    return rollout, state.loop_step[None]


def _step(
    model, layers, params: SamplingParams, prefilled: Prefilled, uniforms, stop_lengths, queue, ring_length, state
):
    """Free slots take the next rows; then every slot samples its row's next token: a new row
    its first from its prompt's prefill logits, the others from a decode step that feeds their
    last token (computed for every slot, one program of fixed shapes)."""
    rows, group = uniforms.shape[0], params.group_size
    free = state.row >= rows
    taken = state.queued + jnp.cumsum(free) - 1  # the k-th free slot takes the k-th queued row
    takes = free & (taken < queue)
    row = jnp.where(takes, taken, state.row)
    step = jnp.where(takes, 0, state.step)
    queued = jnp.minimum(state.queued + jnp.sum(free, dtype=jnp.int32), queue)
    live = row < rows
    prompt = jnp.where(live, row // group, 0)

    # The decode step: the row's last token in at its position and at the ring's column for
    # this loop step; the row attends to its prompt and to the `step` ring columns it wrote,
    # this one included (none yet for a new row, whose step is discarded below).
    previous = jnp.maximum(step - 1, 0)
    token = state.tokens[jnp.minimum(row, rows - 1), previous]
    position = jnp.broadcast_to(prefilled.next_position[prompt] + previous, (3, row.shape[0]))[..., None]
    column = state.loop_step % ring_length
    written = (column - jnp.arange(ring_length)) % ring_length < step[:, None]
    prompt_cache = jax.tree.map(lambda a: a[prompt], prefilled.cache)
    logits, (ring,) = model.decode_step(
        layers, token, position, prompt_cache, prefilled.prompt_mask[prompt], (state.ring,), written, column
    )
    logits = jnp.where((step == 0)[:, None], prefilled.logits[prompt], logits)

    tokens, logprobs = sample_tokens(
        logits, uniforms[jnp.minimum(row, rows - 1), step], params, vision_token_ids(model.config)
    )
    stops = None if stop_lengths is None else stop_lengths[jnp.minimum(row, rows - 1)]
    ended = live & ends(tokens, step, params, stops)
    write = lambda buffer, values: buffer.at[row, step].set(values, mode="drop")  # a free slot's row is out of range
    return _SlotState(
        loop_step=state.loop_step + 1,
        queued=queued,
        row=jnp.where(ended | (step + 1 >= params.max_new_tokens), rows, row),
        step=step + 1,
        ring=ring,
        tokens=write(state.tokens, tokens),
        mask=write(state.mask, live),
        logprobs=write(state.logprobs, logprobs),
        finished=state.finished.at[row].set(ended, mode="drop"),
    )
