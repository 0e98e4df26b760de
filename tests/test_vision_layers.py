"""The vision tower's window and full-attention blocks run in separate scans (layers.scan_layers_by_kind):
the arrangement, gradients equal to a plain loop over the blocks, and what the backward keeps."""

import jax
import numpy as np
import pytest
from flax import nnx

from vppo_jax.models.qwen2_5_vl import abstract_model, init_model, preset
from vppo_jax.models.qwen2_5_vl.inputs import prepare_inputs
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
    """One 448 x 448 image: 16 windows of 64 patches, so a full-attention block's scores (1024 x
    1024 per head) are 16 times a window block's. With one full-attention block in 8, the
    gradient's temporaries must stay well below those with 8 (measured 62 and 211 MiB, 33 with
    none): under a `lax.cond` in one scan every block kept the full branch's residuals, and the
    two were the same (268 MiB)."""
    pixels = 448 * 448
    one = gradient_temporaries(tower_config(8, (7,)), pixels)
    eight = gradient_temporaries(tower_config(8, tuple(range(8))), pixels)
    assert one < eight / 2, (one, eight)
