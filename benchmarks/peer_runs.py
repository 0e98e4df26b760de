"""One timed training run of benchmarks/peer_trl.py, in a process of its own: TRL's
GRPOTrainer or our Trainer on the task of benchmarks/peer_task.py. Writes one JSON file:
per optimizer step, its seconds, rollout seconds (sampling and reward) and completion tokens
(ours: also whether it ran a scoring pass).

    python benchmarks/peer_runs.py --framework=trl --task=/tmp/peer --out=trl.json [--gradient_checkpointing]
    python benchmarks/peer_runs.py --framework=ours --algo=vppo --micro_batches=8 --task=/tmp/peer --out=ours.json
    python benchmarks/peer_runs.py --framework=ours --algo=vppo --tas_scope=per_group --task=/tmp/peer --out=ours.json
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import peer_task
from absl import app, flags, logging

from vppo_jax.io.cli import parse_flags

# The work of one step, the same for both frameworks.
PROMPTS_PER_STEP = 32
GROUP_SIZE = 8
MAX_NEW_TOKENS = 128
LEARNING_RATE = 1e-6
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_enum("framework", None, ["trl", "ours"], "Which trainer runs.")
    flags.DEFINE_string("task", None, "The directory peer_task.write_task wrote.")
    flags.DEFINE_string("out", None, "The JSON file of per-step timings to write.")
    flags.DEFINE_integer("steps", 4, "Optimizer steps (one rollout each).")
    flags.DEFINE_bool("gradient_checkpointing", True, "TRL: recompute activations in the backward (its default).")
    flags.DEFINE_integer("micro_batch", 32, "TRL: completions per forward/backward (gradient accumulation).")
    flags.DEFINE_enum("algo", "grpo", ["grpo", "vppo"], "Ours: the algorithm.")
    flags.DEFINE_enum(
        "tas_scope", "global", ["global", "per_group"], "Ours, VPPO: algo.tas_scope (per_group: no scoring pass)."
    )
    flags.DEFINE_integer("micro_batches", 0, "Ours: train.micro_batches (0: the config's default).")
    flags.DEFINE_integer("micro_batch_tokens", 0, "Ours: train.micro_batch_tokens (0: the config's default).")
    flags.DEFINE_integer(
        "cpu_devices", 0, "Ours: that many JAX CPU devices with the rows split over them (mesh.data=-1); 0: one."
    )
    flags.mark_flags_as_required(["framework", "task", "out"])


def run_trl(where: dict[str, str], steps: int) -> list[dict]:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = peer_task.read_rows(where["data"])
    dataset = datasets.Dataset.from_list(
        [dict(prompt=peer_task.trl_prompt(r["problem"]), image=r["image"], answer=r["answer"]) for r in rows]
    )

    def reward(completions, answer, **unused):
        return [peer_task.contains_answer(c[0]["content"], a) for c, a in zip(completions, answer)]

    records, step_start = [], [0.0]

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *unused, **unused_kw):
            step_start[0] = time.perf_counter()
            records.append(dict(rollout=0.0, tokens=0))

        def on_step_end(self, *unused, **unused_kw):
            records[-1]["step"] = time.perf_counter() - step_start[0]

    completions_per_step = PROMPTS_PER_STEP * GROUP_SIZE
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        bf16=False,
        model_init_kwargs={"dtype": torch.float32},
        per_device_train_batch_size=FLAGS.micro_batch,
        gradient_accumulation_steps=completions_per_step // FLAGS.micro_batch,
        num_generations=GROUP_SIZE,
        max_completion_length=MAX_NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        beta=0.0,
        num_iterations=1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        gradient_checkpointing=FLAGS.gradient_checkpointing,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    trainer = GRPOTrainer(
        model=where["model"],
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=peer_task.load_processor(where["model"]),
        callbacks=[StepTimes()],
    )
    generate_and_score = trainer._generate_and_score_completions  # the rollout: sampling and rewards

    def timed_rollout(*args, **kwargs):
        start = time.perf_counter()
        output = generate_and_score(*args, **kwargs)
        records[-1]["rollout"] += time.perf_counter() - start
        records[-1]["tokens"] += int(output["completion_mask"].sum())
        return output

    trainer._generate_and_score_completions = timed_rollout
    trainer.train()
    return records


def run_ours(where: dict[str, str], steps: int) -> list[dict]:

    from vppo_jax.trainer.config import default_config
    from vppo_jax.trainer.trainer import Trainer

    c = default_config()
    c.model.update(path=where["model"], dtype="float32", param_dtype="float32")
    c.data.update(train_files=(where["data"],), val_files=("",), prompt_template="plain", min_pixels=0, max_pixels=0)
    c.data.max_prompt_length = 256
    c.rollout.update(prompts_per_step=PROMPTS_PER_STEP, group_size=GROUP_SIZE, max_new_tokens=MAX_NEW_TOKENS)
    c.rollout.update(top_p=1.0, min_prompt_length=64, max_filter_rounds=1)
    c.reward.name = "peer_task:contains_answer"
    c.algo.vppo = FLAGS.algo == "vppo"
    c.algo.tas_scope = FLAGS.tas_scope
    c.algo.online_filter = False  # no dynamic sampling: every sampled group trains, as in TRL
    c.optim.update(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM)
    c.train.update(steps=steps, updates_per_rollout=1)
    if FLAGS.micro_batches:
        c.train.micro_batches = FLAGS.micro_batches
    if FLAGS.micro_batch_tokens:
        c.train.micro_batch_tokens = FLAGS.micro_batch_tokens
    if FLAGS.cpu_devices:  # before JAX starts its CPU backend (the trainer's first array)
        import jax

        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
        c.mesh.data = -1
    c.checkpoint.every_steps = 0
    c.eval.every_steps = steps + 1
    trainer = Trainer(c, tempfile.mkdtemp())
    records = []
    try:
        for step in range(steps):
            metrics = trainer.train_one_step(step)
            rows = PROMPTS_PER_STEP * GROUP_SIZE
            records.append(
                dict(
                    step=metrics["time/step"],
                    rollout=metrics["time/rollout"],
                    tokens=round(metrics["rollout/response_length"] * rows),
                    scored="time/dependency" in metrics,  # the trainer times a scoring pass when it runs one
                )
            )
    finally:
        trainer.close()
    return records


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    where = peer_task.paths(FLAGS.task)
    run = run_trl if FLAGS.framework == "trl" else run_ours
    records = run(where, FLAGS.steps)
    with open(FLAGS.out + ".tmp", "w") as f:
        json.dump(records, f)
    os.replace(FLAGS.out + ".tmp", FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
