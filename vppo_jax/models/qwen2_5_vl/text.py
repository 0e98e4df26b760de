"""The Qwen2 text decoder with multimodal rotary positions (M-RoPE), and its KV-cache decode path."""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vppo_jax.models.qwen2_5_vl.attention import causal_attention
from vppo_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig
from vppo_jax.models.qwen2_5_vl.layers import (
    GatedMLP,
    Linear,
    RMSNorm,
    apply_rotary,
    normal_init,
    param,
    scan_layers,
    scan_layers_with_outputs,
    stacked,
    unstacked,
)
from vppo_jax.models.qwen2_5_vl.packed import TokenTree, tree_attention
from vppo_jax.parallel.sharding import constrain


@flax.struct.dataclass
class KVCache:
    """Keys and values of every decoder layer over a run of cache slots.

    Decoding holds the prompts' (one row per prompt, written by the prefill) and the
    responses' in blocks of slots (one row per sample, a slot written per step; the decode
    loop reads the blocks written so far, vppo_jax/rollout/sampling.py). A prompt's G samples
    read its one row: its keys and values are not repeated G times.

    One array per layer (not stacked) and keys stored transposed: the decode loop updates
    each in place and attends with plain batched matmuls. On CPU, slicing a stacked cache
    or contracting keys over their minor axis costs more than the attention itself.
    """

    keys: tuple[jax.Array, ...]  # per layer (B, kv_heads, head_dim, S)
    values: tuple[jax.Array, ...]  # per layer (B, kv_heads, S, head_dim)


# One layer's keys and values: (B, T, Hkv, hd) each as the layer computes them; in the decode
# cache, keys (B, Hkv, hd, S) and values (B, Hkv, S, hd) (see `KVCache`).
KeysValues = tuple[jax.Array, jax.Array]


@flax.struct.dataclass
class LayerDecodeCache:
    """What one decoder layer attends to while decoding, as `attend_to_cache` takes it."""

    prompt: KeysValues  # the prompts' keys (P, Hkv, hd, T) and values (P, Hkv, T, hd)
    prompt_mask: jax.Array  # (P, T): the prompt slots attended to
    response: tuple[KeysValues, ...]  # the samples' response blocks, the last one being written
    response_mask: jax.Array  # (B, S): the last block's slots attended to


def attend_to_cache(
    q: jax.Array,
    prompt: tuple[jax.Array, jax.Array],
    prompt_mask: jax.Array,
    response: Sequence[tuple[jax.Array, jax.Array]],
    response_mask: jax.Array,
) -> jax.Array:
    """Attention of one new token per sample over its prompt's cache and its own response cache.

    q: (B, 1, H, hd) for B = P x G samples, row p * G + g a sample of prompt p. prompt: one
    layer's keys (P, Hkv, hd, T) and values (P, Hkv, T, hd), shared by a prompt's G samples,
    with prompt_mask (P, T) saying which slots are attended to. response: the samples' own
    keys (B, Hkv, hd, S) and values (B, Hkv, S, hd) in blocks of S slots, every slot of the
    earlier blocks attended to and those of the last where response_mask (B, S) is True.
    Returns (B, 1, H * hd).

    Each part is a softmax of its own in fp32, and the parts are merged by their maxima and
    sums: the softmax over all slots, computed without the prompt's cache repeated, and
    without reading the response blocks that come after the last.
    """
    batch, _, num_heads, head_dim = q.shape
    prompts, num_kv = prompt[0].shape[:2]
    group, per_kv = batch // prompts, num_heads // num_kv
    q = q.reshape(batch, num_kv, per_kv, head_dim)
    # The prompt's part as one batched matmul per prompt and kv head over its G x Hg query
    # heads, then back in the samples' layout (B, Hkv, Hg, .) for the merge.
    by_prompt = q.reshape(prompts, group, num_kv, per_kv, head_dim).transpose(0, 2, 1, 3, 4)
    by_prompt = by_prompt.reshape(prompts, num_kv, group * per_kv, head_dim)
    to_samples = lambda a: (
        a.reshape(prompts, num_kv, group, per_kv, -1).transpose(0, 2, 1, 3, 4).reshape(batch, num_kv, per_kv, -1)
    )
    attended = tuple(map(to_samples, _partial_softmax(by_prompt, prompt[0], prompt[1], prompt_mask)))
    every_slot = jnp.ones(response_mask.shape, bool)
    masks = [every_slot] * (len(response) - 1) + [response_mask]
    for (keys, values), mask in zip(response, masks):
        attended = _merge(attended, _partial_softmax(q, keys, values, mask))
    out, _, total = attended
    return (out / total).astype(values.dtype).reshape(batch, 1, num_heads * head_dim)


def _merge(a: tuple, b: tuple) -> tuple:
    """Two parts' (unnormalised output, maximum, sum) as one: each rescaled to the larger maximum."""
    peak = jnp.maximum(a[1], b[1])
    scale_a, scale_b = jnp.exp(a[1] - peak), jnp.exp(b[1] - peak)
    return a[0] * scale_a + b[0] * scale_b, peak, a[2] * scale_a + b[2] * scale_b


def _partial_softmax(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array):
    """One part's unnormalised attention output, score maximum and sum of exponentials (fp32).

    q (R, Hkv, Q, hd) for R rows of keys (R, Hkv, hd, S) and values (R, Hkv, S, hd); mask
    (R, S). Masked slots count zero; a part with none unmasked gets a maximum so low that
    the merge gives it no weight.
    """
    head_dim = q.shape[-1]
    scores = jnp.einsum("rkqd,rkds->rkqs", q, keys).astype(jnp.float32) * head_dim**-0.5
    mask = mask[:, None, None, :]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    part_max = jnp.max(scores, axis=-1, keepdims=True)
    exps = jnp.where(mask, jnp.exp(scores - part_max), 0.0)
    # Probabilities stay fp32 through the value product; only the merged output is rounded to the dtype.
    out = jnp.einsum("rkqs,rksd->rkqd", exps, values.astype(jnp.float32))
    return out, part_max, jnp.sum(exps, axis=-1, keepdims=True)


def mrope_cos_sin(tcfg: TextConfig, position_ids: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape (B, T, 1, head_dim) from (3, B, T) positions.

    The head_dim/2 frequencies are split into `mrope_section` chunks; chunk i takes its
    position from axis i (temporal, height, width). Angles in fp32, then cast to the
    activation dtype as transformers does.
    """
    hd = tcfg.head_dim
    inv_freq = 1.0 / tcfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    axis_of_freq = np.repeat(np.arange(len(tcfg.mrope_section)) % 3, tcfg.mrope_section)
    positions = position_ids.astype(jnp.float32)[axis_of_freq]  # (hd/2, B, T)
    angles = jnp.moveaxis(positions, 0, -1) * inv_freq  # (B, T, hd/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


class TextAttention(nnx.Module):
    def __init__(self, config: Qwen2_5_VLConfig, rngs: nnx.Rngs):
        t = config.text
        linear = dict(param_dtype=config.jnp_param_dtype, dtype=config.jnp_dtype, rngs=rngs)
        # q/k/v produce heads (Megatron: split on their output), o consumes them.
        heads, kv_heads = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
        self.q_proj = Linear(t.hidden_size, heads, axes=("embed", "heads"), use_bias=True, **linear)
        self.k_proj = Linear(t.hidden_size, kv_heads, axes=("embed", "kv_heads"), use_bias=True, **linear)
        self.v_proj = Linear(t.hidden_size, kv_heads, axes=("embed", "kv_heads"), use_bias=True, **linear)
        self.o_proj = Linear(heads, t.hidden_size, axes=("heads", "embed"), use_bias=False, **linear)
        self.head_dim = t.head_dim
        self.attention_block = config.attention_block

    def __call__(self, x, cos, sin, mask) -> tuple[jax.Array, KeysValues]:
        """Self-attention output and the keys and values of x's tokens: the T tokens of x
        attend causally to each other's keys where `mask` (B, T) is True
        (`attention.causal_attention`), or, `mask` a `packed.TokenTree`, each row being
        packed sequences, to the keys of their own sequence and branch (`packed.tree_attention`)."""
        q, k, v = self._project(x, cos, sin)
        attend = tree_attention if isinstance(mask, TokenTree) else causal_attention
        return self.o_proj(attend(q, k, v, mask, self.attention_block)), (k, v)

    def after_prefix(self, x, cos, sin, mask, prefix: KeysValues) -> tuple[jax.Array, KeysValues]:
        """As `__call__`, x's tokens also attending to `prefix`: the keys and values
        (B, P, Hkv, hd) of the P tokens before them (run elsewhere, rotary applied); `mask`
        (B, P + T) covers both. The keys and values returned are x's own."""
        q, k, v = self._project(x, cos, sin)
        keys, values = (jnp.concatenate([before, own], axis=1) for before, own in zip(prefix, (k, v)))
        return self.o_proj(causal_attention(q, keys, values, mask, self.attention_block)), (k, v)

    def decode_step(self, x, cos, sin, cache: LayerDecodeCache, index: jax.Array) -> tuple[jax.Array, KeysValues]:
        """One new token per sample (T = 1) attending to its layer's decode cache
        (`attend_to_cache`): its key and value are written at slot `index` of the last
        response block, which comes back."""
        q, k, v = self._project(x, cos, sin)
        keys, values = cache.response[-1]
        keys = jax.lax.dynamic_update_slice(keys, k.transpose(0, 2, 3, 1), (0, 0, 0, index))
        values = jax.lax.dynamic_update_slice(values, v.transpose(0, 2, 1, 3), (0, 0, index, 0))
        response = (*cache.response[:-1], (keys, values))
        attended = attend_to_cache(q, cache.prompt, cache.prompt_mask, response, cache.response_mask)
        return self.o_proj(attended), (keys, values)

    def _project(self, x, cos, sin) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys (rotary applied) and values of x (B, T, D), each (B, T, heads, hd)."""
        batch, length, _ = x.shape
        split = lambda y, heads: constrain(y.reshape(batch, length, -1, self.head_dim), "batch", None, heads, None)
        q = apply_rotary(split(self.q_proj(x), "act_heads"), cos, sin)
        k = apply_rotary(split(self.k_proj(x), "act_kv_heads"), cos, sin)
        return q, k, split(self.v_proj(x), "act_kv_heads")


class DecoderLayer(nnx.Module):
    def __init__(self, config: Qwen2_5_VLConfig, rngs: nnx.Rngs):
        t, pdt = config.text, config.jnp_param_dtype
        self.input_layernorm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, param_dtype=pdt)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, param_dtype=pdt)
        self.self_attn = TextAttention(config, rngs)
        self.mlp = GatedMLP(
            t.hidden_size,
            t.intermediate_size,
            act=t.hidden_act,
            use_bias=False,
            param_dtype=pdt,
            dtype=config.jnp_dtype,
            rngs=rngs,
        )

    def __call__(self, x, cos, sin, mask) -> tuple[jax.Array, KeysValues]:
        """The layer's output and its keys and values (see `TextAttention.__call__`)."""
        return self._around_attention(x, lambda h: self.self_attn(h, cos, sin, mask))

    def after_prefix(self, x, cos, sin, mask, prefix: KeysValues) -> tuple[jax.Array, KeysValues]:
        """The layer's output and x's keys and values (see `TextAttention.after_prefix`)."""
        return self._around_attention(x, lambda h: self.self_attn.after_prefix(h, cos, sin, mask, prefix))

    def decode_step(self, x, cos, sin, cache: LayerDecodeCache, index: jax.Array) -> tuple[jax.Array, KeysValues]:
        """The layer's output and its last response block (see `TextAttention.decode_step`)."""
        return self._around_attention(x, lambda h: self.self_attn.decode_step(h, cos, sin, cache, index))

    @jax.named_scope("decoder_layer")
    def _around_attention(self, x, attend) -> tuple[jax.Array, KeysValues]:
        with jax.named_scope("attention"):
            attended, keys_values = attend(self.input_layernorm(x))
            x = x + attended
        with jax.named_scope("mlp"):
            x = residual(x + self.mlp(self.post_attention_layernorm(x)))
        return x, keys_values


def residual(x: jax.Array) -> jax.Array:
    """The residual stream (B, T, D): rows split over the batch axes, the model dim whole."""
    return constrain(x, "batch", "length", "act_embed")


class TextModel(nnx.Module):
    """Embeddings, scanned decoder layers and the final norm (no lm_head)."""

    def __init__(self, config: Qwen2_5_VLConfig, rngs: nnx.Rngs):
        t = config.text
        self.config = config
        self.embed_tokens = param(
            normal_init()(rngs.params(), (t.vocab_size, t.hidden_size), config.jnp_param_dtype), ("vocab", "embed")
        )
        self.layers = stacked(lambda r: DecoderLayer(config, r), t.num_hidden_layers, rngs)
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, param_dtype=config.jnp_param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        # The table whole along the model dim first (an all-gather over fsdp, as for every
        # weight): a lookup into a table split on both axes makes the compiler replicate it.
        table = constrain(self.embed_tokens[...], "vocab", None)
        return residual(jnp.take(table, input_ids, axis=0).astype(self.config.jnp_dtype))

    def __call__(self, embeddings: jax.Array, position_ids: jax.Array, attention_mask) -> jax.Array:
        """Final hidden states (B, T, D). Causal attention over unmasked keys (attention_mask
        (B, T)), or over a `packed.TokenTree` (packed sequences)."""
        cos, sin = mrope_cos_sin(self.config.text, position_ids, self.config.jnp_dtype)
        run_layer = lambda layer, h, _: layer(h, cos, sin, attention_mask)[0]
        x = scan_layers(self.layers, embeddings, None, run_layer, self.config.remat, self.config.layer_loop)
        return self.norm(x)

    def response_window(
        self, embeddings: jax.Array, position_ids: jax.Array, attention_mask: jax.Array, window: int, shared: int
    ) -> jax.Array:
        """Final hidden states (B, window, D) at positions T - window - 1 .. T - 2, the ones that
        predict the last `window` tokens; each run of `shared` consecutive rows has the same
        first T - window tokens (a prompt and its samples), which run once for the run.

        Those prompt columns of each run's first row go through every layer on their own; the
        rest of every row attends to its run's prompt keys and values (repeated per row, and
        their gradients summed back) and causally to its own. Causal attention makes this
        the full forward's result: a prompt token never sees what follows it. With G samples
        per prompt, the decoder runs a prompt once instead of G times, forward and backward.
        """
        batch, length = embeddings.shape[:2]
        prompt_length = length - window
        leaders = lambda a, axis: jax.lax.index_in_dim(
            a.reshape(*a.shape[:axis], batch // shared, shared, *a.shape[axis + 1 :]), 0, axis + 1, keepdims=False
        )
        per_row = lambda a: jnp.repeat(a, shared, axis=0)
        prompt = residual(leaders(embeddings[:, :prompt_length], 0))
        prompt_rotary = mrope_cos_sin(self.config.text, leaders(position_ids[..., :prompt_length], 1), prompt.dtype)
        prompt_mask = leaders(attention_mask[:, :prompt_length], 0)
        # The last token predicts nothing: only the columns before it run.
        rest = embeddings[:, prompt_length:-1]
        rest_rotary = mrope_cos_sin(self.config.text, position_ids[..., prompt_length:-1], rest.dtype)
        rest_mask = attention_mask[:, :-1]

        def run_layer(layer, carry, _):
            prompt, rest = carry
            prompt, (keys, values) = layer(prompt, *prompt_rotary, prompt_mask)
            rest, _ = layer.after_prefix(rest, *rest_rotary, rest_mask, (per_row(keys), per_row(values)))
            return prompt, rest

        prompt, rest = scan_layers(
            self.layers, (prompt, rest), None, run_layer, self.config.remat, self.config.layer_loop
        )
        return self.norm(jnp.concatenate([per_row(prompt[:, -1:]), rest], axis=1))

    def prefill(self, embeddings, position_ids, attention_mask) -> tuple[jax.Array, KVCache]:
        """Final hidden states of the prompt (B, T, D), and its keys and values (T slots)."""
        cos, sin = mrope_cos_sin(self.config.text, position_ids, self.config.jnp_dtype)
        x, (keys, values) = scan_layers_with_outputs(
            self.layers,
            embeddings,
            None,
            lambda layer, h, _: layer(h, cos, sin, attention_mask),
            layer_loop=self.config.layer_loop,
        )
        keys, values = keys.transpose(0, 1, 3, 4, 2), values.transpose(0, 1, 3, 2, 4)
        return self.norm(x), KVCache(keys=tuple(keys), values=tuple(values))

    def decoding_layers(self) -> list[DecoderLayer]:
        """The decoder layers as separate modules, for `decode`.

        Take them once, outside the decode loop: indexing the stacked weights inside it copies
        every layer's weights at every step on CPU. Taken in a jitted function, they are one
        copy of the decoder's weights for as long as it runs (of this device's slices: gather
        them after, not the stack before).
        """
        return unstacked(self.layers, self.config.text.num_hidden_layers)

    def decode(
        self,
        layers: Sequence[DecoderLayer],
        embeddings: jax.Array,
        position_ids: jax.Array,
        prompt: KVCache,
        prompt_mask: jax.Array,
        response: Sequence[KVCache],
        response_mask: jax.Array,
        index: jax.Array,
    ) -> tuple[jax.Array, tuple[KVCache, ...]]:
        """One new token per sample (B, 1, D), written at slot `index` of the response cache's last block.

        It attends to its prompt's cache where prompt_mask (P, T) is True (B = P x G samples,
        row p * G + g of prompt p), to every slot of its own response cache's earlier blocks,
        and to the last block where response_mask (B, S) is True (its own slot included): the
        blocks after the one being written are not passed, so not read. Returns its final
        hidden state (B, 1, D) and the response blocks, the last one updated.
        """
        cos, sin = mrope_cos_sin(self.config.text, position_ids, self.config.jnp_dtype)
        x, keys, values = embeddings, [], []
        for i, (layer, prompt_keys, prompt_values) in enumerate(zip(layers, prompt.keys, prompt.values)):
            blocks = tuple((block.keys[i], block.values[i]) for block in response)
            cache = LayerDecodeCache((prompt_keys, prompt_values), prompt_mask, blocks, response_mask)
            x, (layer_keys, layer_values) = layer.decode_step(x, cos, sin, cache, index)
            keys.append(layer_keys)
            values.append(layer_values)
        return self.norm(x), (*response[:-1], KVCache(keys=tuple(keys), values=tuple(values)))
