"""From prompt records to graded groups of responses, and from those to update batches.

groups, grader_stats = sample_and_grade(policy, prompts, keys, sampling_params, grade, image_token_id)
arrays = update_arrays(groups)          # full sequences (prompt + response), per row
batch = train_batch(config, groups, advantages, micro_batches)     # padded rows
batch = packed_train_batch(config, groups, advantages, budget)     # packed bins
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from vppo_jax.models.qwen2_5_vl.inputs import left_pad_to_bucket
from vppo_jax.rollout import sampling
from vppo_jax.vppo import packing
from vppo_jax.vppo.batch import TrainBatch, build_packed_train_batch, build_train_batch

IMAGE_KEYS = ("pixel_values", "image_grid_thw")


def collate_prompts(prompts: list, pad_id: int, image_token_id: int) -> dict:
    """HF-processor-style arrays for a list of `Prompt` records, left-padded to the longest."""
    length = max(len(p.prompt_ids) for p in prompts)
    input_ids = np.full((len(prompts), length), pad_id, np.int32)
    attention_mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt.prompt_ids) :] = prompt.prompt_ids
        attention_mask[row, length - len(prompt.prompt_ids) :] = 1
    arrays = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == image_token_id).astype(np.int32),
    }
    with_images = [p for p in prompts if p.image_grid_thw is not None and len(p.image_grid_thw)]
    if with_images:
        arrays["pixel_values"] = np.concatenate([p.pixel_values for p in with_images])
        arrays["image_grid_thw"] = np.concatenate([p.image_grid_thw for p in with_images])
    return arrays


@dataclasses.dataclass
class GradedGroups:
    """G responses for each of P prompts; row p * G + g is sample g of prompt p."""

    prompt_arrays: dict  # the prompts, left-padded to a bucket length (P rows)
    prompts: list
    tokens: np.ndarray  # (P * G, max_new_tokens)
    mask: np.ndarray  # (P * G, max_new_tokens) bool
    truncated: np.ndarray  # (P * G,)
    texts: list[str]
    rewards: np.ndarray  # (P * G,) float32
    live: np.ndarray  # (P,) bool: False for filler groups that only pad the batch to its static size

    @property
    def group_size(self) -> int:
        return len(self.texts) // len(self.prompts)

    def select(self, groups: np.ndarray) -> "GradedGroups":
        """The given prompt groups (indices into prompts), in that order."""
        rows = (groups[:, None] * self.group_size + np.arange(self.group_size)).reshape(-1)
        prompt_arrays = {k: v[groups] for k, v in self.prompt_arrays.items() if k not in IMAGE_KEYS}
        if "pixel_values" in self.prompt_arrays:
            images = _image_rows(self.prompts)
            pixel_rows = np.concatenate([images[g] for g in groups] + [np.zeros(0, int)])
            prompt_arrays["pixel_values"] = self.prompt_arrays["pixel_values"][pixel_rows]
            prompt_arrays["image_grid_thw"] = np.concatenate(
                [self.prompts[g].image_grid_thw for g in groups] + [np.zeros((0, 3), np.int64)]
            )
        return GradedGroups(
            prompt_arrays=prompt_arrays,
            prompts=[self.prompts[g] for g in groups],
            tokens=self.tokens[rows],
            mask=self.mask[rows],
            truncated=self.truncated[rows],
            texts=[self.texts[r] for r in rows],
            rewards=self.rewards[rows],
            live=self.live[groups],
        )


def _image_rows(prompts: list) -> list[np.ndarray]:
    """For each prompt, the indices of its rows in the concatenated pixel_values."""
    rows, start = [], 0
    for prompt in prompts:
        count = int(np.prod(prompt.image_grid_thw, axis=1).sum()) if prompt.image_grid_thw is not None else 0
        rows.append(np.arange(start, start + count))
        start += count
    return rows


def sample_and_grade(
    policy,
    prompts: list,
    keys: jax.Array,
    params: sampling.SamplingParams,
    grade: Callable,
    image_token_id: int,
    mesh=None,
) -> tuple[GradedGroups, dict]:
    """Samples G responses per prompt and grades them with `grade(responses, answers) ->
    (rewards, stats)` (a RewardPool's score_responses); returns the groups and grader stats."""
    arrays = left_pad_to_bucket(
        collate_prompts(prompts, params.pad_token_id, image_token_id), params.min_prompt_length, params.pad_token_id
    )
    rollout = jax.device_get(sampling.generate(policy.model, arrays, keys, params, mesh))
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    texts = [policy.tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(tokens, mask)]
    answers = [p.answer for p in prompts for _ in range(params.group_size)]
    rewards, stats = grade(texts, answers)
    groups = GradedGroups(
        prompt_arrays=arrays,
        prompts=list(prompts),
        tokens=tokens,
        mask=mask,
        truncated=np.asarray(rollout.truncated),
        texts=texts,
        rewards=np.asarray(rewards, np.float32),
        live=np.ones(len(prompts), bool),
    )
    return groups, stats


def concatenate(parts: list[GradedGroups], pad_id: int) -> GradedGroups:
    """The groups of several sampling rounds as one, prompts left-padded to the widest round."""
    width = max(p.prompt_arrays["input_ids"].shape[1] for p in parts)
    pads = {"input_ids": pad_id, "attention_mask": 0, "mm_token_type_ids": 0}

    def left_pad(part, key):
        array = part.prompt_arrays[key]
        return np.pad(array, ((0, 0), (width - array.shape[1], 0)), constant_values=pads[key])

    prompt_arrays = {key: np.concatenate([left_pad(p, key) for p in parts]) for key in pads}
    with_images = [p for p in parts if "pixel_values" in p.prompt_arrays]
    if with_images:
        for key in IMAGE_KEYS:
            prompt_arrays[key] = np.concatenate([p.prompt_arrays[key] for p in with_images])
    join = lambda name: np.concatenate([getattr(p, name) for p in parts])
    return GradedGroups(
        prompt_arrays=prompt_arrays,
        prompts=[q for p in parts for q in p.prompts],
        tokens=join("tokens"),
        mask=join("mask"),
        truncated=join("truncated"),
        texts=[t for p in parts for t in p.texts],
        rewards=join("rewards"),
        live=join("live"),
    )


def update_arrays(groups: GradedGroups) -> dict:
    """Full sequences for the update: each prompt repeated G times, its responses appended.

    Response padding sits at the end with attention_mask 0; `response_tokens` marks the
    tokens the loss covers (the response, its end token included).
    """
    g = groups.group_size
    prompt = {k: np.repeat(v, g, axis=0) for k, v in groups.prompt_arrays.items() if k not in IMAGE_KEYS}
    zeros = np.zeros_like(prompt["input_ids"], bool)
    live_rows = np.repeat(groups.live, g)[:, None]
    arrays = {
        "input_ids": np.concatenate([prompt["input_ids"], groups.tokens], axis=1),
        "attention_mask": np.concatenate([prompt["attention_mask"].astype(bool), groups.mask], axis=1),
        # Filler groups keep their tokens (shapes stay static) but no loss term.
        "response_tokens": np.concatenate([zeros, groups.mask & live_rows], axis=1),
    }
    if "pixel_values" in groups.prompt_arrays:
        images = _image_rows(groups.prompts)
        rows = np.concatenate([images[p] for p in range(len(groups.prompts)) for _ in range(g)])
        arrays["pixel_values"] = groups.prompt_arrays["pixel_values"][rows]
        arrays["image_grid_thw"] = np.concatenate(
            [groups.prompts[p].image_grid_thw for p in range(len(groups.prompts)) for _ in range(g)]
        )
    return arrays


def train_batch(
    config,
    groups: GradedGroups,
    advantages: np.ndarray,
    micro_batches: int = 1,
    perturbed_pixel_values: np.ndarray | None = None,
) -> TrainBatch:
    """The groups' full sequences (`update_arrays`) as a TrainBatch of `micro_batches`, with
    one advantage per row; `perturbed_pixel_values` as build_train_batch takes them."""
    arrays = update_arrays(groups)
    return build_train_batch(
        config,
        arrays["input_ids"],
        arrays["attention_mask"],
        arrays["response_tokens"],
        advantages,
        arrays.get("pixel_values"),
        arrays.get("image_grid_thw"),
        micro_batches,
        perturbed_pixel_values,
        response_start=groups.prompt_arrays["input_ids"].shape[1],  # the prompts' padded width
        prompt_group=groups.group_size,
    )


def packed_train_batch(
    config,
    groups: GradedGroups,
    advantages: np.ndarray,
    budget: int,
    shards: int = 1,
    rows_alone: bool = False,
    minimums: dict | None = None,
) -> TrainBatch:
    """The groups packed in bins of `budget` tokens (vppo_jax/vppo/batch.py,
    build_packed_train_batch): each prompt unpadded with its images, its samples' responses
    (a filler group's empty: it is in no bin), the response window the rollout's."""
    g = groups.group_size
    packed_groups = []
    for p, prompt in enumerate(groups.prompts):
        rows = range(p * g, (p + 1) * g)
        responses = tuple(groups.tokens[r][groups.mask[r] & groups.live[p]] for r in rows)
        has_images = prompt.image_grid_thw is not None and len(prompt.image_grid_thw) > 0
        images = (prompt.pixel_values, prompt.image_grid_thw) if has_images else (None, None)
        packed_groups.append(packing.Group(np.asarray(prompt.prompt_ids), responses, *images))
    return build_packed_train_batch(
        config, packed_groups, advantages, groups.tokens.shape[1], budget, shards, rows_alone, **(minimums or {})
    )
