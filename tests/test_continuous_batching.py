"""Continuous batching (vppo_jax/rollout/continuous.py) against the waves: the same keys give the same rollout."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from test_sampling import PROMPTS, keys_for

from vppo_jax.rollout import continuous, sampling

from hf_reference import processor_batch

GROUP, NEW_TOKENS = 2, 12


@pytest.fixture(scope="module")
def end_ids(port):
    """Two tokens that the waves sample early in some rows and never in others: rows of
    many lengths, some truncated."""
    params = sampling.SamplingParams(max_new_tokens=NEW_TOKENS, group_size=GROUP, end_token_ids=(), pad_token_id=0)
    tokens = np.asarray(
        sampling.generate(port, processor_batch(PROMPTS), keys_for(len(PROMPTS) * GROUP, 3), params).tokens
    )
    return int(tokens[0, 2]), int(tokens[5, 6])


@pytest.mark.parametrize(
    "devices, slots",
    [(1, 3), (1, 1), (4, 2)],
    ids=["one_device_3_slots", "one_device_1_slot", "data_parallel_4_2_slots"],
)
def test_continuous_batching_gives_the_rollout_of_waves(port, end_ids, devices, slots):
    """8 rows (4 prompts x 2) of lengths 1 to 12 through fewer slots than rows, the slots
    taking new rows as theirs end, give the waves' tokens, mask and truncation, and their
    log-probs (to float rounding: the response cache is summed in another order)."""
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",)) if devices > 1 else None
    params = sampling.SamplingParams(
        max_new_tokens=NEW_TOKENS, group_size=GROUP, end_token_ids=end_ids, pad_token_id=0, wave_prompts=2
    )
    keys = keys_for(len(PROMPTS) * GROUP, seed=3)
    waves = sampling.generate(port, processor_batch(PROMPTS), keys, params, mesh)
    slotted = continuous.generate(
        port, processor_batch(PROMPTS), keys, dataclasses.replace(params, continuous_slots=slots), mesh
    )
    lengths = np.asarray(waves.mask).sum(axis=1)
    assert len(set(lengths)) >= 3 and (lengths < NEW_TOKENS).any() and np.asarray(waves.truncated).any()
    np.testing.assert_array_equal(np.asarray(slotted.tokens), np.asarray(waves.tokens))
    np.testing.assert_array_equal(np.asarray(slotted.mask), np.asarray(waves.mask))
    np.testing.assert_array_equal(np.asarray(slotted.truncated), np.asarray(waves.truncated))
    np.testing.assert_allclose(np.asarray(slotted.logprobs), np.asarray(waves.logprobs), atol=1e-5)


def test_one_slot_spends_one_step_per_token(port, end_ids):
    """With one slot the loop's steps are exactly the tokens sampled: a row takes the slot at
    the step after the last one's end, and samples its first token there."""
    params = sampling.SamplingParams(
        max_new_tokens=NEW_TOKENS, group_size=GROUP, end_token_ids=end_ids, pad_token_id=0, continuous_slots=1
    )
    batch = processor_batch(PROMPTS)
    prefilled = sampling.prefill(port, batch, params)
    rollout, steps = continuous.decode(port, prefilled, keys_for(len(PROMPTS) * GROUP, seed=3), params)
    assert np.asarray(steps).tolist() == [int(np.asarray(rollout.mask).sum())]


def test_a_negative_slot_count_is_refused_and_waves_do_not_take_slots():
    with pytest.raises(ValueError, match="continuous_slots=-1"):
        sampling.SamplingParams(max_new_tokens=1, end_token_ids=(), pad_token_id=0, continuous_slots=-1)
    slots = sampling.SamplingParams(max_new_tokens=1, end_token_ids=(), pad_token_id=0, continuous_slots=2)
    with pytest.raises(ValueError, match="continuous_slots=2: sample with vppo_jax.rollout.continuous.generate"):
        sampling.generate(None, {}, None, slots)


def test_stop_lengths_force_the_same_lengths_in_waves_and_slots(port):
    """Rows given stop lengths (the benchmark's forced lengths) end there, as at an end token,
    in waves and in slots alike, with the same tokens."""
    params = sampling.SamplingParams(max_new_tokens=NEW_TOKENS, group_size=GROUP, end_token_ids=(), pad_token_id=0)
    keys = keys_for(len(PROMPTS) * GROUP, seed=3)
    stops = np.array([1, 12, 5, 3, 12, 7, 2, 9], np.int32)
    waves = sampling.generate(port, processor_batch(PROMPTS), keys, params, stop_lengths=stops)
    slotted = continuous.generate(
        port, processor_batch(PROMPTS), keys, dataclasses.replace(params, continuous_slots=3), stop_lengths=stops
    )
    np.testing.assert_array_equal(np.asarray(waves.mask).sum(axis=1), stops)
    assert not np.asarray(waves.truncated).any()  # the stop length counts as an end
    np.testing.assert_array_equal(np.asarray(slotted.tokens), np.asarray(waves.tokens))
    np.testing.assert_array_equal(np.asarray(slotted.truncated), np.asarray(waves.truncated))
