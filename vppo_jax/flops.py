"""FLOPs of one RL step, counted from the model's shapes, and the step time they imply.

    shape = flops.StepShape(prompts=384, group_size=8, prompt_tokens=1325, image_patches=4900,
                            response_tokens=2048, scoring_forwards=1, perturbed_forwards=1,
                            prompt_run=1)
    phases = flops.step_flops(model_config, shape)   # {"rollout prefill": ..., "update": ...}

Only matrix multiplications count, 2 FLOPs per multiply-add (the MFU convention: the
elementwise work, norms and softmaxes are a few percent at these sizes), and only the work
the algorithm needs: causal attention over the keys each token may see, the vocabulary at
the positions whose probabilities are used, no rematerialisation (recomputed forwards are
hardware FLOPs, not model FLOPs). A backward pass costs twice its forward.

What a step does, phase by phase (vppo_jax/trainer/trainer.py):
- rollout prefill: the vision tower and the prompt once per prompt;
- rollout decode: every sample's response, one token at a time over its growing context,
  the vocabulary at every token (it is sampled);
- score rollouts: forwards of the batch besides the update's own, with the original images
  (`scoring_forwards`: pi_old before several updates per rollout, or before VPPO's shaping)
  and with perturbed ones (`perturbed_forwards`: VPPO's dependency, 1);
- update: forward and backward of the batch, the vocabulary at the response positions.

Counted as the step runs them: a forward of the batch with the original images runs each
row's image through the vision tower, a prompt through the decoder once per run of
`prompt_run` rows that share it (docs/algorithm.md, "A prompt runs once for its samples"; 1
when a device's micro-batch holds one row of a group) and every response; a perturbed
forward runs every row whole, as each sample gets its own perturbed image.
"""

from __future__ import annotations

import dataclasses

from vppo_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig, VisionConfig

# Dense bf16 peak per device (FLOP/s): one JAX device per chip (TPU v4/v5p megacore), one per GPU.
PEAK_FLOPS = {"v5p": 459e12, "v4": 275e12, "v5e": 197e12, "v6e": 918e12, "h100": 989e12}


@dataclasses.dataclass(frozen=True)
class StepShape:
    prompts: int  # prompts sampled per rollout step
    group_size: int  # samples per prompt
    prompt_tokens: float  # mean tokens per prompt, its image tokens included (no padding)
    image_patches: float  # mean 14 x 14 patches per prompt's image (4 per image token); 0: no image
    response_tokens: float  # mean tokens per response
    scoring_forwards: int  # forwards of the batch with the original images besides the update's own
    perturbed_forwards: int  # forwards of every row with its own perturbed image (see the module docstring)
    prompt_run: int  # rows that run their shared prompt once in the original-image forwards (1: none share)


def decoder_sequence_flops(text: TextConfig, length: float, start: float = 0.0) -> float:
    """Forward FLOPs of `length` tokens through the decoder layers, the first at position
    `start` of its sequence: each token attends to itself and every earlier token."""
    # Token at position p reads p + 1 keys.
    return decoder_flops(text, length, keys_read=length * start + length * (length + 1) / 2)


def decoder_flops(text: TextConfig, tokens: float, keys_read: float) -> float:
    """Forward FLOPs of `tokens` tokens through the decoder layers whose queries read
    `keys_read` keys in all (for the scores and again for the weighted values)."""
    query = text.num_attention_heads * text.head_dim
    key_value = text.num_key_value_heads * text.head_dim
    per_token = text.hidden_size * (2 * query + 2 * key_value) + 3 * text.hidden_size * text.intermediate_size
    return 2 * text.num_hidden_layers * (per_token * tokens + 2 * query * keys_read)


def vocabulary_flops(text: TextConfig, tokens: float) -> float:
    """The lm_head at `tokens` positions."""
    return 2 * text.hidden_size * text.vocab_size * tokens


def vision_flops(vision: VisionConfig, patches: float) -> float:
    """Forward FLOPs of the vision tower for one image of `patches` patches: window blocks
    attend within their window, full-attention blocks over the whole image; then the merger."""
    if not patches:
        return 0.0
    d = vision.hidden_size
    embedding = vision.patch_dim * d
    per_block = 4 * d * d + 3 * d * vision.intermediate_size  # qkv and proj; the gated MLP
    window = min(patches, vision.window_units**2 * vision.merge_unit)
    full_blocks = len(vision.fullatt_block_indexes)
    # Scores and weighted values: 2 * d multiply-adds per key read.
    attention = 2 * d * ((vision.depth - full_blocks) * window + full_blocks * patches)
    merged = vision.merge_unit * d
    merger = (merged * merged + merged * vision.out_hidden_size) / vision.merge_unit
    return 2 * patches * (embedding + vision.depth * per_block + attention + merger)


def response_forward_flops(config: Qwen2_5_VLConfig, shape: StepShape) -> float:
    """A response through the decoder after its prompt, the vocabulary at its positions."""
    decoder = decoder_sequence_flops(config.text, shape.response_tokens, start=shape.prompt_tokens)
    return decoder + vocabulary_flops(config.text, shape.response_tokens)


def step_flops(config: Qwen2_5_VLConfig, shape: StepShape) -> dict[str, float]:
    """Model FLOPs of each phase of one rollout step (all its updates together)."""
    rows = shape.prompts * shape.group_size
    vision = vision_flops(config.vision, shape.image_patches)
    prompt = decoder_sequence_flops(config.text, shape.prompt_tokens)
    response = response_forward_flops(config, shape)
    prefill = shape.prompts * (vision + prompt + vocabulary_flops(config.text, 1))  # and the first token's distribution
    decode = rows * (
        decoder_sequence_flops(config.text, shape.response_tokens - 1, start=shape.prompt_tokens)
        + vocabulary_flops(config.text, shape.response_tokens - 1)
    )
    batch_forward = rows * (vision + prompt / shape.prompt_run + response)  # the original images
    perturbed_forward = rows * (vision + prompt + response)
    return {
        "rollout prefill": prefill,
        "rollout decode": decode,
        "score rollouts": batch_forward * shape.scoring_forwards + perturbed_forward * shape.perturbed_forwards,
        "update": batch_forward * 3,  # forward, and a backward of twice its cost
    }


def step_seconds(total_flops: float, devices: int, peak_flops: float, mfu: float) -> float:
    """Wall time of `total_flops` spread over `devices` running at `mfu` of their peak."""
    return total_flops / (devices * peak_flops * mfu)
