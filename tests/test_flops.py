"""The FLOP counts of vppo_jax/flops.py against the matrix multiplications the model's code
actually traces: every dot_general of the jaxpr, counted by shape (scans times their length).

The code computes dense attention for short sequences (all T keys, the causal half masked)
and the vision tower's full blocks over whole windows, so shapes are chosen where the
traced work is the counted work, or the difference is written out."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from vppo_jax import flops
from vppo_jax.models.qwen2_5_vl import abstract_model, preset
from vppo_jax.models.qwen2_5_vl.text import KVCache
from vppo_jax.plan import abstract_batch


def traced_matmul_flops(function, *args) -> float:
    """2 x multiply-adds of every dot_general `function` traces, scan bodies times their length,
    the costliest branch of a cond."""

    def count(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                # Every output element is one dot product over the contracted dimensions.
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
            if eqn.primitive.name == "cond":  # one branch runs (the attention kernel per platform): the costliest
                total += max(count(branch.jaxpr) for branch in eqn.params["branches"])
                continue
            repeat = eqn.params["length"] if eqn.primitive.name == "scan" else 1
            for param in eqn.params.values():  # the bodies of pjit, scan, remat, custom_vjp, ...
                for inner in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(inner, "jaxpr", inner)
                    if hasattr(inner, "eqns"):
                        total += repeat * count(inner)
        return total

    return count(jax.make_jaxpr(function)(*args).jaxpr)


@pytest.fixture(scope="module")
def config():
    return preset("7b").with_precision("bfloat16").with_compute(remat="none", attention_block=4096)


def test_vision_tower(config):
    """One 448 x 448 image: 32 x 32 patches, 16 windows of 64, the full blocks over all 1024."""
    grid = (1, 32, 32)
    inputs = abstract_batch(config, 1, 8, grid)
    graphdef, state = nnx.split(abstract_model(config))
    tower = lambda s, vision: nnx.merge(graphdef, s).visual(vision)
    traced = traced_matmul_flops(tower, state, inputs.vision)
    assert traced == pytest.approx(flops.vision_flops(config.vision, 1024), rel=1e-9)


def test_decoder_sequence_and_decode_step(config):
    text, length = config.text, 256
    graphdef, state = nnx.split(abstract_model(config))
    model = lambda s: nnx.merge(graphdef, s).language_model
    embeddings = jax.ShapeDtypeStruct((1, length, text.hidden_size), np.float32)
    positions = jax.ShapeDtypeStruct((3, 1, length), np.int32)
    mask = jax.ShapeDtypeStruct((1, length), np.bool_)
    traced = traced_matmul_flops(lambda s, e, p, m: model(s)(e, p, m), state, embeddings, positions, mask)
    # The dense attention of a short sequence also multiplies the masked (future) keys.
    query = text.num_attention_heads * text.head_dim
    masked_keys = length * length - length * (length + 1) / 2
    masked = 2 * text.num_hidden_layers * 2 * query * masked_keys
    assert traced == pytest.approx(flops.decoder_sequence_flops(text, length) + masked, rel=1e-9)

    # One decode step reads its prompt's cache (T slots) and its own response cache (one block
    # of S slots, read whole): the token at position T + S - 1.
    prompt_slots, response_slots = 200, 100
    layers = range(text.num_hidden_layers)
    per_layer = lambda shape: tuple(jax.ShapeDtypeStruct(shape, config.jnp_dtype) for _ in layers)
    kv_heads, head_dim = text.num_key_value_heads, text.head_dim
    cache = lambda slots: KVCache(per_layer((1, kv_heads, head_dim, slots)), per_layer((1, kv_heads, slots, head_dim)))

    def decode(s, tokens, position, prompt, prompt_mask, response, response_mask):
        full = nnx.merge(graphdef, s)
        layers = full.language_model.decoding_layers()
        args = (tokens, position, prompt, prompt_mask, (response,), response_mask, response_slots - 1)
        return full.decode_step(layers, *args)

    traced = traced_matmul_flops(
        decode,
        state,
        jax.ShapeDtypeStruct((1,), np.int32),
        jax.ShapeDtypeStruct((3, 1, 1), np.int32),
        cache(prompt_slots),
        jax.ShapeDtypeStruct((1, prompt_slots), np.bool_),
        cache(response_slots),
        jax.ShapeDtypeStruct((1, response_slots), np.bool_),
    )
    start = prompt_slots + response_slots - 1
    expected = flops.decoder_sequence_flops(text, 1, start=start) + flops.vocabulary_flops(text, 1)
    assert traced == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("prompt_run", [1, 2])
def test_step_phases_add_up(config, prompt_run):
    shape = flops.StepShape(
        prompts=4,
        group_size=2,
        prompt_tokens=100,
        image_patches=256,
        response_tokens=50,
        scoring_forwards=1,
        perturbed_forwards=1,
        prompt_run=prompt_run,
    )
    phases = flops.step_flops(config, shape)
    vision = flops.vision_flops(config.vision, 256)
    prompt = flops.decoder_sequence_flops(config.text, 100)
    whole_row = vision + flops.decoder_sequence_flops(config.text, 150) + flops.vocabulary_flops(config.text, 50)
    # A forward with the original images runs a prompt's decoder part once for its 2 samples
    # when they share a run (every row's image still goes through the vision tower); a
    # perturbed forward runs every row whole (each sample has its own perturbed image).
    original = 8 * whole_row - (4 * prompt if prompt_run == 2 else 0)
    assert phases["update"] == pytest.approx(3 * original)
    assert phases["score rollouts"] == pytest.approx(original + 8 * whole_row)
    # Prefill and decode together run each sample's tokens once but the last (sampled, never
    # fed back); vision, prompt and the first token's distribution once per prompt.
    one_sample = flops.decoder_sequence_flops(config.text, 149) + flops.vocabulary_flops(config.text, 49)
    per_prompt = vision + flops.vocabulary_flops(config.text, 1)
    assert phases["rollout prefill"] + phases["rollout decode"] == pytest.approx(
        4 * (per_prompt + prompt) + 8 * (one_sample - prompt)
    )
