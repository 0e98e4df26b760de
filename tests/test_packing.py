"""Packed sequences (vppo_jax/vppo/packing.py, models/qwen2_5_vl/packed.py): the host layout,
the tree attention against a dense mask, the packed forward's response log-probs and their
gradients against transformers run on each row alone, and the packed update against the
padded update of the same rollout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from vppo_jax.models.qwen2_5_vl.layers import attention
from vppo_jax.models.qwen2_5_vl.model import with_config
from vppo_jax.models.qwen2_5_vl.packed import token_tree, tree_attention, tree_mask
from vppo_jax.models.qwen2_5_vl.weights import legacy_name
from vppo_jax.parallel import sharding
from vppo_jax.vppo import packing
from vppo_jax.vppo import step as step_lib
from vppo_jax.vppo.batch import build_packed_train_batch, build_padded_train_batch, init_state

from hf_reference import IMAGE_TOKEN, assert_gradients_match, load_port, processor_batch, text_ids, tiny_hf_model
from update_checks import assert_same_update, parameter_changes

BUDGET = 96
# Per group: (prompt text ids, image sizes, response lengths), groups of 3 and 4 samples, one
# response empty. Group 2 (prompt 27 tokens and responses of 40 + 35 + 20) does not fit in one
# bin: it is split into two sequences.
GROUPS = [
    (text_ids(5, 1), [(56, 84)], [30, 2, 11]),
    (text_ids(3, 2), [(28, 56), (84, 56)], [7, 15, 1, 0]),
    (text_ids(9, 3), [(112, 112)], [40, 35, 20]),
]


def make_groups() -> list[packing.Group]:
    rng = np.random.default_rng(0)
    groups = []
    for n, (text, sizes, lengths) in enumerate(GROUPS):
        prompt = processor_batch([(text, sizes)], seed=10 * n)
        responses = tuple(rng.integers(3, 900, length) for length in lengths)
        groups.append(
            packing.Group(prompt["input_ids"][0], responses, prompt["pixel_values"], prompt["image_grid_thw"])
        )
    return groups


def rows_of(groups):
    """Each sample as its own unpadded row: (group, prompt + response ids, response length)."""
    return [(group, np.concatenate([group.prompt, r]), len(r)) for group in groups for r in group.responses]


def test_groups_fill_bins_longest_first_split_where_none_has_room(models):
    groups = make_groups()  # prompts of 13, 15 and 27 tokens
    sequences, bins = packing.pack_sequences(groups, BUDGET)
    # Group 2 (27 + 40 + 35 + 20 tokens) fits no bin: its first response in one, the other two
    # in another, each after a copy of its prompt; group 0 in a third, where group 1 fits too.
    assert [(s.group, s.responses, s.length) for s in sequences] == [
        (2, (0,), 27 + 40),
        (2, (1, 2), 27 + 55),
        (0, (0, 1, 2), 13 + 43),
        (1, (0, 1, 2, 3), 15 + 23),
    ]
    assert bins == [[0], [1], [2, 3]]
    packed = packing.pack_groups(models[1].config, groups, BUDGET, shards=4)
    assert packed.inputs.input_ids.shape == (4, BUDGET)
    assert not packed.inputs.attention_mask[3].any()  # the bin that pads 3 bins to 4 shards
    # Bin 2: group 0's prompt, its responses as branches 1..3, then group 1 as segment 1.
    layout = packed.layout
    assert layout.tree.segment_ids[2, 13 + 43] == 1 and layout.tree.branch_ids[2, 13 + 30] == 2
    # Its response slots: group 0's 30 + 2 + 11 tokens, then group 1's 23; the prompt's last
    # position (12) predicts the first token of each of its responses, a token the one before.
    firsts = np.flatnonzero(layout.column[2] == 0)
    assert firsts.tolist() == [0, 30, 32, 43, 50, 65] and layout.row[2, firsts].tolist() == [0, 1, 2, 3, 4, 5]
    assert np.all(layout.predicted_by[2, firsts[:3]] == 12) and layout.predicted_by[2, 1] == 13
    assert layout.response_mask[2].sum() == 66 and layout.row[0, 0] == 7 and layout.row[1, 0] == 8  # group 2's
    with pytest.raises(ValueError, match="raise the token budget to at least 67"):
        packing.pack_sequences(groups, 66)
    # Two micro-batches of two bins: rows 7-9 and 0-6, as many places in each (8, a multiple of
    # the shards). Per-row values go between the batch's order and the rollout's.
    batch = build_packed_train_batch(models[1].config, groups, np.arange(10.0), 48, BUDGET, shards=2)
    assert batch.rows.shape == (2, 8) and batch.in_rollout_order(batch.advantages).tolist() == list(range(10))


def dense_tree_attention(q, k, v, tree):
    return tree_attention(q, k, v, tree, block_size=q.shape[1])


@pytest.mark.parametrize("block", [4, 8])
def test_tree_attention_in_blocks_equals_the_dense_mask(block):
    """Two bins of 30 tokens: a prompt with two responses and a one-response sequence, then an
    unused tail; a prompt with three responses. Forward and gradients, and blocks skipped."""
    segment = np.array([[0] * 6 + [0] * 7 + [0] * 5 + [1] * 8 + [-1] * 4, [0] * 9 + [0] * 4 + [0] * 9 + [0] * 8])
    branch = np.array(
        [[0] * 6 + [1] * 7 + [2] * 5 + [0] * 4 + [1] * 4 + [0] * 4, [0] * 9 + [1] * 4 + [2] * 9 + [3] * 8]
    )
    tree = token_tree(segment >= 0, segment, branch, block)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 30, heads, 8)), jnp.float32) for heads in (4, 2, 2))
    weights = jnp.asarray(rng.normal(size=(2, 30, 32)), jnp.float32) * (segment >= 0)[..., None]
    loss = lambda attend: lambda q, k, v: (attend(q, k, v, tree) * weights).sum()
    blockwise = lambda q, k, v, tree: tree_attention(q, k, v, tree, block)
    real = segment >= 0
    np.testing.assert_allclose(
        np.asarray(blockwise(q, k, v, tree))[real], np.asarray(dense_tree_attention(q, k, v, tree))[real], atol=2e-6
    )
    ours = jax.grad(loss(blockwise), argnums=(0, 1, 2))(q, k, v)
    reference = jax.grad(loss(dense_tree_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6)
    # A query block reads exactly the key blocks where one of its queries may see a key: those
    # of the dense mask (the tail padded to whole blocks).
    allowed = np.asarray(tree_mask(tree))
    blocks = tree.counts.shape[1]
    allowed = np.pad(allowed, [(0, 0), (0, blocks * block - 30), (0, blocks * block - 30)])
    seen = allowed.reshape(2, blocks, block, blocks, block).any(axis=(2, 4))
    for b, i in np.ndindex(2, blocks):
        assert tree.key_blocks[b, i, : tree.counts[b, i]].tolist() == np.flatnonzero(seen[b, i]).tolist()
    # Fewer than causality alone reads: e.g. bin 0's last block (sequence 1) skips sequence 0's.
    assert tree.counts.sum() < 2 * blocks * (blocks + 1) // 2


def test_dense_tree_attention_is_the_attention_of_each_row_alone():
    """The dense mask itself: a response attends to its prompt and itself, as in its own row."""
    segment = np.zeros((1, 10), int)
    branch = np.array([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]])
    tree = token_tree(segment >= 0, segment, branch, 16)
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 10, heads, 8)), jnp.float32) for heads in (4, 2, 2))
    out = dense_tree_attention(q, k, v, tree)
    row = np.r_[0:4, 7:10]  # the prompt and response 2, as one unpacked row
    causal = jnp.tril(jnp.ones((7, 7), bool))[None]
    alone = attention(q[:, row], k[:, row], v[:, row], causal)
    np.testing.assert_allclose(np.asarray(out)[:, row], np.asarray(alone), atol=1e-6)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf_model = tiny_hf_model(seed=7)
    return hf_model, load_port(hf_model, tmp_path_factory.mktemp("packing"))


def hf_logp_and_grads(hf_model, groups, weights):
    """Each row through transformers alone: its response tokens' log-probs, and the gradients
    of sum(weights * log-probs) over all rows."""
    hf_model.zero_grad()
    logps = []
    for (group, ids, length), row_weights in zip(rows_of(groups), weights):
        arrays = dict(
            input_ids=ids[None],
            attention_mask=np.ones((1, len(ids)), np.int64),
            pixel_values=group.pixel_values,
            image_grid_thw=group.image_grid_thw,
            mm_token_type_ids=(ids[None] == IMAGE_TOKEN).astype(np.int64),
        )
        logits = hf_model(**{name: torch.from_numpy(a) for name, a in arrays.items()}).logits[0]
        logp = torch.log_softmax(logits[len(ids) - length - 1 : -1].double(), -1)
        logp = torch.gather(logp, -1, torch.from_numpy(ids[len(ids) - length :])[:, None])[:, 0]
        (logp * torch.from_numpy(row_weights[:length])).sum().backward()
        logps.append(logp.detach().numpy())
    return logps, {legacy_name(name): p.grad.numpy() for name, p in hf_model.named_parameters()}


@pytest.mark.parametrize(
    "attention_block, devices", [(512, 1), (16, 1), (16, 2)], ids=["dense", "blockwise", "blockwise-2-devices"]
)
def test_packed_log_probs_and_gradients_match_transformers_row_by_row(models, attention_block, devices):
    """Three groups of 3, 4 and 3 samples (responses of 0..40 tokens), four images of three sizes,
    one group split over two bins, two groups sharing a bin; blockwise: 6 blocks per bin; on
    2 devices, 2 bins each (the kernel per device, `per_device_attention`)."""
    hf_model, model = models
    model = with_config(model, model.config.with_compute(attention_block=attention_block))
    groups = make_groups()
    packed = packing.pack_groups(model.config, groups, BUDGET, shards=2)
    rows, width = len(rows_of(groups)), max(length for *_, length in rows_of(groups))
    weights = np.random.default_rng(2).normal(size=(rows, width))
    graphdef, params = nnx.split(model, nnx.Param)
    mesh = sharding.make_mesh({"data": devices}, jax.devices()[:devices])

    def loss(params, packed):
        m = nnx.merge(graphdef, params)
        hidden = m.packed_hidden_states(packed.inputs, packed.layout.tree)
        hidden = packing.predicting_hidden(hidden, packed.layout.predicted_by)
        logp = jax.nn.log_softmax(jnp.dot(hidden, m.unembedding()), -1)
        logp = jnp.take_along_axis(logp, packed.layout.targets[..., None], -1)[..., 0]
        per_row = packing.unpack(logp, packed.layout, rows, width)
        return (per_row * weights).sum(), per_row

    run = jax.jit(
        sharding.under_mesh(mesh, jax.value_and_grad(loss, has_aux=True)),
        in_shardings=(sharding.replicated(mesh), sharding.inputs_shardings(mesh, packed)),
    )
    (_, ours), grads = run(params, packed)
    expected, hf_grads = hf_logp_and_grads(hf_model, groups, weights)
    for row, reference in enumerate(expected):
        np.testing.assert_allclose(np.asarray(ours)[row, : len(reference)], reference, atol=1e-5, err_msg=f"row {row}")
    assert_gradients_match(model.config, grads, hf_grads)


def images_that_matter(model):
    """A copy of the model whose image features and logits are scaled up (x10, x5). The random
    tiny model is nearly uniform over its vocabulary and barely sees its images: a token's
    dependency (1e-4 nats) is then of the order of the float rounding by which two layouts of
    the same sums differ, and TAS's min-max normalisation magnifies that. Here it is 0.02."""
    graphdef, params = nnx.split(model, nnx.Param)
    model = nnx.merge(graphdef, jax.tree.map(jnp.array, params))
    model.visual.merger.fc2.kernel[...] = 10 * model.visual.merger.fc2.kernel[...]
    model.lm_head[...] = 5 * model.lm_head[...]
    return model


def update_of(model, config: step_lib.StepConfig, batch, score: bool):
    """(parameter change, metrics) of one SGD step at rate 1 on `batch`, scored first or not."""
    graphdef, state = init_state(model, optax.sgd(1.0))
    state = jax.tree.map(jnp.array, state)
    if score:
        batch = step_lib.score_rollouts(config, graphdef, state.model_params, batch, jax.random.key(3))
    step = jax.jit(lambda state, batch, key: step_lib.train_step(config, optax.sgd(1.0), graphdef, state, batch, key))
    ((change, metrics),) = parameter_changes(step, state, [batch])
    return change, metrics


# A group's prompt runs once for its samples; VPPO's perturbed forward runs each row with its
# own prompt (the twin bins). A budget of 96 tokens: several micro-batches (global TAS then
# needs the scoring pass), and for GRPO the room of a larger earlier batch (empty micro-batches,
# more rows and slots: the trainer's high-water shapes); of 512: one micro-batch.
@pytest.mark.parametrize(
    "vppo, tas, score, budget",
    [(False, False, False, 96), (True, False, False, 96), (True, True, True, 96), (True, True, False, 512)],
    ids=["grpo", "vppo-tgf", "vppo-scored", "vppo-in-pass"],
)
def test_a_packed_update_is_the_padded_update(models, vppo, tas, score, budget):
    """The same rollout (groups of 3, 4 and 3 samples, responses of 0..40 tokens, four images of
    three sizes) laid out padded (one micro-batch) and packed: the same parameter change and
    the same metrics. The perturbation is the gray image (deterministic: a random blackening
    draws its patches by slot, and slots differ between the layouts)."""
    model = images_that_matter(with_config(models[1], models[1].config.with_compute(attention_block=16)))
    groups = make_groups()
    advantages = np.random.default_rng(3).normal(size=len(rows_of(groups))).astype(np.float32)
    config = step_lib.StepConfig(vppo=vppo, tas=tas, perturbation="gray", estimator="kl", group_size=3)
    window = 48  # wider than the longest response (40)
    padded = build_padded_train_batch(model.config, groups, advantages, window)
    room = {} if vppo else dict(min_micro_batches=5, min_rows=12, min_slots=90)
    packed = build_packed_train_batch(model.config, groups, advantages, window, budget, rows_alone=vppo, **room)
    assert (packed.targets.shape[0] > 1) == (budget == 96)
    padded_change, padded_metrics = update_of(model, config, padded, score)
    packed_change, packed_metrics = update_of(model, config, packed, score)
    assert_same_update(padded_change, packed_change)
    assert padded_metrics.keys() == packed_metrics.keys()
    for name in padded_metrics:
        np.testing.assert_allclose(packed_metrics[name], padded_metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)
    if vppo:
        assert float(packed_metrics["dependency/token_mean"]) > 0.01


def test_per_group_tas_ranks_packed_rows_in_their_groups():
    """Rows laid out in another order than the rollout's (as packed micro-batches hold them, with
    rows that are none): per-group TAS of each row is that of the rollout-ordered rows."""
    config = step_lib.StepConfig(tas_scope="per_group", group_size=4, tgf=False)
    rng = np.random.default_rng(5)
    dependency = jnp.asarray(rng.random((8, 6)), jnp.float32)
    mask = jnp.asarray(rng.random((8, 6)) < 0.8)
    key = jax.random.key(0)
    alpha, _ = step_lib.shape_rows(config, dependency, None, mask, key)
    rows = np.array([5, -1, 0, 7, 2, 1, 6, -1, 3, 4])  # ten places for eight rows
    place = np.maximum(rows, 0)
    shuffled_alpha, _ = step_lib.shape_in_rollout_order(
        config, dependency[place], None, mask[place] & (rows >= 0)[:, None], key, jnp.asarray(rows), 8
    )
    np.testing.assert_allclose(np.asarray(shuffled_alpha)[rows >= 0], np.asarray(alpha)[rows[rows >= 0]], rtol=1e-6)
    assert np.ptp(np.asarray(alpha)) > 0.1  # TAS ranked something
