"""Packed sequences (vppo_jax/vppo/packing.py, models/qwen2_5_vl/packed.py): the host layout,
the tree attention against a dense mask, and the packed forward's response log-probs and their
gradients against transformers run on each row alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from vppo_jax.models.qwen2_5_vl.layers import attention
from vppo_jax.models.qwen2_5_vl.model import with_config
from vppo_jax.models.qwen2_5_vl.packed import token_tree, tree_attention, tree_mask
from vppo_jax.models.qwen2_5_vl.weights import legacy_name
from vppo_jax.parallel import sharding
from vppo_jax.vppo import packing

from hf_reference import IMAGE_TOKEN, assert_gradients_match, load_port, processor_batch, text_ids, tiny_hf_model

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


def test_sequences_fill_bins_first_fit_decreasing(models):
    groups = make_groups()  # prompts of 13, 15 and 27 tokens
    sequences = packing.sequences(groups, BUDGET)
    assert [(s.group, s.responses, s.length) for s in sequences] == [
        (0, (0, 1, 2), 13 + 43),
        (1, (0, 1, 2, 3), 15 + 23),
        (2, (0,), 27 + 40),
        (2, (1, 2), 27 + 55),
    ]
    assert packing.first_fit_decreasing([s.length for s in sequences], BUDGET) == [[3], [2], [0, 1]]
    packed = packing.pack_groups(models[1].config, groups, BUDGET, shards=4)
    assert packed.inputs.input_ids.shape == (4, BUDGET)
    assert not packed.inputs.attention_mask[3].any()  # the bin that pads 3 bins to 4 shards
    # Bin 2: group 0's prompt, its responses as branches 1..3, then group 1 as segment 1.
    assert packed.tree.segment_ids[2, 13 + 43] == 1 and packed.tree.branch_ids[2, 13 + 30] == 2
    # The prompt's last position predicts the first token of each of its responses.
    firsts = np.flatnonzero((packed.column[2] == 0) & (packed.tree.segment_ids[2] == 0))
    assert firsts.tolist() == [13, 43, 45] and np.all(packed.predicted_by[2, firsts] == 12)
    assert packed.row[2, firsts].tolist() == [0, 1, 2] and packed.row[0, 27] == 8  # group 2's sample 1
    with pytest.raises(ValueError, match="raise the token budget to at least 67"):
        packing.sequences(groups, 66)


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
        hidden = packing.predicting_hidden(m.packed_hidden_states(packed.inputs, packed.tree), packed.predicted_by)
        logp = jax.nn.log_softmax(jnp.dot(hidden, m.unembedding()), -1)
        logp = jnp.take_along_axis(logp, packed.inputs.input_ids[..., None], -1)[..., 0]
        per_row = packing.unpack(logp, packed, rows, width)
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
