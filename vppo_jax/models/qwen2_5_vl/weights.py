"""One table between our parameter paths and Hugging Face tensor names, used both ways.

Each entry names our parameter, the HF tensor (with `{i}` for a layer index when our
parameter stacks all layers on a leading axis) and a transform whose forward direction
turns the HF tensor into ours and whose inverse turns ours back, bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from vppo_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig


@dataclasses.dataclass(frozen=True)
class Transform:
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # HF shape from ours, before writing


IDENTITY = Transform(lambda a: a, lambda a: a, lambda shape: shape)
# torch Linear stores (out, in); we store (in, out).
LINEAR = Transform(lambda a: a.T, lambda a: a.T, lambda shape: shape[::-1])


def conv_as_linear(hf_shape: tuple[int, ...]) -> Transform:
    """Conv3d (D, C, T, P, P) with kernel == stride is a Linear on flattened patches."""
    return Transform(lambda a: a.reshape(a.shape[0], -1).T, lambda a: a.T.reshape(hf_shape), lambda shape: hf_shape)


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]  # our parameter path in nnx.state(model)
    hf_name: str  # legacy on-disk name; contains "{i}" when stacked
    transform: Transform
    layers: int = 0  # number of stacked layers (0: not stacked)

    def hf_names(self) -> list[str]:
        return [self.hf_name.format(i=i) for i in range(self.layers)] if self.layers else [self.hf_name]


def _linear(path: tuple[str, ...], hf: str, bias: bool, layers: int) -> list[Entry]:
    entries = [Entry(path + ("kernel",), hf + ".weight", LINEAR, layers)]
    if bias:
        entries.append(Entry(path + ("bias",), hf + ".bias", IDENTITY, layers))
    return entries


def weight_table(config: Qwen2_5_VLConfig) -> list[Entry]:
    depth, num_layers = config.vision.depth, config.text.num_hidden_layers
    vb, tl = ("visual", "blocks"), ("language_model", "layers")
    v = config.vision
    conv_shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    table = [Entry(("visual", "patch_embed", "kernel"), "visual.patch_embed.proj.weight", conv_as_linear(conv_shape))]
    for norm in ("norm1", "norm2"):
        table.append(Entry(vb + (norm, "weight"), f"visual.blocks.{{i}}.{norm}.weight", IDENTITY, depth))
    for name in ("qkv", "proj"):
        table += _linear(vb + ("attn", name), f"visual.blocks.{{i}}.attn.{name}", True, depth)
    for name in ("gate_proj", "up_proj", "down_proj"):
        table += _linear(vb + ("mlp", name), f"visual.blocks.{{i}}.mlp.{name}", True, depth)
    table.append(Entry(("visual", "merger", "ln_q", "weight"), "visual.merger.ln_q.weight", IDENTITY))
    table += _linear(("visual", "merger", "fc1"), "visual.merger.mlp.0", True, 0)
    table += _linear(("visual", "merger", "fc2"), "visual.merger.mlp.2", True, 0)

    table.append(Entry(("language_model", "embed_tokens"), "model.embed_tokens.weight", IDENTITY))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        table.append(Entry(tl + (norm, "weight"), f"model.layers.{{i}}.{norm}.weight", IDENTITY, num_layers))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        table += _linear(tl + ("self_attn", name), f"model.layers.{{i}}.self_attn.{name}", name != "o_proj", num_layers)
    for name in ("gate_proj", "up_proj", "down_proj"):
        table += _linear(tl + ("mlp", name), f"model.layers.{{i}}.mlp.{name}", False, num_layers)
    table.append(Entry(("language_model", "norm", "weight"), "model.norm.weight", IDENTITY))
    if not config.tie_word_embeddings:
        table.append(Entry(("lm_head",), "lm_head.weight", LINEAR))
    return table


# transformers 5 renames the legacy on-disk names at load time; we accept both when reading.
_HF5_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def legacy_name(name: str) -> str:
    for new, old in _HF5_PREFIXES:
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def iter_hf_names(config: Qwen2_5_VLConfig) -> Iterator[str]:
    for entry in weight_table(config):
        yield from entry.hf_names()
