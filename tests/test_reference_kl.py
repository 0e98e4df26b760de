"""A KL to the reference policy in a real run: the reference is the initial model, its
log-probs are the initial policy's, they stay while the policy moves, and a resumed run
reads the reference from model.path again (no checkpoint holds it)."""

import jax
import numpy as np

from configs import tiny
from vppo_jax.trainer.metrics import read_metrics
from vppo_jax.trainer.trainer import Trainer

from numpy_reference import numpy_reinforce_pp_baseline_advantages


def kl_config(assets):
    c = tiny.get_config("test")
    c.model.path, c.data.train_files, c.data.val_files = assets["model"], (assets["train"],), (assets["val"],)
    c.train.steps, c.checkpoint.every_steps, c.eval.every_steps = 2, 2, 100
    c.rollout.prompts_per_step, c.rollout.group_size, c.rollout.max_new_tokens = 2, 2, 4
    c.algo.online_filter = False  # a random policy's groups would all be filtered out
    c.optim.warmup_steps = 0  # the first step already moves the policy
    c.reward.workers = 1
    # Both KLs, the loss term and the reward penalty, with the estimator and advantages researchers pick.
    c.algo.kl_coef, c.algo.kl_penalty_coef, c.algo.kl_estimator = 0.1, 0.1, "k2"
    c.algo.advantage = "reinforce_pp_baseline"
    return c


def leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def test_the_reference_is_the_initial_policy_and_stays_it(tmp_path, tiny_task):
    config = kl_config(tiny_task)
    trainer = Trainer(config, str(tmp_path / "run"))
    try:
        initial = leaves(trainer.state.params)
        for reference, param in zip(leaves(trainer.reference), initial):
            np.testing.assert_array_equal(reference, param)  # the tiny model computes in float32
        groups, _ = trainer.collect(jax.random.key(0))
        (batch,) = trainer.update_batches(groups, jax.random.key(1))
        score = lambda: trainer.score_rollouts(trainer.state.params, batch, jax.random.key(2), trainer.reference)
        before = score()
        mask = np.asarray(before.response_mask)
        assert mask.any()
        np.testing.assert_allclose(np.asarray(before.ref_logp)[mask], np.asarray(before.old_logp)[mask], atol=1e-6)

        trainer.train()
        for reference, param in zip(leaves(trainer.reference), initial):
            np.testing.assert_array_equal(reference, param)
        moved = max(np.abs(a - b).max() for a, b in zip(leaves(trainer.state.params), initial))
        assert moved > 1e-4
        after = score()
        np.testing.assert_array_equal(np.asarray(after.ref_logp), np.asarray(before.ref_logp))
        assert np.abs(np.asarray(after.old_logp) - np.asarray(before.old_logp))[mask].max() > 1e-4
        trained = leaves(trainer.state.params)

        # The reward penalty: each response's summed k2, times kl_penalty_coef, off its reward
        # before the advantages.
        rows = lambda a: np.asarray(a, np.float64).reshape(-1, mask.shape[-1])
        kl = (0.5 * (rows(after.old_logp) - rows(after.ref_logp)) ** 2 * rows(mask)).sum(-1)
        np.testing.assert_allclose(np.asarray(trainer.sequence_kl(after)).reshape(-1), kl, rtol=1e-5)
        lengths = rows(mask).sum(-1)
        expected = numpy_reinforce_pp_baseline_advantages(groups.rewards - 0.1 * kl, 2, lengths)
        np.testing.assert_allclose(trainer.advantages(groups, kl), expected, rtol=1e-5, atol=1e-6)
        metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
        assert metrics["kl_loss"] > 0 and metrics["rollout/kl_penalty"] > 0
    finally:
        trainer.close()

    resumed = Trainer(config, str(tmp_path / "run"))
    try:
        assert resumed.start_step == 2
        for param, expected in zip(leaves(resumed.state.params), trained):
            np.testing.assert_array_equal(param, expected)
        for reference, param in zip(leaves(resumed.reference), initial):
            np.testing.assert_array_equal(reference, param)
    finally:
        resumed.close()
