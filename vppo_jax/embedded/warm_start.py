"""Supervised warm start: teach a policy the answer format (and some of the task) before RL.

RL from a random policy learns nothing (every response scores 0, every group is filtered
out), so the embedded default first fits the synthetic task's worked answers
("<think> ... </think> \\boxed{answer}") with cross-entropy on the response tokens.

    python -m vppo_jax.embedded.warm_start --model=runs/tiny/embedded/tiny_model --data=train.parquet --out=warm
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow.parquet as pq
from absl import flags, logging
from flax import nnx
from tqdm.auto import tqdm

from vppo_jax.data.images import open_image
from vppo_jax.data.prompts import PromptBuilder
from vppo_jax.io import paths
from vppo_jax.io.cli import run_program
from vppo_jax.models.qwen2_5_vl import save_pretrained
from vppo_jax.rollout.policy import load_policy, prompt_builder
from vppo_jax.vppo.batch import build_train_batch
from vppo_jax.vppo.logprobs import token_logprobs_and_entropy


def supervised_examples(policy, builder: PromptBuilder, data_file: str) -> list[tuple]:
    """(prompt, response ids) for every row: the response is the worked answer + <|im_end|>."""
    rows = pq.read_table(paths.open_file(data_file, "rb")).to_pylist()
    examples = []
    for index, row in enumerate(rows):
        images = [open_image(entry, "") for entry in row["images"]]
        prompt = builder(index, row["problem"], row["answer"], images)
        if prompt.skipped:
            continue
        response = policy.tokenizer.encode(row["reasoning"], add_special_tokens=False).ids
        examples.append((prompt, response + [builder.special.im_end]))
    return examples


def sft_batch(config, examples: list[tuple], pad_id: int, prompt_width: int, response_width: int):
    """Prompt + response rows, right-aligned prompts, responses padded at the end; fixed
    widths so every batch has one shape (one compile)."""
    rows = len(examples)
    input_ids = np.full((rows, prompt_width + response_width), pad_id, np.int32)
    attention = np.zeros_like(input_ids, bool)
    response = np.zeros_like(input_ids, bool)
    for i, (prompt, reply) in enumerate(examples):
        start = prompt_width - len(prompt.prompt_ids)
        input_ids[i, start:prompt_width] = prompt.prompt_ids
        input_ids[i, prompt_width : prompt_width + len(reply)] = reply
        attention[i, start : prompt_width + len(reply)] = True
        response[i, prompt_width : prompt_width + len(reply)] = True
    pixel_values = np.concatenate([p.pixel_values for p, _ in examples])
    grids = np.concatenate([p.image_grid_thw for p, _ in examples])
    return build_train_batch(
        config,
        input_ids,
        attention,
        response,
        np.zeros(rows, np.float32),
        pixel_values,
        grids,
        response_start=prompt_width,
    )


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def sft_step(graphdef, optimizer, params, opt_state, batch):
    micro = jax.tree.map(lambda a: a[0], batch)

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        hidden = model.response_hidden_states(micro.inputs, micro.targets.shape[-1])
        logp, _ = token_logprobs_and_entropy(hidden, model.unembedding(), micro.targets)
        mask = micro.response_mask.astype(jnp.float32)
        return -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def warm_start(
    model_dir: str, data_file: str, out: str, steps: int, batch_size: int, learning_rate: float, seed: int = 0
) -> list[float]:
    """Trains `steps` SFT steps on `data_file` and writes the result as an HF directory at `out`."""
    policy = load_policy(model_dir, "float32")
    config = policy.model.config
    builder = prompt_builder(policy, max_prompt_length=512)
    examples = supervised_examples(policy, builder, data_file)
    optimizer = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=0.0)
    graphdef, params = nnx.split(policy.model, nnx.Param)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    widths = (max(len(p.prompt_ids) for p, _ in examples), max(len(r) for _, r in examples))
    losses = []
    for _ in tqdm(range(steps), desc="warm start", unit="step", disable=None):
        chosen = rng.choice(len(examples), batch_size, replace=False)
        batch = sft_batch(config, [examples[i] for i in chosen], builder.special.endoftext, *widths)
        params, opt_state, loss = sft_step(graphdef, optimizer, params, opt_state, batch)
        losses.append(float(loss))
    save_pretrained(nnx.merge(graphdef, params), out)
    return losses


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("model", None, "The policy to start from (an HF directory or converted checkpoint).")
    flags.DEFINE_string("data", None, "The synthetic task's train.parquet (with worked answers).")
    flags.DEFINE_string("out", None, "Directory for the warm-started policy (an HF directory).")
    flags.DEFINE_integer("steps", 300, "Optimizer steps.")
    flags.DEFINE_integer("batch_size", 32, "Examples per step.")
    flags.DEFINE_float("learning_rate", 3e-3, "Initial learning rate (cosine decay to 0 over the steps).")
    flags.mark_flags_as_required(["model", "data", "out"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # as before absl: INFO logs of orbax, JAX, ... stay hidden
    losses = warm_start(FLAGS.model, FLAGS.data, FLAGS.out, FLAGS.steps, FLAGS.batch_size, FLAGS.learning_rate)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; wrote {FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    run_program(main)
