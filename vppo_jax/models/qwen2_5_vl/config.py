"""Model configuration: the fields of a Hugging Face Qwen2.5-VL config.json the port uses.

Parsing goes through transformers' own `Qwen2_5_VLConfig`, so every on-disk variant it
accepts (the flat hub layout with `rope_scaling`, the nested transformers 5 layout with
`text_config`/`rope_parameters`) is read exactly as transformers reads it. The result is a
frozen, hashable dataclass so it can be a static argument of jitted functions.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# transformers says on import that it found no PyTorch; we use only its config classes, which
# need none, so that one message would only alarm (set before transformers is first imported).
logging.getLogger("transformers").addFilter(lambda record: not record.getMessage().startswith("PyTorch was not found"))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    in_channels: int = 3
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel_values row: channels x frames x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one language-model token (2 x 2)."""
        return self.spatial_merge_size**2

    @property
    def window_units(self) -> int:
        """Side of an attention window counted in merge units (112 px / 14 px / 2 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


REMAT_CHOICES = ("none", "full", "dots")  # layers.REMAT_POLICIES says what each keeps
# How the stacked layers run: one compiled layer in a loop (compile time flat at 28 or 64
# layers), or the loop unrolled (faster on a CPU, where the loop's slicing and stacking cost
# more than they do on an accelerator).
LAYER_LOOPS = ("scan", "unroll")


def check_compute(remat: str, attention_block: int, layer_loop: str = "scan"):
    """Raises ValueError naming the field for a rematerialisation, attention block or layer
    loop we do not have."""
    if remat not in REMAT_CHOICES:
        raise ValueError(f"model.remat={remat!r}; choose one of {REMAT_CHOICES}.")
    if attention_block < 1:
        raise ValueError(f"model.attention_block={attention_block} must be a positive number of tokens.")
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"model.layer_loop={layer_loop!r}; choose one of {LAYER_LOOPS}.")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    vision: VisionConfig
    text: TextConfig
    tie_word_embeddings: bool
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations
    # How the forward and backward run, not what the model is (each defaults to the plain way):
    # what the backward keeps of each layer (layers.REMAT_POLICIES), the token block of the
    # decoder's attention beyond which it never forms a (T, T) array, and the frame size in
    # patch slots beyond which the vision tower's full attention runs window by window
    # (attention.py), and whether the stacked layers run in a loop or unrolled (LAYER_LOOPS).
    remat: str = "none"
    attention_block: int = 512
    layer_loop: str = "scan"
    # The HF directory the weights came from, if any: its config.json and tokenizer files are
    # carried over on export. Not part of the model's identity (compare=False).
    source_dir: str | None = dataclasses.field(default=None, compare=False)

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def with_dtypes(self, param_dtype: str, dtype: str | None = None) -> "Qwen2_5_VLConfig":
        for name in (param_dtype, dtype or param_dtype):
            if name not in DTYPES:
                raise ValueError(f"Unknown dtype {name!r}; choose one of {sorted(DTYPES)}.")
        return dataclasses.replace(self, param_dtype=param_dtype, dtype=dtype or param_dtype)

    def with_compute(
        self, remat: str | None = None, attention_block: int | None = None, layer_loop: str | None = None
    ) -> "Qwen2_5_VLConfig":
        """This config with the given rematerialisation, attention block and layer loop (None
        keeps the current)."""
        remat, attention_block = remat or self.remat, attention_block or self.attention_block
        layer_loop = layer_loop or self.layer_loop
        check_compute(remat, attention_block, layer_loop)
        return dataclasses.replace(self, remat=remat, attention_block=attention_block, layer_loop=layer_loop)

    def with_precision(self, dtype: str | None = None, param_dtype: str | None = None) -> "Qwen2_5_VLConfig":
        """Flax's convention: `dtype` is the compute dtype, `param_dtype` the storage dtype; either
        alone sets both, and neither keeps this config's parameter dtype (the stored one)."""
        param_dtype = param_dtype or dtype or self.param_dtype
        return self.with_dtypes(param_dtype, dtype or param_dtype)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "Qwen2_5_VLConfig":
        """Builds the config from the contents of an HF config.json (any transformers layout)."""
        model_type = raw.get("model_type")
        if model_type != "qwen2_5_vl":
            raise ValueError(
                f"config.json has model_type={model_type!r}, expected 'qwen2_5_vl': this directory "
                "does not hold a Qwen2.5-VL checkpoint."
            )
        from transformers import Qwen2_5_VLConfig as HFConfig  # config classes need no torch
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # tiny test vocabularies make it warn about bos/eos ids
        try:
            hf = HFConfig(**{k: v for k, v in raw.items() if k != "transformers_version"})
        finally:
            hf_logging.set_verbosity(verbosity)
        t, v = hf.text_config, hf.vision_config
        rope = t.rope_parameters
        head_dim = t.hidden_size // t.num_attention_heads
        section = tuple(rope.get("mrope_section", (16, 24, 24)))
        if sum(section) != head_dim // 2:
            raise ValueError(f"mrope_section {section} must sum to head_dim/2 = {head_dim // 2}.")
        return cls(
            vision=VisionConfig(
                depth=v.depth,
                hidden_size=v.hidden_size,
                intermediate_size=v.intermediate_size,
                num_heads=v.num_heads,
                out_hidden_size=v.out_hidden_size,
                fullatt_block_indexes=tuple(v.fullatt_block_indexes),
                patch_size=v.patch_size,
                temporal_patch_size=v.temporal_patch_size,
                spatial_merge_size=v.spatial_merge_size,
                window_size=v.window_size,
                in_channels=v.in_channels,
                hidden_act=v.hidden_act,
                rope_theta=float((v.rope_parameters or {}).get("rope_theta", 10000.0)),
            ),
            text=TextConfig(
                vocab_size=t.vocab_size,
                hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers,
                num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads,
                rms_norm_eps=float(t.rms_norm_eps),
                rope_theta=float(rope["rope_theta"]),
                mrope_section=section,
                hidden_act=t.hidden_act,
            ),
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            image_token_id=hf.image_token_id,
            video_token_id=hf.video_token_id,
            vision_start_token_id=hf.vision_start_token_id,
            vision_end_token_id=hf.vision_end_token_id,
        )
