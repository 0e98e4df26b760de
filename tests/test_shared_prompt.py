"""The training forward that runs each prompt once for its samples, against transformers'
full forward of every row: log-probs and the gradient of every parameter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from vppo_jax.models import qwen2_5_vl
from vppo_jax.models.qwen2_5_vl.model import with_config
from vppo_jax.models.qwen2_5_vl.weights import legacy_name
from vppo_jax.parallel import sharding
from vppo_jax.vppo.batch import build_train_batch

from hf_reference import IMAGE_TOKEN, PAD, assert_gradients_match, processor_batch, text_ids, tiny_hf_model

GROUP, WINDOW = 3, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two prompts of different lengths with an image each (left-padded to one width), three
    samples each with responses of 2..12 tokens (right-padded): a rollout's rows."""
    hf_model = tiny_hf_model(seed=5)
    path = tmp_path_factory.mktemp("shared") / "hf"
    hf_model.save_pretrained(path)
    model = qwen2_5_vl.from_pretrained(str(path))
    prompts = processor_batch([(text_ids(6, 1), [(56, 56)]), (text_ids(11, 2), [(28, 56)])], seed=3)
    rng = np.random.default_rng(0)
    ids, mask, response = [], [], []
    for p in range(2):
        for _ in range(GROUP):
            n = int(rng.integers(2, WINDOW + 1))
            tokens = np.full(WINDOW, PAD)
            tokens[:n] = rng.integers(3, 900, n)
            ids.append(np.concatenate([prompts["input_ids"][p], tokens]))
            mask.append(np.concatenate([prompts["attention_mask"][p], np.arange(WINDOW) < n]))
            response.append(np.concatenate([np.zeros_like(prompts["input_ids"][p]), np.arange(WINDOW) < n]))
    pixels_per_image = np.prod(prompts["image_grid_thw"], axis=1)
    image_rows = np.split(prompts["pixel_values"], np.cumsum(pixels_per_image)[:-1])
    arrays = dict(
        input_ids=np.stack(ids),
        attention_mask=np.stack(mask).astype(np.int64),
        pixel_values=np.concatenate([image_rows[p] for p in range(2) for _ in range(GROUP)]),
        image_grid_thw=np.repeat(prompts["image_grid_thw"], GROUP, axis=0),
    )
    arrays["mm_token_type_ids"] = (arrays["input_ids"] == IMAGE_TOKEN).astype(np.int64)
    return hf_model, model, arrays, np.stack(response)


def hf_loss_and_grads(hf_model, arrays, weights):
    """sum(weights * log p(token)) over the last WINDOW positions' targets, and its gradients."""
    hf_model.zero_grad()
    logits = hf_model(**{k: torch.from_numpy(v) for k, v in arrays.items()}).logits
    logp = torch.log_softmax(logits[:, -WINDOW - 1 : -1].double(), -1)
    targets = torch.from_numpy(arrays["input_ids"][:, -WINDOW:])
    loss = (torch.gather(logp, -1, targets[..., None])[..., 0] * torch.from_numpy(weights)).sum()
    loss.backward()
    return loss.item(), {name: p.grad.numpy() for name, p in hf_model.named_parameters()}


def shared_batch(model, arrays, response, **changes):
    arrays = dict(arrays, **changes)
    return build_train_batch(
        model.config,
        arrays["input_ids"],
        arrays["attention_mask"],
        response,
        np.zeros(len(response), np.float32),
        arrays["pixel_values"],
        arrays["image_grid_thw"],
        response_start=arrays["input_ids"].shape[1] - WINDOW,
        prompt_group=GROUP,
    )


@pytest.mark.parametrize(
    "attention_block, devices", [(0, 1), (8, 1), (0, 2)], ids=["dense", "blockwise", "dense-2-devices"]
)
def test_shared_prompt_log_probs_and_gradients_match_transformers(setup, attention_block, devices):
    """Blockwise: the prompts (26 tokens) and the responses' 11 query positions span several
    blocks of 8, the last one padded. On 2 devices each holds one group's 3 rows."""
    hf_model, model, arrays, response = setup
    if attention_block:
        model = with_config(model, model.config.with_compute(attention_block=attention_block))
    batch = shared_batch(model, arrays, response)
    assert batch.prompt_group == GROUP
    inputs = jax.tree.map(lambda a: a[0], batch.inputs)
    weights = np.random.default_rng(1).normal(size=response[:, -WINDOW:].shape) * response[:, -WINDOW:]
    graphdef, params = nnx.split(model, nnx.Param)
    mesh = sharding.make_mesh({"data": devices}, jax.devices()[:devices])

    def loss(params, inputs):
        m = nnx.merge(graphdef, params)
        hidden = m.response_hidden_states(inputs, WINDOW, batch.prompt_group)
        logp = jax.nn.log_softmax(jnp.dot(hidden, m.unembedding()), -1)
        return jnp.sum(jnp.take_along_axis(logp, batch.targets[0][..., None], -1)[..., 0] * weights)

    run = jax.jit(
        sharding.under_mesh(mesh, jax.value_and_grad(loss)),
        in_shardings=(sharding.replicated(mesh), sharding.inputs_shardings(mesh, inputs)),
    )
    ours, grads = run(params, inputs)
    expected, hf_grads = hf_loss_and_grads(hf_model, arrays, weights)
    assert float(ours) == pytest.approx(expected, rel=1e-5)
    hf_grads = {legacy_name(name): g for name, g in hf_grads.items()}
    assert_gradients_match(model.config, grads, hf_grads)


def test_rows_of_a_group_must_share_their_prompt(setup):
    """A differing prompt token, image pixel or image grid in a group's second row is refused."""
    _, model, arrays, response = setup
    ids = arrays["input_ids"].copy()
    ids[1, ids.shape[1] - WINDOW - 1] += 1  # sample 1 of prompt 0 ends its prompt with another token
    pixels = arrays["pixel_values"].copy()
    first_image = int(np.prod(arrays["image_grid_thw"][0]))
    pixels[first_image] += 1.0  # one pixel row of sample 1's image
    grids = arrays["image_grid_thw"].copy()
    grids[4] = grids[4][[0, 2, 1]]  # prompt 1's sample 1: its 2 x 4 patch grid read as 4 x 2
    changes = [(dict(input_ids=ids), "rows 0 and 1"), (dict(pixel_values=pixels), "rows 0 and 1")]
    for change, rows in changes + [(dict(image_grid_thw=grids), "rows 3 and 4")]:
        with pytest.raises(ValueError, match=f"{rows} .* prompts"):
            shared_batch(model, arrays, response, **change)
    assert shared_batch(model, arrays, response).prompt_group == GROUP
