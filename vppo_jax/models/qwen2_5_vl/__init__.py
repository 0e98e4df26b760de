"""Qwen2.5-VL in Flax NNX, numerically matching transformers' Qwen2_5_VLForConditionalGeneration.

from vppo_jax.models import qwen2_5_vl
model = qwen2_5_vl.from_pretrained("path/to/hf_dir", dtype="bfloat16")
logits = model(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids)
qwen2_5_vl.save_pretrained(model, "path/to/out")
"""

from vppo_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig, VisionConfig
from vppo_jax.models.qwen2_5_vl.hf_io import from_pretrained, save_pretrained
from vppo_jax.models.qwen2_5_vl.inputs import ModelInputs, VisionInputs, prepare_inputs, rope_index
from vppo_jax.models.qwen2_5_vl.model import (
    Qwen2_5_VLForConditionalGeneration,
    abstract_model,
    init_model,
    with_config,
)
from vppo_jax.models.qwen2_5_vl.presets import PRESETS, preset

__all__ = [
    "Qwen2_5_VLConfig",
    "TextConfig",
    "VisionConfig",
    "Qwen2_5_VLForConditionalGeneration",
    "ModelInputs",
    "VisionInputs",
    "abstract_model",
    "from_pretrained",
    "init_model",
    "prepare_inputs",
    "rope_index",
    "save_pretrained",
    "with_config",
    "PRESETS",
    "preset",
]
