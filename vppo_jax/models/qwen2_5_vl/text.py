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
    masked_softmax,
    normal_init,
    param,
    scan_layers,
    scan_layers_with_outputs,
    stacked,
    unstacked,
)
from vppo_jax.parallel.sharding import constrain


@flax.struct.dataclass
class KVCache:
    """Keys and values of every decoder layer, preallocated for prompt + response slots.

    One array per layer (not stacked) and keys stored transposed: the decode loop updates
    each in place and attends with plain batched matmuls. On CPU, slicing a stacked cache
    or contracting keys over their minor axis costs more than the attention itself.
    """

    keys: tuple[jax.Array, ...]  # per layer (B, kv_heads, head_dim, S)
    values: tuple[jax.Array, ...]  # per layer (B, kv_heads, S, head_dim)


def attend_to_cache(q: jax.Array, keys: jax.Array, values: jax.Array, slot_mask: jax.Array) -> jax.Array:
    """Attention of one new token per sequence over its cache.

    q: (B, 1, H, hd); keys (B, Hkv, hd, S) and values (B, Hkv, S, hd) of one layer;
    slot_mask (B, S): the slots the token may attend to. Returns (B, 1, H * hd).
    """
    batch, _, num_heads, head_dim = q.shape
    num_kv = keys.shape[1]
    q = q.reshape(batch, num_kv, num_heads // num_kv, head_dim)
    scores = jnp.einsum("bkgd,bkds->bkgs", q, keys).astype(jnp.float32) * head_dim**-0.5
    probs = masked_softmax(scores, slot_mask[:, None, None, :])
    # Probabilities stay fp32 through the value product; only the output is rounded to the dtype.
    out = jnp.einsum("bkgs,bksd->bkgd", probs, values.astype(jnp.float32)).astype(values.dtype)
    return out.reshape(batch, 1, num_heads * head_dim)


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

    def __call__(self, x, cos, sin, mask, cache=None, index=None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Self-attention output and the keys and values attended to.

        Without a cache the T tokens of x attend causally to each other's keys where `mask`
        (B, T) is True (`attention.causal_attention`). With a layer's cache (keys, values) and
        T = 1, the token's key and value are written at slot `index` and it attends to the
        cache slots where `mask` (B, S) is True.
        """
        batch, length, _ = x.shape
        split = lambda y, heads: constrain(y.reshape(batch, length, -1, self.head_dim), "batch", None, heads, None)
        q = apply_rotary(split(self.q_proj(x), "act_heads"), cos, sin)
        k = apply_rotary(split(self.k_proj(x), "act_kv_heads"), cos, sin)
        v = split(self.v_proj(x), "act_kv_heads")
        if cache is None:
            return self.o_proj(causal_attention(q, k, v, mask, self.attention_block)), (k, v)
        keys = jax.lax.dynamic_update_slice(cache[0], k.transpose(0, 2, 3, 1), (0, 0, 0, index))
        values = jax.lax.dynamic_update_slice(cache[1], v.transpose(0, 2, 1, 3), (0, 0, index, 0))
        return self.o_proj(attend_to_cache(q, keys, values, mask)), (keys, values)


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

    def __call__(self, x, cos, sin, mask, cache=None, index=None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The layer's output and its keys and values (see `TextAttention`)."""
        attended, keys_values = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, index)
        x = x + attended
        return residual(x + self.mlp(self.post_attention_layernorm(x))), keys_values


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

    def __call__(self, embeddings: jax.Array, position_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Final hidden states (B, T, D). Causal attention over unmasked keys."""
        cos, sin = mrope_cos_sin(self.config.text, position_ids, self.config.jnp_dtype)
        run_layer = lambda layer, h, _: layer(h, cos, sin, attention_mask)[0]
        x = scan_layers(self.layers, embeddings, None, run_layer, self.config.remat, self.config.layer_loop)
        return self.norm(x)

    def prefill(self, embeddings, position_ids, attention_mask, cache_length: int) -> tuple[jax.Array, KVCache]:
        """Final hidden states of the prompt (B, T, D), and a cache of `cache_length` slots
        holding the prompt's keys and values in slots [0, T)."""
        cos, sin = mrope_cos_sin(self.config.text, position_ids, self.config.jnp_dtype)
        x, (keys, values) = scan_layers_with_outputs(
            self.layers,
            embeddings,
            None,
            lambda layer, h, _: layer(h, cos, sin, attention_mask),
            layer_loop=self.config.layer_loop,
        )
        empty_slots = cache_length - embeddings.shape[1]
        keys = jnp.pad(keys.transpose(0, 1, 3, 4, 2), [(0, 0)] * 4 + [(0, empty_slots)])
        values = jnp.pad(values.transpose(0, 1, 3, 2, 4), [(0, 0)] * 3 + [(0, empty_slots), (0, 0)])
        return self.norm(x), KVCache(keys=tuple(keys), values=tuple(values))

    def decoding_layers(self) -> list[DecoderLayer]:
        """The decoder layers as separate modules, for `decode`.

        Take them once, outside the decode loop: indexing the stacked weights inside it copies
        every layer's weights at every step on CPU. Taken in a jitted function, they are one
        copy of the decoder's weights for as long as it runs.
        """
        return unstacked(self.layers, self.config.text.num_hidden_layers)

    def decode(
        self,
        layers: Sequence[DecoderLayer],
        embeddings: jax.Array,
        position_ids: jax.Array,
        slot_mask: jax.Array,
        cache: KVCache,
        index: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """One new token per sequence (B, 1, D), written at cache slot `index`.

        It attends to the slots where slot_mask (B, S) is True (its own included). Returns
        its final hidden state (B, 1, D) and the updated cache.
        """
        cos, sin = mrope_cos_sin(self.config.text, position_ids, self.config.jnp_dtype)
        x, keys, values = embeddings, [], []
        for layer, layer_cache in zip(layers, zip(cache.keys, cache.values)):
            x, (layer_keys, layer_values) = layer(x, cos, sin, slot_mask, layer_cache, index)
            keys.append(layer_keys)
            values.append(layer_values)
        return self.norm(x), KVCache(keys=tuple(keys), values=tuple(values))
