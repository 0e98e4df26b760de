"""The Qwen2.5-VL vision tower: patch embedding, 2D rotary, window/full attention blocks, merger.

It runs on the slot layout of `inputs.vision_inputs`: S patch slots grouped in windows of
`window_units**2 * 4` slots. Window layers attend inside a window; the layers listed in
`fullatt_block_indexes` attend over the whole frame (same segment id), reading only the
windows of that frame: densely when a frame's look-ahead holds at most `attention_block`
slots, else window by window with attention.py's online softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vppo_jax.models.qwen2_5_vl.attention import block_attention
from vppo_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from vppo_jax.models.qwen2_5_vl.inputs import VisionInputs
from vppo_jax.models.qwen2_5_vl.layers import (
    ACTIVATIONS,
    GatedMLP,
    Linear,
    RMSNorm,
    activate,
    apply_rotary,
    attention,
    scan_layers_by_kind,
    stacked,
)
from vppo_jax.parallel.sharding import constrain

VISION_NORM_EPS = 1e-6  # hard-coded in transformers, not read from the config


class VisionAttention(nnx.Module):
    def __init__(self, config: Qwen2_5_VLConfig, rngs: nnx.Rngs):
        vcfg = config.vision
        linear = dict(use_bias=True, param_dtype=config.jnp_param_dtype, dtype=config.jnp_dtype, rngs=rngs)
        # One fused projection to q, k and v: heads on its output; proj consumes the heads.
        self.qkv = Linear(vcfg.hidden_size, 3 * vcfg.hidden_size, axes=("embed", "heads"), **linear)
        self.proj = Linear(vcfg.hidden_size, vcfg.hidden_size, axes=("heads", "embed"), bias_axes=(None,), **linear)
        self.num_heads = vcfg.num_heads
        self.window_slots = vcfg.window_units**2 * vcfg.merge_unit
        # A look-ahead of more patch slots than this runs the blockwise full attention (attention.py).
        self.attention_block = config.attention_block

    def __call__(self, x, cos, sin, vision: VisionInputs, full: bool) -> jax.Array:
        slots = x.shape[0]
        q, k, v = jnp.split(self.qkv(x).reshape(slots, 3 * self.num_heads, -1), 3, axis=1)
        q, k, v = (constrain(a, "batch", "act_heads", None) for a in (q, k, v))
        # The rotation runs in fp32 whatever the compute dtype (as in transformers).
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(x.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(x.dtype)

        windows = slots // self.window_slots
        blocks = lambda a: jnp.asarray(a).reshape(windows, self.window_slots, *a.shape[1:])

        def full_attention():
            # A frame fills consecutive windows, so each query window attends over the `span`
            # windows from its frame's first: the cost grows with frame size, not batch size.
            # Past the last window the index wraps around to windows of earlier frames, which
            # the segment ids mask; with span <= windows no window is read twice.
            span = vision.frame_windows or windows
            segments = blocks(vision.segment_ids)
            frame = jnp.where(segments.max(axis=1) < 0, windows, segments.max(axis=1))  # frames ascend, padding last
            ahead = (jnp.searchsorted(frame, frame, side="left")[:, None] + jnp.arange(span)) % windows
            if span * self.window_slots > self.attention_block:
                # Windows as blocks: every query window at once, one of its frame's windows per step.
                keys = blocks(k), blocks(v), ahead.T[None], blocks(vision.slot_valid)
                return block_attention(blocks(q)[None], *keys, segments=(segments[None], segments)).reshape(slots, -1)
            gather = lambda a: blocks(a)[ahead].reshape(windows, -1, *a.shape[1:])  # (windows, span * slots, ...)
            mask = (segments[:, :, None] == gather(vision.segment_ids)[:, None, :]) & gather(vision.slot_valid)[:, None]
            return attention(blocks(q), gather(k), gather(v), mask).reshape(slots, -1)

        def window_attention():
            valid = blocks(vision.slot_valid)
            mask = jnp.broadcast_to(valid[:, None, :], (windows, self.window_slots, self.window_slots))
            return attention(blocks(q), blocks(k), blocks(v), mask).reshape(slots, -1)

        return self.proj(full_attention() if full else window_attention())


class VisionBlock(nnx.Module):
    def __init__(self, config: Qwen2_5_VLConfig, rngs: nnx.Rngs):
        vcfg, pdt = config.vision, config.jnp_param_dtype
        self.norm1 = RMSNorm(vcfg.hidden_size, eps=VISION_NORM_EPS, param_dtype=pdt)
        self.norm2 = RMSNorm(vcfg.hidden_size, eps=VISION_NORM_EPS, param_dtype=pdt)
        self.attn = VisionAttention(config, rngs)
        self.mlp = GatedMLP(
            vcfg.hidden_size,
            vcfg.intermediate_size,
            act=vcfg.hidden_act,
            use_bias=True,
            param_dtype=pdt,
            dtype=config.jnp_dtype,
            rngs=rngs,
        )

    @jax.named_scope("vision_block")
    def __call__(self, x, cos, sin, vision: VisionInputs, full: bool) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, vision, full)
        # Patch slots split like rows, the model dim whole.
        return constrain(x + self.mlp(self.norm2(x)), "batch", "act_embed")


class PatchMerger(nnx.Module):
    """RMSNorm, then 4 consecutive slots (one 2 x 2 unit) concatenated, Linear-GELU-Linear."""

    def __init__(self, config: Qwen2_5_VLConfig, rngs: nnx.Rngs):
        vcfg, pdt, dt = config.vision, config.jnp_param_dtype, config.jnp_dtype
        merged = vcfg.hidden_size * vcfg.merge_unit
        self.ln_q = RMSNorm(vcfg.hidden_size, eps=VISION_NORM_EPS, param_dtype=pdt)
        linear = dict(use_bias=True, param_dtype=pdt, dtype=dt, rngs=rngs)
        self.fc1 = Linear(merged, merged, axes=("embed", "mlp"), **linear)
        self.fc2 = Linear(merged, vcfg.out_hidden_size, axes=("mlp", "embed"), bias_axes=(None,), **linear)

    @jax.named_scope("merger")
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(x.shape[0] // 4, -1)
        return self.fc2(activate(ACTIVATIONS["gelu"], self.fc1(x)))


class VisionTower(nnx.Module):
    def __init__(self, config: Qwen2_5_VLConfig, rngs: nnx.Rngs):
        vcfg = config.vision
        self.config = config
        # Conv3d with kernel == stride over a flattened patch is a matmul with the flattened kernel.
        self.patch_embed = Linear(
            vcfg.patch_dim,
            vcfg.hidden_size,
            axes=(None, "embed"),
            use_bias=False,
            param_dtype=config.jnp_param_dtype,
            dtype=config.jnp_dtype,
            rngs=rngs,
        )
        self.blocks = stacked(lambda r: VisionBlock(config, r), vcfg.depth, rngs)
        self.merger = PatchMerger(config, rngs)

    def rotary(self, rotary_hw: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Axial 2D rotary: head_dim/4 frequencies for rows, as many for columns, in fp32."""
        vcfg = self.config.vision
        quarter = vcfg.head_dim // 2
        inv_freq = 1.0 / vcfg.rope_theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter)
        angles = rotary_hw.astype(jnp.float32)[:, :, None] * inv_freq  # (S, 2, head_dim/4)
        angles = angles.reshape(angles.shape[0], -1)
        angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :]  # broadcast over heads
        return jnp.cos(angles), jnp.sin(angles)

    @jax.named_scope("vision_tower")
    def __call__(self, vision: VisionInputs) -> jax.Array:
        """Merged features, one row per unit slot: (S / 4, out_hidden_size)."""
        vcfg = self.config.vision
        x = constrain(self.patch_embed(vision.patches), "batch", "act_embed")
        cos, sin = self.rotary(vision.rotary_hw)
        # Whether each block attends over whole frames: static, so that window and full blocks
        # run in separate scans and each keeps only its own residuals for the backward.
        is_full = [i in vcfg.fullatt_block_indexes for i in range(vcfg.depth)]
        run_block = lambda block, h, full: block(h, cos, sin, vision, full)
        x = scan_layers_by_kind(self.blocks, x, is_full, run_block, self.config.remat, self.config.layer_loop)
        return self.merger(x)
