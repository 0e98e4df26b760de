"""The vision tower's window and full-attention blocks run in separate scans (layers.scan_layers_by_kind):
the arrangement, gradients equal to a plain loop over the blocks, and what the backward keeps.
Its full attention window by window (attention.block_attention) against the dense per-frame one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vppo_jax.models.qwen2_5_vl import abstract_model, init_model, preset, with_config
from vppo_jax.models.qwen2_5_vl.inputs import prepare_inputs, vision_inputs
from vppo_jax.models.qwen2_5_vl.layers import layer_groups, unstacked
from vppo_jax.plan import abstract_batch, image_grid

from hf_reference import processor_batch, text_ids

W, F = False, True  # a windowed block, a full-attention block


@pytest.mark.parametrize(
    "kinds, arrangement",
    [
        ([W] * 7 + [F], (((W, 7), (F, 1)), 1, ())),
        (([W] * 7 + [F]) * 4, (((W, 7), (F, 1)), 4, ())),  # Qwen2.5-VL: 2 bodies, not 8
        ([F, W] * 2, (((F, 1), (W, 1)), 2, ())),
        ([W, W, F, W, W, F, W], (((W, 2), (F, 1)), 2, ((W, 1),))),  # a trailing run of window blocks
        ([W, W], (((W, 2),), 1, ())),
        ([F, W, W, F, W, W, W, F], (((F, 1), (W, 2), (F, 1), (W, 3), (F, 1)), 1, ())),  # not periodic: one run each
    ],
)
def test_layer_groups(kinds, arrangement):
    assert layer_groups(kinds) == arrangement


def tower_config(depth, full, **compute):
    return preset("test", vision=dict(depth=depth, fullatt_block_indexes=full)).with_compute(**compute)


def looped_tower(tower, vision):
    """The reference: the blocks one by one in a Python loop."""
    vcfg = tower.config.vision
    x = tower.patch_embed(vision.patches)
    cos, sin = tower.rotary(vision.rotary_hw)
    for i, block in enumerate(unstacked(tower.blocks, vcfg.depth)):
        x = block(x, cos, sin, vision, i in vcfg.fullatt_block_indexes)
    return tower.merger(x)


@pytest.mark.parametrize("remat, layer_loop", [("none", "scan"), ("full", "unroll")])
def test_gradients_equal_a_loop_over_the_blocks(remat, layer_loop):
    config = tower_config(7, (2, 5), remat=remat, layer_loop=layer_loop)
    tower = init_model(config, seed=3).visual
    vision = prepare_inputs(config, **processor_batch([(text_ids(4, 1), [(112, 168)]), (text_ids(4, 2), [(56, 84)])]))
    vision = vision.vision
    graphdef, params = nnx.split(tower, nnx.Param)

    def gradient(forward):
        loss = lambda p: (forward(nnx.merge(graphdef, p), vision) ** 2).sum()
        return jax.jit(jax.value_and_grad(loss))(params)

    (scanned_loss, scanned), (looped_loss, looped) = gradient(lambda t, v: t(v)), gradient(looped_tower)
    np.testing.assert_allclose(scanned_loss, looped_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(looped), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def gradient_temporaries(config, pixels) -> int:
    graphdef, params = nnx.split(abstract_model(config).visual, nnx.Param)
    vision = abstract_batch(config, 1, 1, image_grid(config, pixels)).vision
    loss = lambda p, v: (nnx.merge(graphdef, p)(v) ** 2).sum()
    return jax.jit(jax.grad(loss)).lower(params, vision).compile().memory_analysis().temp_size_in_bytes


def test_window_blocks_keep_no_full_attention_residuals():
    """One 448 x 448 image: 16 windows of 64 patches, so a full-attention block's dense scores
    (1024 x 1024 per head, the attention block raised to keep them dense) are 16 times a window
    block's. With one full-attention block in 8, the gradient's temporaries must stay well below
    those with 8 (measured 62 and 211 MiB, 33 with none): under a `lax.cond` in one scan every
    block kept the full branch's residuals, and the two were the same (268 MiB)."""
    pixels = 448 * 448
    one = gradient_temporaries(tower_config(8, (7,), attention_block=1024), pixels)
    eight = gradient_temporaries(tower_config(8, tuple(range(8)), attention_block=1024), pixels)
    assert one < eight / 2, (one, eight)


def test_blockwise_full_attention_never_forms_the_frames_scores():
    """One 896 x 896 image, one frame of 64 windows (4096 patch slots): the dense per-frame
    attention's scores are 128 MiB (2 heads x 4096 x 4096 in fp32). The tower's gradient needs
    597 MiB of temporaries with it, 34 MiB window by window (the default attention block)."""
    pixels, scores = 896 * 896, 2 * 4096**2 * 4
    assert gradient_temporaries(tower_config(2, (1,), attention_block=4096), pixels) > 2 * scores
    assert gradient_temporaries(tower_config(2, (1,)), pixels) < scores / 2


def frames_and_padding():
    """Three frames in 22 windows of 64 slots, padded to 32: 15 full windows (24 x 40 patches),
    6 windows of which 4 are part-filled (12 x 20 patches), and 1 part-filled window (4 x 4)
    last, whose look-ahead of 16 windows wraps around to the first frame's."""
    vcfg = preset("test").vision
    grid = np.array([(1, 24, 40), (1, 12, 20), (1, 4, 4)])
    pixels = np.random.default_rng(0).normal(size=(int(np.prod(grid, axis=1).sum()), vcfg.patch_dim))
    vision = vision_inputs(vcfg, pixels.astype(np.float32), grid)[0]
    assert (vision.frame_windows, vision.slot_valid.size // 64) == (16, 32)
    return vision


def test_blockwise_full_attention_equals_the_dense_one():
    """Forward and gradients (of the attention's parameters and input) in fp32, at the real
    patch slots: padding slots attend to nothing and no real token reads them."""
    vision = frames_and_padding()
    model = init_model(tower_config(2, (1,)), seed=5)
    real = np.asarray(vision.slot_valid)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(real.size, 32)), jnp.float32)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(real.size, 32)), jnp.float32) * real[:, None]

    def attend(attention_block):
        tower = with_config(model, model.config.with_compute(attention_block=attention_block)).visual
        graphdef, params = nnx.split(unstacked(tower.blocks, 2)[1].attn, nnx.Param)
        cos, sin = tower.rotary(vision.rotary_hw)
        forward = lambda p, x: nnx.merge(graphdef, p)(x, cos, sin, vision, True)
        gradients = jax.grad(lambda p, x: (forward(p, x) * weights).sum(), argnums=(0, 1))(params, x)
        return np.asarray(forward(params, x))[real], jax.tree.leaves(gradients)

    (blockwise, blockwise_gradients), (dense, dense_gradients) = attend(512), attend(16 * 64)
    assert np.abs(blockwise - dense).max() <= 1e-5 * np.abs(dense).max()
    for a, b in zip(blockwise_gradients, dense_gradients, strict=True):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(b)).max()
