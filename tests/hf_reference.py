"""The independent reference: tiny random transformers Qwen2.5-VL models and processor inputs."""

from __future__ import annotations

import numpy as np
import torch
from flax import nnx
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

from vppo_jax.models import qwen2_5_vl
from vppo_jax.models.qwen2_5_vl.weights import weight_table

VOCAB = 1024
IMAGE_TOKEN, VISION_START, VISION_END = 1000, 1001, 1002
PAD = 0


def tiny_hf_config(tied: bool = False, fullatt=(1,), depth: int = 2, vocab: int = VOCAB) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=PAD,
        ),
        vision_config=dict(
            depth=depth,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=112,
            fullatt_block_indexes=list(fullatt),
        ),
        image_token_id=IMAGE_TOKEN,
        video_token_id=1003,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=tied,
    )


def tiny_hf_model(seed: int = 0, dtype=torch.float32, **config_kwargs) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_hf_config(**config_kwargs)).eval()
    # Random init leaves norms at one and biases at zero; perturb them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Random pixels in `mode`: drawn as RGB, or as RGBA converted to the mode (alpha, palettes)."""
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA").convert(mode)


def load_port(hf_model, directory, **kwargs):
    """Our model loaded from `hf_model` saved in `directory`/hf (kwargs: from_pretrained's)."""
    hf_model.save_pretrained(directory / "hf")
    return qwen2_5_vl.from_pretrained(str(directory / "hf"), **kwargs)


def processor_batch(samples: list[tuple[list[int], list[tuple[int, int]]]], seed: int = 0) -> dict:
    """Arrays as the HF processor returns them, left-padded.

    Each sample is (text ids, image sizes); its images go right after the first text token,
    each as <|vision_start|> + t*h*w/4 image tokens + <|vision_end|>.
    """
    processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28 * 256)
    rows, pixel_values, grids = [], [], []
    for n, (text, sizes) in enumerate(samples):
        ids = list(text[:1])
        for k, (h, w) in enumerate(sizes):
            out = processor(images=[random_image(h, w, seed + 100 * n + k)], return_tensors="np")
            t, gh, gw = out["image_grid_thw"][0].tolist()
            pixel_values.append(out["pixel_values"])
            grids.append([t, gh, gw])
            ids += [VISION_START] + [IMAGE_TOKEN] * (t * gh * gw // 4) + [VISION_END]
        rows.append(ids + list(text[1:]))
    length = max(len(r) for r in rows)
    input_ids = np.full((len(rows), length), PAD, np.int64)
    attention_mask = np.zeros((len(rows), length), np.int64)
    for b, r in enumerate(rows):
        input_ids[b, length - len(r) :] = r
        attention_mask[b, length - len(r) :] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == IMAGE_TOKEN).astype(np.int64),
    }
    if pixel_values:
        batch["pixel_values"] = np.concatenate(pixel_values).astype(np.float32)
        batch["image_grid_thw"] = np.asarray(grids, np.int64)
    return batch


def hf_logits(model, batch: dict) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    return out.logits.float().numpy()


def text_ids(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 900, length).tolist()


def assert_gradients_match(config, grads, hf_grads: dict) -> None:
    """Every parameter's gradient of our port (an nnx.State) equals transformers' (by our legacy
    HF name) within 1e-4 of the tensor's largest, and the vision tower and every decoder layer
    got some: the check of the shared-prompt and packed forwards' backward passes."""
    flat = dict(nnx.to_flat_state(grads))
    checked = 0
    for entry in weight_table(config):
        ours_grad = np.asarray(flat[entry.path][...])
        for i, name in enumerate(entry.hf_names()):
            got = entry.transform.to_hf(ours_grad[i] if entry.layers else ours_grad)
            scale = np.abs(hf_grads[name]).max()
            np.testing.assert_allclose(got, hf_grads[name], atol=1e-4 * max(scale, 1e-3), err_msg=name)
            checked += scale > 0
    assert checked > 40  # the vision tower's and every decoder layer's weights get gradient
