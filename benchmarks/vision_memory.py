"""Compiled temporaries of the vision tower's gradient for one image on one device.

    python -m benchmarks.vision_memory [--model=7b] [--pixels=1003520] [--remat=none,full] [--attention_block=512]

Builds the tower of a preset (the released Qwen2.5-VL's: 32 blocks of 1280, full attention at
7/15/23/31) in bf16 on fp32 parameters, as the recipes compute, lowers and compiles the
gradient of its summed squared output for one square image of at most `--pixels` (the
recipes' data.max_pixels: 980 x 980) from abstract shapes (nothing is allocated), and prints
XLA's temporary-buffer size for each rematerialisation, with the preset's full-attention
layers and with none (every layer windowed): the difference is what full attention costs.
Full attention runs window by window when a frame's look-ahead (its windows, bucketed) holds
more than `--attention_block` patch slots (the recipes' model.attention_block); a block of
the frame's slots or more (8192 at 980 x 980) gives the dense per-frame attention.
"""

import dataclasses

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx

from vppo_jax.io.cli import parse_flags
from vppo_jax.models.qwen2_5_vl import abstract_model, preset
from vppo_jax.plan import abstract_batch, image_grid

GIB = 2**30
FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("model", "7b", "A preset of vppo_jax/models/qwen2_5_vl/presets.py.")
    flags.DEFINE_integer("pixels", 1280 * 28 * 28, "The image budget (the recipes' data.max_pixels).")
    flags.DEFINE_list("remat", ["none", "full"], "model.remat values to compile.")
    flags.DEFINE_integer(
        "attention_block", 512, "model.attention_block: full attention over at most this many slots is dense."
    )


def gradient_temporaries(config) -> int:
    graphdef, params = nnx.split(abstract_model(config).visual, nnx.Param)
    vision = abstract_batch(config, 1, 1, image_grid(config, FLAGS.pixels)).vision
    loss = lambda p, v: (nnx.merge(graphdef, p)(v).astype(jnp.float32) ** 2).sum()
    compiled = jax.jit(jax.grad(loss)).lower(params, vision).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = preset(FLAGS.model).with_precision("bfloat16", "float32")
    windowed = dataclasses.replace(config, vision=dataclasses.replace(config.vision, fullatt_block_indexes=()))
    _, h, w = image_grid(config, FLAGS.pixels)
    side = config.vision.patch_size
    print(
        f"{FLAGS.model} vision tower, one {h * side} x {w * side} image, full attention at "
        f"{config.vision.fullatt_block_indexes}, attention block {FLAGS.attention_block}; temporaries of the "
        "gradient, GiB"
    )
    for remat in FLAGS.remat:
        compute = dict(remat=remat, attention_block=FLAGS.attention_block)
        full = gradient_temporaries(config.with_compute(**compute)) / GIB
        none = gradient_temporaries(windowed.with_compute(**compute)) / GIB
        print(f"  remat {remat}: {full:,.1f} with the preset's full-attention layers, {none:,.1f} with none")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
