"""The sampler against transformers (greedy generate, teacher-forced forward) and analytic distributions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh
from scipy import stats

from vppo_jax.models.qwen2_5_vl.inputs import left_pad_to_bucket, length_bucket
from vppo_jax.models.qwen2_5_vl.text import attend_to_cache
from vppo_jax.rollout import sampling

from hf_reference import IMAGE_TOKEN, VISION_END, VISION_START, processor_batch, text_ids

VIDEO_TOKEN = 1003
VISION_IDS = (IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END)
# Four prompts of different lengths, each with an image of a different size.
PROMPTS = [
    (text_ids(8, 3), [(84, 56)]),
    (text_ids(3, 4), [(56, 112)]),
    (text_ids(20, 5), [(112, 112)]),
    (text_ids(12, 6), [(56, 56)]),
]
NEW_TOKENS = 40


def repeat_prompts(batch: dict, times: int) -> dict:
    """Each prompt and its image `times` times in a row, the layout of the sampler's groups.

    (processor_batch would draw a new random image for every repeated prompt.)
    """
    pixel_rows = np.prod(batch["image_grid_thw"], axis=1)  # one image per prompt
    images = np.split(batch["pixel_values"], np.cumsum(pixel_rows)[:-1])
    repeated = {k: np.repeat(v, times, axis=0) for k, v in batch.items() if k != "pixel_values"}
    repeated["pixel_values"] = np.concatenate([image for image in images for _ in range(times)])
    return repeated


def keys_for(count: int, seed: int = 0) -> jax.Array:
    return jax.random.split(jax.random.key(seed), count)


def torch_batch(batch: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def hf_greedy(hf_model):
    """transformers' greedy continuation of PROMPTS, NEW_TOKENS tokens, no early stop."""
    batch = processor_batch(PROMPTS)
    with torch.no_grad():
        out = hf_model.generate(
            **torch_batch(batch), do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS
        )
    response = out[:, batch["input_ids"].shape[1] :].numpy()
    # transformers does not ban vision tokens; with random weights greedy could pick one.
    # This model and these prompts never do, so the comparison below covers every token.
    assert not np.isin(response, VISION_IDS).any()
    return response


@pytest.mark.parametrize("devices", [1, 4], ids=["one_device", "data_parallel_4"])
def test_greedy_matches_transformers_generate(port, hf_greedy, devices):
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",)) if devices > 1 else None
    params = sampling.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, end_token_ids=(), pad_token_id=0)
    rollout = sampling.generate(port, processor_batch(PROMPTS), keys_for(len(PROMPTS)), params, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(rollout.tokens), hf_greedy)
    assert np.asarray(rollout.mask).all() and np.asarray(rollout.truncated).all()
    assert len(rollout.tokens.sharding.device_set) == devices


@pytest.mark.parametrize("segments", [1, 3], ids=["one_block", "three_blocks_of_13"])
def test_greedy_with_other_response_cache_blocks_matches_transformers(port, hf_greedy, monkeypatch, segments):
    """The decode loop with the response cache in one block of 39 slots (read whole at every
    step), or in three blocks of 13, gives transformers' greedy tokens too (the default, four
    blocks of 10, the last with a slot never written, is tested above)."""
    monkeypatch.setattr(sampling, "DECODE_SEGMENTS", segments)
    sampling._PROGRAMS.clear()  # not the programs compiled with the default blocks
    params = sampling.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, end_token_ids=(), pad_token_id=0)
    rollout = sampling.generate(port, processor_batch(PROMPTS), keys_for(len(PROMPTS)), params)
    sampling._PROGRAMS.clear()
    np.testing.assert_array_equal(np.asarray(rollout.tokens), hf_greedy)


@pytest.mark.parametrize("new_tokens", [1, 2, 3])
def test_greedy_few_tokens_match_transformers(port, hf_greedy, new_tokens):
    """1, 2 and 3 new tokens (no response slot to read, or blocks of one slot) give the first
    tokens of transformers' greedy continuation."""
    params = sampling.SamplingParams(max_new_tokens=new_tokens, temperature=0.0, end_token_ids=(), pad_token_id=0)
    rollout = sampling.generate(port, processor_batch(PROMPTS), keys_for(len(PROMPTS)), params)
    np.testing.assert_array_equal(np.asarray(rollout.tokens), hf_greedy[:, :new_tokens])


def test_end_tokens_stop_each_sequence(port, hf_greedy):
    # End tokens taken from transformers' greedy output: row 0's 6th token and row 2's 11th.
    end_ids = (int(hf_greedy[0, 5]), int(hf_greedy[2, 10]))
    params = sampling.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, end_token_ids=end_ids, pad_token_id=0)
    rollout = sampling.generate(port, processor_batch(PROMPTS), keys_for(len(PROMPTS)), params)
    for row, reference in enumerate(hf_greedy):
        ends = np.flatnonzero(np.isin(reference, end_ids))
        length = ends[0] + 1 if len(ends) else NEW_TOKENS
        expected = np.where(np.arange(NEW_TOKENS) < length, reference, 0)
        np.testing.assert_array_equal(np.asarray(rollout.tokens[row]), expected)
        np.testing.assert_array_equal(np.asarray(rollout.mask[row]), np.arange(NEW_TOKENS) < length)
        assert bool(rollout.truncated[row]) == (len(ends) == 0)
    assert not np.asarray(rollout.truncated)[[0, 2]].any()


def test_logprobs_match_teacher_forced_forward(hf_model, port):
    group, temperature = 2, 0.7
    params = sampling.SamplingParams(
        max_new_tokens=24,
        temperature=temperature,
        top_k=50,
        top_p=0.9,
        group_size=group,
        end_token_ids=(),
        pad_token_id=0,
    )
    rollout = sampling.generate(port, processor_batch(PROMPTS), keys_for(len(PROMPTS) * group), params)
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    assert not np.isin(tokens, VISION_IDS).any()

    # The same sequences, prompt then response, through transformers' full forward pass.
    batch = repeat_prompts(processor_batch(PROMPTS), group)
    prompt_length = batch["input_ids"].shape[1]
    full = dict(batch)
    full["input_ids"] = np.concatenate([batch["input_ids"], tokens], axis=1)
    full["attention_mask"] = np.concatenate([batch["attention_mask"], mask], axis=1)
    full["mm_token_type_ids"] = np.concatenate([batch["mm_token_type_ids"], np.zeros_like(tokens)], axis=1)
    with torch.no_grad():
        logits = hf_model(**torch_batch(full)).logits[:, prompt_length - 1 : -1] / temperature
    reference = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[..., None].long())[..., 0]
    error = np.abs(np.asarray(rollout.logprobs) - reference.numpy())[mask]
    assert error.max() <= 1e-4, error.max()


def test_group_samples_equal_repeated_prompts(port):
    group = 3
    params = dict(max_new_tokens=16, temperature=1.0, end_token_ids=(), pad_token_id=0)
    keys = keys_for(len(PROMPTS) * group, seed=7)
    grouped = sampling.generate(
        port, processor_batch(PROMPTS), keys, sampling.SamplingParams(group_size=group, **params)
    )
    repeated = sampling.generate(
        port, repeat_prompts(processor_batch(PROMPTS), group), keys, sampling.SamplingParams(**params)
    )
    np.testing.assert_array_equal(np.asarray(grouped.tokens), np.asarray(repeated.tokens))
    np.testing.assert_allclose(np.asarray(grouped.logprobs), np.asarray(repeated.logprobs), atol=1e-5)
    # The G samples of a prompt differ from each other (different keys).
    assert len({tuple(row) for row in np.asarray(grouped.tokens)[:group]}) == group


@pytest.mark.parametrize("devices, wave", [(1, 3), (4, 2)], ids=["one_device_waves_of_3", "data_parallel_4_waves_of_2"])
def test_waves_give_the_rollout_of_one_wave(port, devices, wave):
    """The same keys sample the same rollout whether the prompts go in one wave or several,
    the last one padded (3 + 1 prompts) or not (2 + 2)."""
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",)) if devices > 1 else None
    params = sampling.SamplingParams(max_new_tokens=12, temperature=1.0, group_size=2, end_token_ids=(), pad_token_id=0)
    keys = keys_for(len(PROMPTS) * params.group_size, seed=3)
    whole = sampling.generate(port, processor_batch(PROMPTS), keys, params, mesh)
    waves = sampling.generate(
        port, processor_batch(PROMPTS), keys, dataclasses.replace(params, wave_prompts=wave), mesh
    )
    np.testing.assert_array_equal(np.asarray(waves.tokens), np.asarray(whole.tokens))
    np.testing.assert_array_equal(np.asarray(waves.mask), np.asarray(whole.mask))
    np.testing.assert_allclose(np.asarray(waves.logprobs), np.asarray(whole.logprobs), atol=1e-5)


def test_a_negative_wave_size_is_refused():
    with pytest.raises(ValueError, match=r"wave_prompts=-1 \(rollout.wave_prompts in a config\)"):
        sampling.SamplingParams(max_new_tokens=1, end_token_ids=(), pad_token_id=0, wave_prompts=-1)


@pytest.mark.parametrize("blocks, filled", [(1, 6), (3, 1)], ids=["one_block", "three_blocks_last_with_one_slot"])
def test_shared_prompt_cache_attention_equals_attention_over_the_repeated_cache(blocks, filled):
    """attend_to_cache (the prompt's cache read by its G samples, merged with each sample's
    response cache blocks) against a dense float64 softmax over the prompt's slots repeated G
    times and concatenated with each sample's blocks; one sample with no slot of the last
    block open, one prompt with no prompt slot. Every slot of the earlier blocks counts."""
    prompts, group, kv_heads, per_kv, head_dim, prompt_slots, block = 3, 2, 2, 3, 8, 5, 8
    rng = np.random.default_rng(0)
    rows, heads = prompts * group, kv_heads * per_kv
    q = rng.normal(size=(rows, 1, heads, head_dim)).astype(np.float32)
    prompt_keys = rng.normal(size=(prompts, kv_heads, head_dim, prompt_slots)).astype(np.float32)
    prompt_values = rng.normal(size=(prompts, kv_heads, prompt_slots, head_dim)).astype(np.float32)
    response_keys = [rng.normal(size=(rows, kv_heads, head_dim, block)).astype(np.float32) for _ in range(blocks)]
    response_values = [rng.normal(size=(rows, kv_heads, block, head_dim)).astype(np.float32) for _ in range(blocks)]
    prompt_mask = rng.random((prompts, prompt_slots)) < 0.7
    last_mask = (rng.random((rows, block)) < 0.6) & (np.arange(block) < filled)
    prompt_mask[0], last_mask[0] = True, False  # sample 0 reads its prompt (and earlier blocks) alone
    prompt_mask[2], last_mask[4:, :filled] = False, True  # prompt 2's samples read their responses alone
    out = attend_to_cache(
        q, (prompt_keys, prompt_values), prompt_mask, list(zip(response_keys, response_values)), last_mask
    )

    repeat = lambda a: np.repeat(a.astype(np.float64), group, axis=0)
    keys = np.concatenate([repeat(prompt_keys), *response_keys], axis=-1)  # (B, Hkv, hd, T + blocks x S)
    values = np.concatenate([repeat(prompt_values), *response_values], axis=-2)
    earlier = np.ones((rows, (blocks - 1) * block), bool)
    mask = np.concatenate([repeat(prompt_mask).astype(bool), earlier, last_mask], axis=-1)
    grouped_q = q.reshape(rows, kv_heads, per_kv, head_dim).astype(np.float64)
    scores = np.einsum("bkhd,bkds->bkhs", grouped_q, keys) / np.sqrt(head_dim)
    scores = np.where(mask[:, None, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("bkhs,bksd->bkhd", probs, values).reshape(rows, 1, heads * head_dim)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)


def truncated_distribution(logits, banned, temperature, top_k, top_p):
    """Reference in NumPy: ban, scale, keep the top k, then the smallest nucleus of mass top_p."""
    scaled = np.where(np.isin(np.arange(len(logits)), banned), -np.inf, logits.astype(np.float64) / temperature)
    order = np.argsort(-scaled, kind="stable")
    kept = order[: top_k or len(logits)]
    probs = np.exp(scaled[kept] - scaled[kept].max())
    probs /= probs.sum()
    nucleus = np.searchsorted(np.cumsum(probs), top_p - 1e-9) + 1 if top_p < 1 else len(kept)
    expected = np.zeros(len(logits))
    expected[kept[:nucleus]] = probs[:nucleus] / probs[:nucleus].sum()
    return expected


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.8, 6, 0.7)],
    ids=["plain", "temperature", "top_k", "top_p", "all_three"],
)
def test_token_frequencies_match_truncated_distribution(temperature, top_k, top_p):
    vocab, draws = 12, 40_000
    logits = np.random.default_rng(0).normal(0, 1.5, vocab).astype(np.float32)
    banned = tuple(np.argsort(-logits)[:2])  # ban the two most likely tokens: they must never appear
    params = sampling.SamplingParams(
        max_new_tokens=1, end_token_ids=(), pad_token_id=0, temperature=temperature, top_k=top_k, top_p=top_p
    )
    uniforms = jax.random.uniform(jax.random.key(1), (draws,))
    tokens, _ = jax.jit(sampling.sample_tokens, static_argnums=(2, 3))(
        np.broadcast_to(logits, (draws, vocab)), uniforms, params, banned
    )
    counts = np.bincount(np.asarray(tokens), minlength=vocab)
    expected = truncated_distribution(logits, banned, temperature, top_k, top_p)
    support = expected > 0
    assert counts[~support].sum() == 0
    assert stats.chisquare(counts[support], expected[support] * draws).pvalue > 1e-3


def test_nucleus_without_a_sort_keeps_exactly_the_sorted_nucleus():
    """The bisection's nucleus against the sort-and-cumsum one written in NumPy, on random rows
    with ties, banned (-inf) tokens, wide and narrow distributions and many top_p values."""
    rng = np.random.default_rng(0)
    width = 400  # every trial's vocabulary padded to it with banned tokens: one compile
    nucleus = jax.jit(lambda logits, top_p: logits >= sampling.nucleus_threshold(logits, top_p))
    for trial in range(60):
        vocab = int(rng.integers(2, width))
        logits = np.full((4, width), -np.inf, np.float32)
        logits[:, :vocab] = rng.normal(size=(4, vocab)) * rng.uniform(0.1, 8)
        if trial % 3 == 0:
            logits = np.round(logits, 1)  # ties, also at the nucleus's edge
        logits[:, rng.integers(0, vocab, 2)] = -np.inf
        top_p = float(rng.uniform(0.05, 0.999))
        kept = np.asarray(nucleus(jnp.asarray(logits), top_p))
        for row, row_kept in zip(logits, kept):
            probs = np.exp(row.astype(np.float64) - row.max())
            probs /= probs.sum()
            order = np.argsort(-row, kind="stable")
            edge = row[order[np.cumsum(probs[order]) - probs[order] < top_p]].min()
            np.testing.assert_array_equal(row_kept, row >= edge)


def test_greedy_never_picks_a_banned_token():
    logits = np.array([[0.0, 5.0, 1.0, 4.0]], np.float32)
    params = sampling.SamplingParams(max_new_tokens=1, end_token_ids=(), pad_token_id=0, temperature=0.0)
    tokens, logprobs = sampling.sample_tokens(logits, np.zeros(1), params, banned_ids=(1,))
    assert int(tokens[0]) == 3
    np.testing.assert_allclose(float(logprobs[0]), 4.0 - np.log(np.exp(logits).sum()), rtol=1e-6)


def test_prompts_are_left_padded_to_few_lengths():
    assert [length_bucket(n, 16) for n in (1, 16, 17, 33, 41, 49, 65, 700)] == [16, 16, 24, 48, 48, 64, 96, 768]
    batch = processor_batch(PROMPTS)
    padded = left_pad_to_bucket(batch, 16, pad_id=0)
    extra = padded["input_ids"].shape[1] - batch["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] == length_bucket(batch["input_ids"].shape[1], 16) and extra > 0
    for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
        np.testing.assert_array_equal(padded[name][:, extra:], batch[name])
        assert not padded[name][:, :extra].any()
