"""The RL loop: rollouts, grading, the VPPO update, evaluation, metrics and checkpoints.

One step = one rollout batch: sample G responses for each prompt (dynamic sampling keeps
only groups whose accuracy is neither 0 nor 1, resampling until the batch is full), grade
them, compute GRPO advantages, then `updates_per_rollout` optimizer updates (the VPPO step)
on consecutive slices of the batch. Metrics go to workdir/metrics.jsonl and TensorBoard;
checkpoints to workdir/checkpoints; a restarted run resumes from the latest checkpoint.

Parameters, optimizer state and batches are sharded over the config's mesh
(vppo_jax/parallel/sharding.py). Multi-host (vppo_jax/parallel/distributed.py): every process runs
the same command; each reads and decodes only its share of the data, the prompt records of
a step are gathered so that all build the same global batch (the one a single process would
read), rewards are graded in shares, and process 0 writes metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from vppo_jax import data as data_lib
from vppo_jax.data.images import open_image
from vppo_jax.errors import InputError
from vppo_jax.models.qwen2_5_vl import lora, with_config
from vppo_jax.parallel import distributed, host_memory, sharding
from vppo_jax.rollout.evaluation import evaluate_prompts
from vppo_jax.rollout.groups import GradedGroups, concatenate, packed_train_batch, sample_and_grade, train_batch
from vppo_jax.rollout.policy import compute_model, load_policy, prompt_builder
from vppo_jax.rollout.rewards import RewardPool
from vppo_jax.trainer import config as config_lib
from vppo_jax.trainer.checkpoints import RunCheckpoints, claim_workdir
from vppo_jax.trainer.collapse_guard import CollapseGuard
from vppo_jax.trainer.metrics import MetricsWriter, Timer
from vppo_jax.trainer.preemption import Preempted, PreemptionWatch
from vppo_jax.trainer.workdir_lock import WorkdirLock
from vppo_jax.vppo import advantages as advantages_lib
from vppo_jax.vppo import programs
from vppo_jax.vppo.advantages import online_group_filter
from vppo_jax.vppo.batch import TrainBatch, init_sharded_state
from vppo_jax.vppo.loss import sequence_kl
from vppo_jax.vppo.pixel_blackening import perturbed_pixel_values
from vppo_jax.vppo.step import needs_scoring


class Trainer:
    """A training run in `workdir`: `train()` runs it to config.train.steps, resuming from the
    latest checkpoint there. The demo and tests use the rest of the public surface:
    `config` (with train.steps resolved), `workdir`, `start_step`, `sampling` (the rollout's
    settings), `validation_prompts`,
    `current_policy()`, `evaluate(key)`, `token_dependency(batch, key)` and `close()`."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.workdir = workdir
        self._resolve_config(config)
        self._claim_workdir()
        try:
            self._load_policy()
            self._build_update()
            self._build_data()
            self._restore_run()
            self._build_grader()  # last: its worker processes are the one thing to stop on a failure
        except BaseException:
            self._release_workdir()
            raise

    def _resolve_config(self, config: ml_collections.ConfigDict):
        """Names checked, train.steps resolved from the epochs (in a copy), batch shapes checked
        against the mesh: everything that can fail before the model loads."""
        config_lib.check_names(config)
        if not config.model.path or not config.data.train_files[0]:
            raise InputError(
                "the config names no model (model.path) or no training data (data.train_files): "
                "set both; configs/tiny.py without them is the embedded default, which "
                "`python -m vppo_jax.train` and `python -m vppo_jax.demo` make first."
            )
        d = config.data
        self.columns = dict(problem_key=d.problem_key, answer_key=d.answer_key, images_key=d.images_key)
        self.train_rows = data_lib.RowSource(d.train_files, self.columns.values())
        config = ml_collections.ConfigDict(config.to_dict())
        config.train.steps = config_lib.training_steps(config, len(self.train_rows))
        self.config = config
        sharding.use_rules(config.sharding_rules)
        self.mesh = sharding.make_mesh(config.mesh)
        check_batch_shapes(config, self.mesh)

    def _claim_workdir(self):
        """Process 0 locks the workdir (vppo_jax/trainer/workdir_lock.py) and claims it for this
        config; when it cannot, every process stops with its reason."""
        self.workdir_lock, refusal = None, None
        if jax.process_index() == 0:
            try:
                self.workdir_lock = WorkdirLock(self.workdir)
                self.workdir_lock.acquire()
                claim_workdir(self.workdir, self.config)
            except InputError as error:
                self._release_workdir()
                refusal = error
        reasons = distributed.allgather(str(refusal) if refusal else None)
        if refusal is not None:
            raise refusal
        if reasons[0] is not None:
            raise InputError(reasons[0])

    def _release_workdir(self):
        if self.workdir_lock is not None:
            self.workdir_lock.release()

    def _load_policy(self):
        """The weights into host memory (`_build_update` places each device's slices), the
        tokenizer and the prompt builder; prints what the image budget makes of a training image."""
        c, d = self.config, self.config.data
        with jax.default_device(_host_device()):
            policy = load_policy(c.model.path, c.model.dtype, c.model.param_dtype)
        self.model_config = policy.model.config.with_compute(
            c.model.remat, c.model.attention_block, config_lib.layer_loop(c.model.layer_loop)
        )
        model = lora.add_adapters(with_config(policy.model, self.model_config), config_lib.lora_config(c))
        self.policy = dataclasses.replace(policy, model=model)
        self.builder = prompt_builder(
            self.policy, d.max_prompt_length, d.min_pixels or None, d.max_pixels or None, d.prompt_template
        )
        if jax.process_index() == 0:
            print(describe_image_budget(self.train_rows[0], self.builder, d), flush=True)
        self.sampling = config_lib.sampling_params(c, self.builder.special)

    def _build_update(self):
        """The sharded train state, the reference policy when a KL is on, and the compiled update
        and scoring programs. The model's arrays move into the state: the policy keeps only its
        tokenizer."""
        self.step_config = config_lib.step_config(self.config)
        self.optimizer = config_lib.optimizer(self.config)
        self.packed_minimums = None  # the largest packed batch's shape so far (`packed_batch`)
        # The reference is the weights model.path names, read again at every start (a resumed
        # run included), so that no checkpoint has to hold a second copy of the model.
        self.reference = None
        if self.step_config.uses_reference:
            self.reference = reference_params(self.policy.model, self.model_config.jnp_dtype, self.mesh)
            estimator = self.step_config.loss.kl_estimator
            self.sequence_kl = jax.jit(
                lambda b: sequence_kl(b.old_logp, b.ref_logp, b.response_mask, estimator),
                out_shardings=sharding.replicated(self.mesh),  # every process reads every row's
            )
        self.graphdef, self.state = init_sharded_state(
            self.policy.model, self.optimizer, self.mesh, config_lib.trainable(self.config)
        )
        self.policy = dataclasses.replace(self.policy, model=None)
        self.train_step = programs.make_train_step(self.step_config, self.optimizer, self.graphdef, self.mesh)
        self.score_rollouts = programs.make_score_rollouts(self.step_config, self.graphdef, self.mesh)

    def _build_data(self):
        """This process's share of the training stream, and the validation prompts (all
        processes' shares gathered, in file order)."""
        d = self.config.data
        columns = self.columns | dict(process_index=jax.process_index(), process_count=jax.process_count())
        self.data = data_lib.prompt_iterator(
            data_lib.prompt_dataset(d.train_files, self.builder, seed=d.seed, **columns)
        )
        self.skips = data_lib.SkipCounter()
        self.validation_prompts = []
        if d.val_files and d.val_files[0]:
            val = data_lib.prompt_dataset(
                d.val_files, self.builder, seed=d.seed, shuffle=False, num_epochs=1, **columns
            )
            val = sorted(sum(distributed.allgather(list(val)), []), key=lambda p: p.index)
            self.validation_prompts = [p for p in val if not p.skipped][: self.config.eval.max_examples or None]

    def _build_grader(self):
        r = self.config.reward
        self.reward_pool = RewardPool(min(r.workers, os.cpu_count() or 1))
        self.grade = functools.partial(self.reward_pool.score_responses, reward=r.name, timeout_s=r.timeout_s)
        if jax.process_count() > 1:
            self.grade = functools.partial(_grade_in_shares, self.grade)

    def _restore_run(self):
        """The run's random key, collapse guard, checkpoints and metrics, resumed from the
        latest checkpoint when there is one."""
        c = self.config
        self.rng = jax.random.key(c.train.seed)
        self.collapse_guard = CollapseGuard(
            c.rollout.prompts_per_step, c.rollout.min_live_share, c.rollout.max_starved_steps
        )
        self.checkpoints = RunCheckpoints(self.workdir, c.checkpoint.keep)
        self.start_step = self._resume()
        self.metrics = MetricsWriter(
            self.workdir,
            resume_step=self.start_step,
            enabled=jax.process_index() == 0,
            logging=c.logging,
            run_config=c.to_dict(),
        )

    def _resume(self) -> int:
        """The steps done: those of the newest checkpoint that restores (its state restored here), or 0."""
        restored = self.checkpoints.restore_latest(self.state)
        if restored is None:
            return 0
        latest, self.state, self.rng, data_states, hosts = restored
        if len(data_states) != jax.process_count():
            raise InputError(
                f"checkpoint {latest} was written by {len(data_states)} processes and this run has "
                f"{jax.process_count()}: each process resumes its own share of the data."
            )
        self.data.set_state(data_states[jax.process_index()])
        self.skips.counts.update(hosts[jax.process_index()]["skips"])
        self.collapse_guard.restore(hosts[jax.process_index()].get("collapse_guard", {}))
        # The packed batches' shapes so far: the resumed run compiles what the uninterrupted one would.
        self.packed_minimums = hosts[jax.process_index()].get("packed_minimums")
        return latest

    def current_policy(self):
        """The policy with the state's current parameters in the compute dtype, for sampling."""
        return dataclasses.replace(
            self.policy, model=compute_model(self.graphdef, self.state.model_params, self.model_config)
        )

    @contextlib.contextmanager
    def optimizer_state_on_host(self):
        """The optimizer state in host memory for the duration (rollout.offload_optimizer_state,
        where the devices have a host memory apart from their own), back on the devices after."""
        if not (self.config.rollout.offload_optimizer_state and sharding.can_offload_to_host(self.mesh)):
            yield
            return
        on_device = jax.tree.map(lambda a: a.sharding, self.state.opt_state)
        self.state = self.state.replace(opt_state=jax.device_put(self.state.opt_state, sharding.on_host(on_device)))
        try:
            yield
        finally:
            self.state = self.state.replace(opt_state=jax.device_put(self.state.opt_state, on_device))

    def next_prompts(self, count: int) -> list:
        """`count` prompts: this process's share read here, the others' gathered, in the order
        one process reading the whole stream would have them (without skips)."""
        prompts = []
        while len(prompts) < count // jax.process_count():
            record = next(self.data)
            if not self.skips.count(record):  # skips are counted and warned about once per kind
                prompts.append(record)
        return distributed.interleave(distributed.allgather(prompts))

    def collect(self, key: jax.Array) -> tuple[GradedGroups, dict]:
        """Dynamic sampling: rounds of sampling until prompts_per_step groups pass the filter.

        The batch always holds prompts_per_step groups (static shapes): when the rounds run
        out, filtered-out groups fill it as `live=False` groups, which carry no loss.
        """
        r, a = self.config.rollout, self.config.algo
        policy = self.current_policy()
        kept, dropped, sampled_rewards = [], [], []
        stats = {"rollout/timeouts": 0, "rollout/grader_errors": 0, "rollout/truncated": 0.0}
        rounds = 0
        while rounds < r.max_filter_rounds and sum(len(g.prompts) for g in kept) < r.prompts_per_step:
            prompts = self.next_prompts(r.prompts_per_step)
            keys = jax.random.split(jax.random.fold_in(key, rounds), len(prompts) * r.group_size)
            groups, grader = sample_and_grade(
                policy, prompts, keys, self.sampling, self.grade, self.model_config.image_token_id, self.mesh
            )
            keep = np.ones(len(prompts), bool)
            if a.online_filter:
                keep = np.asarray(online_group_filter(groups.rewards, r.group_size, tuple(a.accuracy_bounds))[0])
            stats["rollout/timeouts"] += grader["timeouts"]
            stats["rollout/grader_errors"] += grader["errors"]
            stats["rollout/truncated"] += float(groups.truncated.sum())
            sampled_rewards.append(groups.rewards)
            kept.append(groups.select(np.nonzero(keep)[0]))
            filler = groups.select(np.nonzero(~keep)[0])
            filler.live[:] = False
            dropped.append(filler)
            rounds += 1
        pool = concatenate(kept + dropped, self.sampling.pad_token_id)
        batch = pool.select(np.arange(r.prompts_per_step))
        rewards = np.concatenate(sampled_rewards)
        stats |= {
            "rollout/accuracy": float(rewards.mean()),
            "rollout/filter_rounds": rounds,
            "rollout/live_groups": int(batch.live.sum()),
            # Groups that failed the filter, padding the batch after the last round (no loss).
            "rollout/filler_groups": int((~batch.live).sum()),
            "rollout/response_length": float(batch.mask.sum(1).mean()),
        }
        stats["rollout/truncated"] /= len(rewards)
        return batch, stats

    def advantages(self, groups: GradedGroups, kl: np.ndarray | None = None) -> np.ndarray:
        """algo.advantage's estimator over the whole rollout batch (REINFORCE++ whitens across
        it); with `kl`, each response's summed KL to the reference, its reward first loses
        algo.kl_penalty_coef times that (PPO-style KL penalty)."""
        c = self.config
        rewards = groups.rewards if kl is None else groups.rewards - self.step_config.kl_penalty_coef * kl
        lengths = groups.mask.sum(1) * np.repeat(groups.live, c.rollout.group_size)  # filler rows weigh nothing
        return np.asarray(advantages_lib.advantages(c.algo.advantage, rewards, c.rollout.group_size, lengths))

    def update_batches(self, groups: GradedGroups, key: jax.Array) -> list[TrainBatch]:
        """`updates_per_rollout` TrainBatches over consecutive slices of the groups; `key` seeds
        the host-side blackening of the "blacken_pixels" perturbation."""
        c = self.config
        per_update = len(groups.prompts) // c.train.updates_per_rollout
        advantages = self.advantages(groups).reshape(c.train.updates_per_rollout, -1)
        batches = []
        for u in range(c.train.updates_per_rollout):
            part = groups.select(np.arange(u * per_update, (u + 1) * per_update))
            if config_lib.packs(c):
                batches.append(self.packed_batch(part, advantages[u]))
                continue
            perturbed = None
            blacken_pixels = self.step_config.vppo and self.step_config.perturbation == "blacken_pixels"
            if blacken_pixels and "pixel_values" in part.prompt_arrays:
                seed = np.asarray(jax.random.key_data(jax.random.fold_in(key, u)))
                perturbed = perturbed_pixel_values(
                    part.prompts, c.rollout.group_size, self.builder.image_processor, seed, c.algo.blacken_prob
                )
            prompt_tokens = part.prompt_arrays["input_ids"].shape[1]
            micro = config_lib.micro_batches(
                c,
                len(part.texts),
                prompt_tokens + part.tokens.shape[1],
                sharding.batch_shards(self.mesh),
                prompt_tokens,
                c.rollout.group_size,
            )
            batches.append(train_batch(self.model_config, part, advantages[u], micro, perturbed))
        return batches

    def packed_batch(self, groups: GradedGroups, advantages: np.ndarray) -> TrainBatch:
        """The groups in packed micro-batches (train.packing), at least as large as every earlier
        one (`packed_minimums`), so that the update compiles again only when a batch needs more room."""
        batch = packed_train_batch(
            self.model_config,
            groups,
            advantages,
            self.config.train.micro_batch_tokens,
            sharding.batch_shards(self.mesh),
            rows_alone=self.step_config.vppo,
            minimums=self.packed_minimums,
        )
        self.packed_minimums = batch.packed_minimums()
        return batch

    def evaluate(self, key: jax.Array) -> dict[str, float]:
        e = self.config.eval
        params = dataclasses.replace(self.sampling, temperature=e.temperature, top_p=e.top_p, top_k=0)
        summary, _ = evaluate_prompts(
            self.current_policy(), self.validation_prompts, e.k, params, self.grade, key, mesh=self.mesh
        )
        return {f"eval/{name}": value for name, value in summary.items()}

    def token_dependency(self, batch: TrainBatch, key: jax.Array) -> jax.Array:
        """Each response token's visual dependency under the current policy and the config's
        estimator, whether or not this run trains with VPPO: (M, b, T)."""
        score = programs.make_score_rollouts(dataclasses.replace(self.step_config, vppo=True), self.graphdef, self.mesh)
        return score(self.state.model_params, batch, key).dependency

    def update(
        self, groups: GradedGroups, score_key: jax.Array, update_key: jax.Array, timer: Timer
    ) -> tuple[dict, float]:
        """`updates_per_rollout` optimizer updates on the graded groups; returns their mean metrics
        and the response tokens they trained on."""
        c = self.config
        batches = self.update_batches(groups, score_key)
        on_host = batches  # each row's place in its batch (packed batches hold their rows in their own order)
        tokens = float(sum(np.asarray(b.response_mask).sum() for b in batches))  # while still on the host
        metrics = {}
        shape = (*batches[0].targets.shape[:2], batches[0].packed is not None)
        if needs_scoring(self.step_config, c.train.updates_per_rollout, *shape):
            # pi_old statistics for every slice from the rollout policy, before any update.
            with timer("dependency"):
                batches = jax.block_until_ready(
                    [  # timed here, not under the update
                        self.score_rollouts(
                            self.state.model_params, b, jax.random.fold_in(score_key, i), self.reference
                        )
                        for i, b in enumerate(batches)
                    ]
                )
            if self.step_config.kl_penalty_coef:  # the rewards lose their KL before the advantages
                kl = np.concatenate([h.in_rollout_order(self.sequence_kl(b)) for h, b in zip(on_host, batches)])
                advantages = self.advantages(groups, kl).reshape(len(batches), -1)
                batches = [b.replace(advantages=h.in_batch_order(a)) for h, b, a in zip(on_host, batches, advantages)]
                valid = groups.mask.any(1) & np.repeat(groups.live, c.rollout.group_size)
                metrics["rollout/kl_penalty"] = float(self.step_config.kl_penalty_coef * kl[valid].mean())
        with timer("update"):
            updates = []
            for i, batch in enumerate(batches):
                self.state, update_metrics = self.train_step(self.state, batch, jax.random.fold_in(update_key, i))
                updates.append(jax.device_get(update_metrics))
        return metrics | {name: float(np.mean([u[name] for u in updates])) for name in updates[0]}, tokens

    def train_one_step(self, step: int) -> dict:
        """Rollout, update, evaluation (every eval.every_steps), metrics and checkpoint of one step."""
        c = self.config
        timer, key = Timer(), jax.random.fold_in(self.rng, step)
        rollout_key, score_key, update_key, eval_key = jax.random.split(key, 4)
        with timer("rollout"), self.optimizer_state_on_host():
            groups, metrics = self.collect(rollout_key)
            host_memory.release_freed_memory()  # the sampler's caches, before the update's activations
        metrics |= self.collapse_guard.observe(step, int(groups.live.sum()), metrics)
        tokens = 0.0
        if groups.live.any():  # an empty batch has no gradient: no update, only the guard's count
            update_metrics, tokens = self.update(groups, score_key, update_key, timer)
            metrics |= update_metrics
            host_memory.release_freed_memory()  # the update's activations, before the next rollout
        skip_counts = distributed.allgather(self.skips.metrics())  # every process's own skips
        metrics |= {name: sum(counts[name] for counts in skip_counts) for name in skip_counts[0]}
        metrics["train/skipped_updates"] = int(self.state.skipped_steps)
        if self.validation_prompts and (step + 1) % c.eval.every_steps == 0:
            with timer("eval"):
                metrics |= self.evaluate(eval_key)
        timings = timer.metrics()
        metrics |= timings | {"time/tokens_per_second": tokens / max(timings["time/step"], 1e-9)}
        self.metrics.write(step, metrics)
        every = c.checkpoint.every_steps
        if every and ((step + 1) % every == 0 or step + 1 == c.train.steps):
            self.save_checkpoint(step + 1)
        return metrics

    def save_checkpoint(self, steps_done: int):
        """Starts writing the checkpoint of the run after `steps_done` steps (unless written already)."""
        if self.checkpoints.writing == steps_done:
            return
        self.checkpoints.save(
            steps_done,
            self.state,
            self.rng,
            self.data.get_state(),
            {
                "skips": dict(self.skips.counts),
                "collapse_guard": self.collapse_guard.state(),
                "packed_minimums": self.packed_minimums,
            },
        )

    def train(self):
        """Runs the steps left; on SIGTERM or SIGINT stops after the step in flight with its
        checkpoint written (vppo_jax/trainer/preemption.py) and raises Preempted."""
        steps = self.config.train.steps
        progress = tqdm(
            range(self.start_step, steps),
            initial=self.start_step,
            total=steps,
            desc="train",
            unit="step",
            disable=jax.process_index() != 0,
        )
        try:
            with PreemptionWatch() as preemption:
                for step in progress:
                    self.checkpoints.check_written()  # a write that failed stops the run before the next step
                    metrics = self.train_one_step(step)
                    progress.set_postfix(
                        acc=f"{metrics['rollout/accuracy']:.2f}",
                        loss=f"{metrics.get('loss', 0):.3f}",
                        live=f"{metrics['rollout/live_share']:.2f}",
                    )
                    self.collapse_guard.stop_if_collapsed(step)
                    if (reason := preemption.stop_after(step + 1)) and step + 1 < steps:
                        self._stop_for(reason, step + 1)
        finally:  # a run stopped early still finishes writing its checkpoints
            progress.close()  # its line ended before the one an error or a preemption prints
            self.close()

    def _stop_for(self, reason: str, steps_done: int):
        """Checkpoints the finished steps (unless checkpoint.every_steps=0 asks for none) and raises
        Preempted; `train` then waits for the write."""
        progress = f"{reason} after step {steps_done - 1} ({steps_done} of {self.config.train.steps} steps done)"
        if not self.config.checkpoint.every_steps:
            raise Preempted(f"{progress}; no checkpoint written (checkpoint.every_steps=0)")
        self.save_checkpoint(steps_done)
        raise Preempted(
            f"{progress}; checkpoint {steps_done} written in {self.checkpoints.directory}: "
            "rerun the same command to resume"
        )

    def close(self):
        """Waits for the checkpoint writes, closes the metrics, stops the reward workers and releases
        the workdir; each even when one before it failed."""
        try:
            self.checkpoints.close()
        finally:
            try:
                self.metrics.close()
            finally:
                self.reward_pool.close()
                self._release_workdir()


def check_batch_shapes(config: ml_collections.ConfigDict, mesh):
    """Refuses, before anything is loaded, batches that the processes or the mesh cannot split."""
    r, t = config.rollout, config.train
    if r.prompts_per_step % (t.updates_per_rollout * jax.process_count()):
        raise InputError(
            f"rollout.prompts_per_step={r.prompts_per_step} must be a multiple of "
            f"train.updates_per_rollout x processes = {t.updates_per_rollout} x {jax.process_count()}."
        )
    rows = r.prompts_per_step * r.group_size // t.updates_per_rollout
    micro = t.micro_batches or 1  # a token budget (micro_batches=0) always splits the rows evenly
    if rows % micro:
        raise InputError(f"{rows} rows per update do not split into train.micro_batches={t.micro_batches}.")
    sharding.check_rows(
        rows // micro,
        mesh,
        "rows per micro-batch (rollout.prompts_per_step x "
        "rollout.group_size / train.updates_per_rollout / train.micro_batches)",
    )


def describe_image_budget(row: data_lib.Row, builder, d: ml_collections.ConfigDict) -> str:
    """What the image budget (config.data `d`) and the processor make of a row's first image, in one line."""
    prompt = data_lib.RowToPrompt(builder, d.problem_key, d.answer_key, d.images_key)(row)
    if prompt.skipped or not len(prompt.image_grid_thw):
        return "images: the first training row has no usable image"
    original = open_image(row.fields[d.images_key][0], row.base_dir)
    processor, (_, rows, cols) = builder.image_processor, prompt.image_grid_thw[0]
    return (
        f"images: the first training image ({original.width} x {original.height} px) reaches the model at "
        f"{cols * processor.patch_size} x {rows * processor.patch_size} px, {rows * cols // processor.merge_size**2} "
        f"image tokens (data.min_pixels={d.min_pixels}, data.max_pixels={d.max_pixels}, then sides "
        f"rounded to multiples of {processor.patch_size * processor.merge_size})"
    )


def reference_params(model: nnx.Module, dtype, mesh):
    """The model's parameters as the reference policy of a KL: cast to the compute dtype (it is
    only ever run forward) and placed like the policy's parameters. A copy with buffers of its
    own: the train state that takes the model's arrays is donated at every update. The copy is
    made where the loaded model is, in host memory, never whole on one accelerator."""
    with jax.default_device(_host_device()):
        params = jax.tree.map(lambda p: jnp.array(p, dtype, copy=True), nnx.state(model, nnx.Param))
    return sharding.put(params, sharding.param_shardings(mesh, params))


def _host_device():
    """This host's CPU device where JAX has one (it does unless JAX_PLATFORMS leaves it out)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return jax.local_devices()[0]


def _grade_in_shares(grade, responses: list[str], answers: list[str]):
    """`grade` with every process grading its share of the responses."""

    def combine(parts):
        rewards = np.concatenate([np.asarray(r, np.float32).reshape(-1) for r, _ in parts])
        return rewards, {key: sum(stats[key] for _, stats in parts) for key in parts[0][1]}

    return distributed.shared_work(
        lambda pairs: grade([p[0] for p in pairs], [p[1] for p in pairs]), list(zip(responses, answers)), combine
    )
