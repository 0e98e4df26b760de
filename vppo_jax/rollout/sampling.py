"""Rollout: G sampled responses per prompt, from a compiled prefill and a compiled decode loop.

    from vppo_jax.rollout import sampling
    params = sampling.SamplingParams(max_new_tokens=2048, end_token_ids=(im_end, endoftext), pad_token_id=endoftext,
                                     temperature=1.0, group_size=8)
    keys = jax.random.split(jax.random.key(seed), num_prompts * params.group_size)
    rollout = sampling.generate(model, processor_batch, keys, params)  # = decode(prefill(...))
    rollout.tokens, rollout.mask, rollout.logprobs, rollout.truncated  # (num_prompts * G, ...)

Row p * G + g holds sample g of prompt p. The prefill runs the vision tower and the prompt
once per prompt; its KV cache stays one per prompt, which the prompt's G samples all read,
beside a response cache of their own. Decoding feeds one token per sample per step and stops
when every sample has produced an end token or `max_new_tokens` tokens: up to
DECODE_SEGMENTS `lax.while_loop`s one after the other, each writing one block of the
response cache and reading only the blocks before it and its own.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from vppo_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from vppo_jax.models.qwen2_5_vl.inputs import ModelInputs, left_pad_to_bucket, prepare_inputs
from vppo_jax.models.qwen2_5_vl.text import KVCache
from vppo_jax.parallel import sharding
from vppo_jax.parallel.compile import Program, ProgramCache

# Blocks of the response cache, one decode loop each. A step reads the blocks written so far,
# on average (DECODE_SEGMENTS + 1) / (2 * DECODE_SEGMENTS) of the cache (62% at 4; 100% for
# one block), and each loop is compiled separately, so more blocks trade compile time for
# reads. On a CPU, where reading the cache is most of a decode step, 4 blocks decode the
# `small` model's 256 x 128-token rollout about 15% faster than 1 (8: no faster; 16: slower).
DECODE_SEGMENTS = 4


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    # The tokenizer's: Qwen's <|im_end|> and <|endoftext|> end a response, <|endoftext|> pads
    # (trainer.config.sampling_params reads them from the tokenizer).
    end_token_ids: tuple[int, ...]
    pad_token_id: int  # written after a sequence's end
    temperature: float = 1.0  # 0.0: greedy
    top_k: int = 0  # 0: no top-k truncation
    top_p: float = 1.0  # 1.0: no nucleus truncation
    group_size: int = 1  # G samples per prompt
    min_prompt_length: int = 16  # prompts are left-padded to 2^k or 1.5 * 2^k tokens, at least this many
    # `generate` runs this many prompts at a time (0: all at once): the sampler's memory
    # follows the wave, not the whole batch, and the same keys give the same rollout.
    wave_prompts: int = 0
    # Continuous batching (vppo_jax/rollout/continuous.py) with this many decode slots per
    # device: a slot whose row ends takes the next row at once (wave_prompts is then unused).
    # 0: waves, as above.
    continuous_slots: int = 0

    def __post_init__(self):
        if self.wave_prompts < 0:
            raise ValueError(
                f"wave_prompts={self.wave_prompts} (rollout.wave_prompts in a config): give 0 (all prompts in "
                "one wave) or a positive number of prompts."
            )
        if self.continuous_slots < 0:
            raise ValueError(f"continuous_slots={self.continuous_slots}: give 0 (waves) or a positive number of slots.")


@flax.struct.dataclass
class Rollout:
    tokens: jax.Array  # (N, max_new_tokens) int32, pad_token_id after the end
    mask: jax.Array  # (N, max_new_tokens) bool: the response, its end token included
    logprobs: jax.Array  # (N, max_new_tokens) fp32 log-prob of each token, 0 outside the mask
    truncated: jax.Array  # (N,) bool: no end token within max_new_tokens


def vision_token_ids(config: Qwen2_5_VLConfig) -> tuple[int, ...]:
    """Tokens the sampler must never emit: one in a response breaks the next forward's image scatter."""
    return (config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id)


def truncate(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Logits (N, V) with -inf outside the top-k tokens and then outside the top-p nucleus.

    The nucleus is the smallest set of most likely tokens (among the top k) whose
    probability, renormalised over the top k, reaches top_p (transformers' order); tokens
    tied with its least likely one stay in. No sort of the vocabulary: `lax.top_k` finds the
    k-th logit, and `nucleus_threshold` the nucleus's least likely logit.
    """
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if top_p < 1.0:
        logits = jnp.where(logits >= nucleus_threshold(logits, top_p), logits, -jnp.inf)
    return logits


def nucleus_threshold(logits: jax.Array, top_p: float) -> jax.Array:
    """The smallest logit l of each row (N, V) -> (N, 1) whose strictly more likely tokens hold
    less than top_p of the probability: the nucleus is every token at or above it.

    The mass above a threshold falls as the threshold rises, so a bisection over the 2^32
    float32 values (in their integer order) finds the lowest threshold with mass < top_p in
    32 masked sums over the vocabulary, where a sort costs V log V per row.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    finite = jnp.isfinite(logits)
    mass_above = lambda t: jnp.sum(jnp.where(logits > t[:, None], probs, 0.0), axis=-1)

    def step(_, bounds):
        low, high = bounds  # ordered keys: mass_above(low) >= top_p > mass_above(high)
        middle = (low >> 1) + (high >> 1) + (low & high & 1)  # no int32 overflow
        inside = mass_above(_from_key(middle)) < top_p
        return jnp.where(inside, low, middle), jnp.where(inside, middle, high)

    low = _to_key(jnp.min(jnp.where(finite, logits, jnp.inf), axis=-1)) - 1  # all mass above it
    high = _to_key(jnp.max(logits, axis=-1))  # nothing above the most likely token
    _, high = jax.lax.fori_loop(0, 32, step, (low, high))
    # The least likely token at or above that threshold: the nucleus's edge as a logit.
    return jnp.min(jnp.where(logits >= _from_key(high)[:, None], logits, jnp.inf), axis=-1, keepdims=True)


def _to_key(x: jax.Array) -> jax.Array:
    """float32 -> int32 in the same order (negative floats' bits reversed)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _from_key(key: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.where(key < 0, key ^ jnp.int32(0x7FFFFFFF), key), jnp.float32)


def draw(logits: jax.Array, uniforms: jax.Array) -> jax.Array:
    """One token per row of softmax(logits) (N, V), by inverting its CDF at uniforms (N,) in [0, 1).

    Gumbel-max would need V random numbers per row, and a cumulative sum over V is slow on
    CPU too (either costs more than a decoder layer), so the CDF is inverted in two levels
    of about sqrt(V): first a block of tokens, then a token inside it.
    """
    rows, vocab = logits.shape
    block = 1 << math.ceil(math.log2(vocab) / 2)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    blocks = jnp.pad(probs, ((0, 0), (0, -vocab % block))).reshape(rows, -1, block)
    block_cdf = jnp.cumsum(blocks.sum(axis=-1), axis=-1)
    target = uniforms * block_cdf[:, -1]
    chosen, mass_before = _invert(block_cdf, target)
    within = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]
    token, _ = _invert(jnp.cumsum(within, axis=-1), target - mass_before)
    return chosen * block + token


def _invert(cdf: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First index whose running total cdf (N, K) exceeds target (N,), and the total before it.

    The target is clamped into [0, total): as a cumulative sum of non-negative numbers never
    decreases, the index found always has positive mass, despite rounding.
    """
    target = jnp.clip(target, 0, jnp.nextafter(cdf[:, -1], 0))
    index = jnp.sum(cdf <= target[:, None], axis=-1, dtype=jnp.int32)
    before = jnp.take_along_axis(cdf, jnp.maximum(index - 1, 0)[:, None], axis=-1)[:, 0]
    return index, jnp.where(index > 0, before, 0.0)


def sample_tokens(
    logits: jax.Array, uniforms: jax.Array, params: SamplingParams, banned_ids: tuple[int, ...] = ()
) -> tuple[jax.Array, jax.Array]:
    """Next tokens (N,) from logits (N, V), one uniform in [0, 1) per row, and their fp32 log-probs.

    The log-prob is taken under softmax(logits / temperature) over the whole vocabulary
    (temperature 1 when greedy), before banning and truncation: what a teacher-forced
    forward pass of the trainer computes for the same token.
    """
    logits = jnp.asarray(logits, jnp.float32)
    scaled = logits / params.temperature if params.temperature > 0 else logits
    allowed = scaled.at[:, np.asarray(banned_ids, np.int32)].set(-jnp.inf)  # writes B x len(banned) entries
    if params.temperature > 0:
        tokens = draw(truncate(allowed, params.top_k, params.top_p), uniforms)
    else:
        tokens = jnp.argmax(allowed, axis=-1).astype(jnp.int32)
    logprobs = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(scaled, axis=-1)
    return tokens, logprobs


@flax.struct.dataclass
class Prefilled:
    """Prompts after the prefill, one row per prompt: what `decode` continues, G samples each."""

    logits: jax.Array  # (P, V) after the last prompt token
    prompt_mask: jax.Array  # (P, T) bool: real prompt tokens
    next_position: jax.Array  # (P,) M-RoPE position of the first response token, on all three axes
    cache: KVCache  # the prompt's keys and values, T slots
    # Samples of real prompts (prompts x G); the other prompts pad to a multiple of the mesh's batch shards.
    real_rows: int | None = flax.struct.field(pytree_node=False, default=None)


@flax.struct.dataclass
class _DecodeState:
    step: jax.Array  # index of the next response token to sample
    cache: tuple[KVCache, ...]  # the responses' blocks written so far, one row per sample
    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    finished: jax.Array  # (N,) bool: an end token has been sampled


def _prefill(graphdef, state, inputs: ModelInputs) -> Prefilled:
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(inputs)
    # Text after the prompt continues from its largest position (transformers: rope delta).
    next_position = jnp.max(inputs.position_ids, axis=(0, 2)) + 1
    return Prefilled(logits, inputs.attention_mask.astype(bool), next_position, cache)


# The layer stacks, which the decode loop reads layer by layer (the text decoder's) or not at all (the vision tower's).
_STACKS = nnx.Any(nnx.PathContains("layers"), nnx.PathContains("visual"))


def _decode(
    decode_rows, graphdef, params: SamplingParams, mesh: Mesh, state, prefilled: Prefilled, keys: jax.Array, *rows_args
):
    """`decode_rows(graphdef, layers_graphdef, params, stacks, rest, layers, prefilled, keys, *rows_args)`
    on each device's rows (its prompts' samples; `rows_args` split by rows too), the weights
    gathered once for it: `_decode_rows` decodes them in waves, `continuous._decode_rows` in slots."""
    # Every step reads every weight: gather the fsdp slices once, before the loop, instead of
    # at every step; each device keeps its tensor slice. The decoder layers are sliced out of
    # the split stack first and gathered one by one: slicing them out of a gathered stack
    # would hold the stack and its slices, two gathered copies of the decoder.
    model = nnx.merge(graphdef, state)
    layers_graphdef, layers = nnx.split(model.language_model.decoding_layers())
    graphdef, stacks, rest = nnx.split(model, _STACKS, ...)
    gather = lambda tree: jax.lax.with_sharding_constraint(
        tree, sharding.gathered(sharding.param_shardings(mesh, tree), "fsdp")
    )
    # Each group of rows (one per device of data x fsdp) decodes in a loop of its own: one
    # shared loop would all-reduce "have all rows ended?" at every step, and no group could
    # stop early. Inside a group the compiler splits heads over tensor.
    manual = tuple(axis for axis in ("data", "fsdp") if axis in mesh.axis_names)
    rows = PartitionSpec(manual)
    # The stacks enter the loop as they are split (unread there, so never gathered).
    stack_specs = jax.tree.map(lambda s: s.spec, sharding.gathered(sharding.param_shardings(mesh, stacks), "tensor"))
    decode_rows = jax.shard_map(
        functools.partial(decode_rows, graphdef, layers_graphdef, params),
        mesh=mesh,
        in_specs=(stack_specs, PartitionSpec(), PartitionSpec(), rows, rows, *[rows] * len(rows_args)),
        out_specs=rows,
        axis_names=set(manual),
        check_vma=False,
    )
    return decode_rows(stacks, gather(rest), gather(layers), prefilled, keys, *rows_args)


def _decode_rows(
    graphdef,
    layers_graphdef,
    params: SamplingParams,
    stacks,
    rest,
    layers,
    prefilled: Prefilled,
    keys: jax.Array,
    stop_lengths: jax.Array | None = None,
) -> Rollout:
    """One device's rows, the samples of its prompts (row p * G + g), decoded one block of the
    response cache after another: a `lax.while_loop` per block, which stops once every sample
    has ended; while writing block b a step reads blocks 0..b only. stop_lengths: see `ends`."""
    per_sample = lambda a: jnp.repeat(a, params.group_size, axis=0)
    decoder = _RowDecoder(
        model=nnx.merge(graphdef, stacks, rest),
        layers=nnx.merge(layers_graphdef, layers),
        params=params,
        prefilled=prefilled,
        next_position=per_sample(prefilled.next_position),
        uniforms=_step_uniforms(keys, params.max_new_tokens),
        stop_lengths=stop_lengths,
    )
    rows = keys.shape[0]
    state = decoder.record(_start_state(rows, params), per_sample(prefilled.logits))
    block, blocks = _response_blocks(params.max_new_tokens)
    for b in range(blocks):  # a loop that ends early (every sample has ended) leaves the next ones no step
        first_slot = b * block
        state = state.replace(cache=(*state.cache, _empty_block(prefilled.cache, rows, block)))
        state = jax.lax.while_loop(
            functools.partial(_block_not_done, params, first_slot + block - 1),
            functools.partial(decoder.decode_one, first_slot, block),
            state,
        )
    return Rollout(tokens=state.tokens, mask=state.mask, logprobs=state.logprobs, truncated=~state.finished)


def _step_uniforms(keys: jax.Array, max_new_tokens: int) -> jax.Array:
    """(N, max_new_tokens): row i's uniform at step t, from its key folded with t; all drawn before the loop."""
    step_uniform = lambda key, t: jax.random.uniform(jax.random.fold_in(key, t))
    return jax.vmap(jax.vmap(step_uniform, (None, 0)), (0, None))(keys, jnp.arange(max_new_tokens))


def _start_state(rows: int, params: SamplingParams) -> _DecodeState:
    """Nothing sampled yet, no response cache block."""
    shape = (rows, params.max_new_tokens)
    return _DecodeState(
        step=jnp.int32(0),
        cache=(),
        tokens=jnp.full(shape, params.pad_token_id, jnp.int32),
        mask=jnp.zeros(shape, bool),
        logprobs=jnp.zeros(shape, jnp.float32),
        finished=jnp.zeros((rows,), bool),
    )


def _response_blocks(max_new_tokens: int) -> tuple[int, int]:
    """(slots per block, blocks) of the response cache: at most DECODE_SEGMENTS blocks."""
    slots = max(max_new_tokens - 1, 1)  # the last token is sampled, never fed back
    block = -(-slots // DECODE_SEGMENTS)
    return block, -(-slots // block)


def _empty_block(prompt_cache: KVCache, rows: int, block: int) -> KVCache:
    """A response cache block: each sample's own keys and values, the prompt's cache shape with
    one row per sample and `block` slots; heads split over tensor like the prompt's."""

    def empty(prompt_part: jax.Array, slot_axis: int) -> jax.Array:
        shape = (rows, *prompt_part.shape[1:slot_axis], block, *prompt_part.shape[slot_axis + 1 :])
        return sharding.constrain(jnp.zeros(shape, prompt_part.dtype), "batch", "act_kv_heads", None, None)

    return KVCache(
        keys=tuple(empty(k, 3) for k in prompt_cache.keys), values=tuple(empty(v, 2) for v in prompt_cache.values)
    )


def _block_not_done(params: SamplingParams, last_slot: int, state: _DecodeState) -> jax.Array:
    """Whether the loop writing the block that ends at `last_slot` takes another step."""
    return (state.step <= last_slot + 1) & (state.step < params.max_new_tokens) & ~jnp.all(state.finished)


@dataclasses.dataclass(frozen=True)
class _RowDecoder:
    """What every decode step of one device's rows reads: the model, the prompts' prefill and the uniforms."""

    model: Qwen2_5_VLForConditionalGeneration
    layers: list  # the decoder layers, taken once outside the loop (`TextModel.decoding_layers`)
    params: SamplingParams
    prefilled: Prefilled
    next_position: jax.Array  # (N,) each sample's first response position
    uniforms: jax.Array  # (N, max_new_tokens)
    stop_lengths: jax.Array | None  # (N,) or None: see `ends`

    def decode_one(self, first_slot: int, block: int, state: _DecodeState) -> _DecodeState:
        """Feeds the last sampled token (written at its slot of the block that starts at
        `first_slot`) and records the token it predicts."""
        rows = self.uniforms.shape[0]
        previous = state.step - 1  # the last sampled token goes in at its slot, then predicts the next
        position = jnp.broadcast_to(self.next_position + previous, (3, rows))[..., None]
        block_mask = jnp.broadcast_to(first_slot + jnp.arange(block) <= previous, (rows, block))
        token = jax.lax.dynamic_index_in_dim(state.tokens, previous, axis=1, keepdims=False)
        logits, cache = self.model.decode_step(
            self.layers,
            token,
            position,
            self.prefilled.cache,
            self.prefilled.prompt_mask,
            state.cache,
            block_mask,
            previous - first_slot,
        )
        return self.record(state.replace(cache=cache), logits)

    def record(self, state: _DecodeState, logits: jax.Array) -> _DecodeState:
        """Samples a token per row from `logits` and writes it (pad after a row's end) at column `state.step`."""
        params = self.params
        step_uniforms = jax.lax.dynamic_index_in_dim(self.uniforms, state.step, axis=1, keepdims=False)
        tokens, logprobs = sample_tokens(logits, step_uniforms, params, vision_token_ids(self.model.config))
        live = ~state.finished
        tokens = jnp.where(live, tokens, params.pad_token_id)
        column = lambda buffer, values: jax.lax.dynamic_update_slice(buffer, values[:, None], (0, state.step))
        return _DecodeState(
            step=state.step + 1,
            cache=state.cache,
            tokens=column(state.tokens, tokens),
            mask=column(state.mask, live),
            logprobs=column(state.logprobs, jnp.where(live, logprobs, 0.0)),
            finished=state.finished | (live & ends(tokens, state.step, params, self.stop_lengths)),
        )


def ends(tokens: jax.Array, step: jax.Array, params: SamplingParams, stop_lengths: jax.Array | None) -> jax.Array:
    """Whether rows end with `tokens` (N,), sampled at `step` (scalar or (N,)): an end token,
    or, given stop_lengths (N,), their stop_lengths-th token, as if it were an end token: the
    forced lengths of benchmarks/rollout_lengths.py."""
    ended = jnp.isin(tokens, np.asarray(params.end_token_ids, np.int32).reshape(-1))
    return ended if stop_lengths is None else ended | (step + 1 >= stop_lengths)


def prefill(
    model: Qwen2_5_VLForConditionalGeneration,
    batch: dict,
    params: SamplingParams,
    mesh: Mesh | None = None,
    rows: int = 0,
) -> Prefilled:
    """Runs the prompts of an HF-processor batch (left-padded) once: their logits and KV cache.

    On a mesh (default: one device), prompts and image patch slots are split over its batch
    axes (data x fsdp), padded with empty prompts to a multiple of them (and to at least
    `rows` prompts: a wave's size); the parameters and the KV cache are split by the sharding
    rules (`vppo_jax/parallel/sharding.py`).
    """
    mesh = sharding.mesh_or_default(mesh)
    batch = left_pad_to_bucket(batch, params.min_prompt_length, params.pad_token_id)
    prompts = batch["input_ids"].shape[0]
    shards = sharding.batch_shards(mesh)
    padded_rows = -(-max(rows, prompts) // shards) * shards
    inputs = prepare_inputs(model.config, **_pad_prompts(batch, padded_rows, params.pad_token_id))
    graphdef, state = nnx.split(model)
    return compiled_prefill(graphdef, state, inputs, mesh)(state, inputs).replace(real_rows=prompts * params.group_size)


def decode(
    model: Qwen2_5_VLForConditionalGeneration,
    prefilled: Prefilled,
    keys: jax.Array,
    params: SamplingParams,
    mesh: Mesh | None = None,
    stop_lengths: jax.Array | None = None,
) -> Rollout:
    """Samples G responses for every prompt of `prefilled`, one PRNG key per sample (N,).

    The same keys reproduce the same rollout. Use the mesh of `prefill`; the rollout comes
    back whole on every device (replicated). stop_lengths (N,): see `ends`.
    """
    mesh = sharding.mesh_or_default(mesh)
    real, keys, *stops = padded_rows(prefilled, params, keys, *([] if stop_lengths is None else [stop_lengths]))
    graphdef, state = nnx.split(model)
    args = (state, prefilled.replace(real_rows=None), keys, *stops)
    rollout = compiled_decode(graphdef, *args[:3], params, mesh, *stops)(*args)
    return rollout if real == keys.shape[0] else jax.tree.map(lambda a: a[:real], rollout)


def padded_rows(prefilled: Prefilled, params: SamplingParams, keys: jax.Array, *per_row: jax.Array) -> tuple:
    """(real samples, keys, *per_row) with one row per row of `prefilled`'s samples: the
    padding prompts' rows sample with copies of the last real row's, and are dropped after."""
    rows = prefilled.prompt_mask.shape[0] * params.group_size
    real = prefilled.real_rows or rows
    if keys.shape != (real,):
        raise ValueError(f"keys has shape {keys.shape}; expected ({real},): one key per sample, prompts x group_size.")
    pad = lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], rows - real)]) if real < rows else jnp.asarray(a)
    return real, *map(pad, (keys, *per_row))


def padded_prompts(batch: dict, keys: jax.Array, params: SamplingParams) -> dict:
    """The HF-processor batch left-padded to its length bucket, once its keys are checked: one
    per sample, prompts x group_size."""
    batch = left_pad_to_bucket(batch, params.min_prompt_length, params.pad_token_id)
    prompts = batch["input_ids"].shape[0]
    if keys.shape != (prompts * params.group_size,):
        raise ValueError(
            f"keys has shape {keys.shape}; expected ({prompts * params.group_size},): one key per sample, "
            "prompts x group_size."
        )
    return batch


def generate(
    model: Qwen2_5_VLForConditionalGeneration,
    batch: dict,
    keys: jax.Array,
    params: SamplingParams,
    mesh: Mesh | None = None,
    stop_lengths: jax.Array | None = None,
) -> Rollout:
    """G samples for each prompt of an HF-processor batch: `prefill`, then `decode` with one key per
    sample (N,), in waves of `params.wave_prompts` prompts. stop_lengths (N,): see `ends`.
    (Continuous batching, `params.continuous_slots` > 0, is `continuous.generate`.)

    Every wave is left-padded to the whole batch's prompt length and the last one is padded
    to a full wave with empty prompts: one compiled prefill and decode serve all waves, and
    each row computes what it would in one wave (its tokens are drawn from its own key).
    """
    if params.continuous_slots:
        raise ValueError(
            f"continuous_slots={params.continuous_slots}: sample with vppo_jax.rollout.continuous.generate, "
            "or set 0 for waves."
        )
    batch = padded_prompts(batch, keys, params)
    prompts = batch["input_ids"].shape[0]
    wave = min(params.wave_prompts or prompts, prompts)
    if wave == prompts:
        return decode(model, prefill(model, batch, params, mesh), keys, params, mesh, stop_lengths)
    group, merge_unit = params.group_size, model.config.vision.merge_unit
    rollouts = [
        decode(
            model,
            prefill(
                model,
                _prompt_slice(batch, start, start + wave, model.config.image_token_id, merge_unit),
                params,
                mesh,
                rows=wave,
            ),
            keys[start * group : (start + wave) * group],
            params,
            mesh,
            None if stop_lengths is None else stop_lengths[start * group : (start + wave) * group],
        )
        for start in range(0, prompts, wave)
    ]
    return jax.tree.map(lambda *parts: jnp.concatenate(parts), *rollouts)


def _prompt_slice(batch: dict, start: int, stop: int, image_token_id: int, merge_unit: int) -> dict:
    """Prompts [start, stop) of an HF-processor batch, with their images.

    The images follow each other in the order of their tokens in the text: image i belongs to
    the prompt that holds its first token (merge_unit patches make one token).
    """
    sliced = {name: np.asarray(array)[start:stop] for name, array in batch.items() if name not in _IMAGE_KEYS}
    if "pixel_values" not in batch:
        return sliced
    grids = np.asarray(batch["image_grid_thw"]).reshape(-1, 3)
    patches = np.prod(grids, axis=1)
    first_token = np.cumsum(patches // merge_unit) - patches // merge_unit
    prompt_tokens = np.cumsum(np.sum(np.asarray(batch["input_ids"]) == image_token_id, axis=1))
    owner = np.searchsorted(prompt_tokens, first_token, side="right")
    images = np.flatnonzero((owner >= start) & (owner < stop))
    if not len(images):
        return sliced
    first_patch = np.cumsum(patches) - patches
    patch_rows = np.concatenate([np.arange(first_patch[i], first_patch[i] + patches[i]) for i in images])
    sliced["pixel_values"] = np.asarray(batch["pixel_values"])[patch_rows]
    sliced["image_grid_thw"] = grids[images]
    return sliced


_IMAGE_KEYS = ("pixel_values", "image_grid_thw")


def _pad_prompts(batch: dict, rows: int, pad_id: int) -> dict:
    """The batch with prompts of one pad token appended up to `rows` rows."""
    missing = rows - batch["input_ids"].shape[0]
    if not missing:
        return batch
    padded = dict(batch)
    for name, last in (("input_ids", pad_id), ("attention_mask", 1), ("mm_token_type_ids", 0)):
        if name in batch:
            array = np.asarray(batch[name])
            rows = np.zeros((missing, array.shape[1]), array.dtype)
            rows[:, :-1], rows[:, -1] = (pad_id if name == "input_ids" else 0), last
            padded[name] = np.concatenate([array, rows])
    return padded


def _prefilled_shardings(mesh: Mesh, prefilled: Prefilled):
    """Rows over the batch axes; the cache's heads over tensor too."""
    shardings = sharding.rows_shardings(mesh, prefilled.replace(cache=None))
    return shardings.replace(cache=sharding.cache_shardings(mesh, prefilled.cache))


# The sampler's programs, shared by every caller (a trainer, evaluation, the demo).
_PROGRAMS = ProgramCache()


def compiled_prefill(graphdef, state, inputs: ModelInputs, mesh: Mesh) -> Program:
    """The prefill compiled for these argument shapes (arrays or ShapeDtypeStructs)."""
    return _PROGRAMS.get(
        ("prefill", graphdef),
        mesh,
        (state, inputs),
        lambda: (
            functools.partial(_prefill, graphdef),
            (sharding.param_shardings(mesh, state), sharding.inputs_shardings(mesh, inputs)),
            lambda out: _prefilled_shardings(mesh, out),
            (),
        ),
    )


def compiled_decode(
    graphdef, state, prefilled: Prefilled, keys, params: SamplingParams, mesh: Mesh, *stop_lengths
) -> Program:
    """The decode loop compiled for these argument shapes, and stop lengths if given (see `ends`)."""
    return _PROGRAMS.get(
        ("decode", graphdef, params),
        mesh,
        (state, prefilled, keys, *stop_lengths),
        lambda: (
            functools.partial(_decode, _decode_rows, graphdef, params, mesh),
            (
                sharding.param_shardings(mesh, state),
                _prefilled_shardings(mesh, prefilled),
                sharding.rows_shardings(mesh, keys),
                *sharding.rows_shardings(mesh, stop_lengths),
            ),
            lambda out: sharding.replicated(mesh),
            (),
        ),
    )
