"""Qwen2.5-VL for conditional generation: vision tower + text decoder + lm_head."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vppo_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from vppo_jax.models.qwen2_5_vl.inputs import ModelInputs, prepare_inputs
from vppo_jax.models.qwen2_5_vl.layers import normal_init, param
from vppo_jax.models.qwen2_5_vl.packed import TokenTree
from vppo_jax.models.qwen2_5_vl.text import DecoderLayer, KVCache, TextModel
from vppo_jax.models.qwen2_5_vl.vision import VisionTower
from vppo_jax.parallel import sharding


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
    def __init__(self, config: Qwen2_5_VLConfig, *, rngs: nnx.Rngs):
        t = config.text
        self.config = config
        self.visual = VisionTower(config, rngs)
        self.language_model = TextModel(config, rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else param(
                normal_init()(rngs.params(), (t.hidden_size, t.vocab_size), config.jnp_param_dtype), ("embed", "vocab")
            )
        )

    def unembedding(self) -> jax.Array:
        """The (hidden, vocab) matrix that maps final hidden states to logits, in the compute dtype."""
        matrix = self.language_model.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return matrix.astype(self.config.jnp_dtype)

    def input_embeddings(self, inputs: ModelInputs) -> jax.Array:
        """Token embeddings with the merged image features scattered at the image tokens."""
        embeddings = self.language_model.embed(inputs.input_ids)
        if inputs.vision is None:
            return embeddings
        features = self.visual(inputs.vision).astype(embeddings.dtype)
        is_image = inputs.input_ids == self.config.image_token_id
        return jnp.where(is_image[..., None], features[inputs.image_token_slot], embeddings)

    def hidden_states(self, inputs: ModelInputs) -> jax.Array:
        """Final normalised hidden states (B, T, D) at every position."""
        return self.language_model(self.input_embeddings(inputs), inputs.position_ids, inputs.attention_mask)

    def packed_hidden_states(self, inputs: ModelInputs, tree: TokenTree) -> jax.Array:
        """Final hidden states (K, N, D) at every position of K bins of packed sequences
        (packed.py; built on the host by vppo_jax/vppo/packing.py): `inputs` hold the bins as
        rows, each token with its own sequence's M-RoPE positions, the bins' images in one
        slot layout."""
        return self.language_model(self.input_embeddings(inputs), inputs.position_ids, tree)

    def response_hidden_states(self, inputs: ModelInputs, window: int, prompt_group: int = 1) -> jax.Array:
        """Final hidden states (B, window, D) at the positions that predict the last `window`
        tokens of each row: what the losses and scores project onto the vocabulary.

        prompt_group: rows come in runs of that many sharing their first T - window tokens
        (a prompt's samples, checked on the host by `build_train_batch`); each run's prompt
        goes through the decoder once (`TextModel.response_window`), in runs that stay within
        one device's rows.
        """
        shared = prompt_run(prompt_group, inputs.input_ids.shape[0], jax.sharding.get_abstract_mesh())
        return self.language_model.response_window(
            self.input_embeddings(inputs), inputs.position_ids, inputs.attention_mask, window, shared
        )

    def logits(self, inputs: ModelInputs) -> jax.Array:
        return self.lm_head_logits(self.hidden_states(inputs))

    @jax.named_scope("lm_head")
    def lm_head_logits(self, hidden: jax.Array) -> jax.Array:
        """Logits (..., V) of final hidden states (..., D), in their dtype."""
        return jnp.dot(hidden, self.unembedding().astype(hidden.dtype))

    def prefill(self, inputs: ModelInputs) -> tuple[jax.Array, KVCache]:
        """Logits (B, V) after the last prompt token and the prompt's KV cache (T slots).

        Prompts must be left-padded, so that the last position is a real token in every row.
        """
        embeddings = self.input_embeddings(inputs)
        hidden, cache = self.language_model.prefill(embeddings, inputs.position_ids, inputs.attention_mask)
        return self.lm_head_logits(hidden[:, -1]), cache

    def decode_step(
        self,
        layers: list[DecoderLayer],
        tokens: jax.Array,
        position_ids: jax.Array,
        prompt: KVCache,
        prompt_mask: jax.Array,
        response: Sequence[KVCache],
        response_mask: jax.Array,
        index: jax.Array,
    ) -> tuple[jax.Array, tuple[KVCache, ...]]:
        """Logits (B, V) after one text token per sample (B,) written at slot `index` of the
        response cache's last block; the response blocks come back, the last one updated.

        position_ids (3, B, 1): its M-RoPE position; the caches and masks as
        `TextModel.decode` takes them (the prompts' shared by each prompt's samples);
        layers: `self.language_model.decoding_layers()`, taken once outside the decode loop.
        """
        embeddings = self.language_model.embed(tokens[:, None])
        hidden, response = self.language_model.decode(
            layers, embeddings, position_ids, prompt, prompt_mask, response, response_mask, index
        )
        return self.lm_head_logits(hidden[:, 0]), response

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
    ) -> jax.Array:
        """Logits (B, T, V) from the arrays an HF processor returns, like transformers' forward."""
        inputs = prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids)
        return _jitted_logits(self, inputs)


def prompt_run(prompt_group: int, rows: int, mesh) -> int:
    """How many consecutive rows of `rows` split over `mesh`'s batch shards run their shared
    prompt once (`response_hidden_states`): runs of `prompt_group` cut to stay within one
    device's rows."""
    return math.gcd(prompt_group, rows // sharding.batch_shards(mesh))


@nnx.jit
def _jitted_logits(model: Qwen2_5_VLForConditionalGeneration, inputs: ModelInputs) -> jax.Array:
    return model.logits(inputs)


def init_model(config: Qwen2_5_VLConfig, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised model (std 0.02 normal weights, unit norms, zero biases)."""
    return Qwen2_5_VLForConditionalGeneration(config, rngs=nnx.Rngs(seed))


def abstract_model(config: Qwen2_5_VLConfig) -> Qwen2_5_VLForConditionalGeneration:
    """The model with ShapeDtypeStructs instead of arrays: shapes to check a checkpoint against."""
    return nnx.eval_shape(functools.partial(init_model, config))


def with_config(model: Qwen2_5_VLForConditionalGeneration, config: Qwen2_5_VLConfig):
    """The same parameters (not copied) in a model built for `config`, an architecture equal to
    the model's own that differs in how it computes (`Qwen2_5_VLConfig.with_compute`)."""
    if (config.vision, config.text) != (model.config.vision, model.config.text):
        raise ValueError("with_config changes how a model computes, not its architecture.")
    if config == model.config:
        return model
    return nnx.merge(nnx.graphdef(abstract_model(config)), nnx.state(model))
