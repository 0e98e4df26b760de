"""The Qwen2 text decoder with multimodal rotary positions (M-RoPE)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vppo_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig
from vppo_jax.models.qwen2_5_vl.layers import GatedMLP, Linear, RMSNorm, apply_rotary, attention, normal_init, scan_layers, stacked


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
        self.q_proj = Linear(t.hidden_size, t.num_attention_heads * t.head_dim, use_bias=True, **linear)
        self.k_proj = Linear(t.hidden_size, t.num_key_value_heads * t.head_dim, use_bias=True, **linear)
        self.v_proj = Linear(t.hidden_size, t.num_key_value_heads * t.head_dim, use_bias=True, **linear)
        self.o_proj = Linear(t.num_attention_heads * t.head_dim, t.hidden_size, use_bias=False, **linear)
        self.head_dim = t.head_dim

    def __call__(self, x, cos, sin, mask) -> jax.Array:
        batch, length, _ = x.shape
        split = lambda y: y.reshape(batch, length, -1, self.head_dim)
        q = apply_rotary(split(self.q_proj(x)), cos, sin)
        k = apply_rotary(split(self.k_proj(x)), cos, sin)
        return self.o_proj(attention(q, k, split(self.v_proj(x)), mask))


class DecoderLayer(nnx.Module):
    def __init__(self, config: Qwen2_5_VLConfig, rngs: nnx.Rngs):
        t, pdt = config.text, config.jnp_param_dtype
        self.input_layernorm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, param_dtype=pdt)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, param_dtype=pdt)
        self.self_attn = TextAttention(config, rngs)
        self.mlp = GatedMLP(
            t.hidden_size, t.intermediate_size, act=t.hidden_act, use_bias=False,
            param_dtype=pdt, dtype=config.jnp_dtype, rngs=rngs,
        )

    def __call__(self, x, cos, sin, mask) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nnx.Module):
    """Embeddings, scanned decoder layers and the final norm (no lm_head)."""

    def __init__(self, config: Qwen2_5_VLConfig, rngs: nnx.Rngs):
        t = config.text
        self.config = config
        self.embed_tokens = nnx.Param(normal_init()(rngs.params(), (t.vocab_size, t.hidden_size), config.jnp_param_dtype))
        self.layers = stacked(lambda r: DecoderLayer(config, r), t.num_hidden_layers, rngs)
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, param_dtype=config.jnp_param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.config.jnp_dtype)

    def __call__(self, embeddings: jax.Array, position_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Final hidden states (B, T, D). Causal attention over unmasked keys."""
        length = embeddings.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None] & attention_mask[:, None, :].astype(bool)
        cos, sin = mrope_cos_sin(self.config.text, position_ids, self.config.jnp_dtype)
        x = scan_layers(
            self.layers, embeddings, None, lambda layer, h, _: layer(h, cos, sin, mask)
        )
        return self.norm(x)
