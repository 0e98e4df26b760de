"""The compiled VPPO step on a tiny Qwen2.5-VL, checked against transformers and NumPy."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from vppo_jax.models import qwen2_5_vl
from vppo_jax.trainer.optimizer import make_optimizer
from vppo_jax.vppo import perturbation, programs
from vppo_jax.vppo import step as step_lib
from vppo_jax.vppo.batch import build_train_batch, init_state
from vppo_jax.vppo.perturbation import CLIP_MEAN, CLIP_STD

from hf_reference import hf_logits, processor_batch, text_ids, tiny_hf_model
from numpy_reference import numpy_grpo_advantages
from update_checks import assert_same_update, parameter_changes

GROUP = 4
RESPONSE_LENGTHS = [5, 9, 0, 7, 3, 10, 6, 8]  # one empty response; lengths where ceil(0.4 L) rounds up
REWARDS = np.array([1, 0, 0, 1, 0, 0, 0, 1], np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf_model = tiny_hf_model(seed=4)
    path = tmp_path_factory.mktemp("step") / "hf"
    hf_model.save_pretrained(path)
    model = qwen2_5_vl.from_pretrained(str(path))
    samples = []
    for row, length in enumerate(RESPONSE_LENGTHS):
        prompt = text_ids(6, 100 + row // GROUP)  # the group's prompt
        samples.append((prompt + text_ids(length, 200 + row), [(56, 84)]))
    arrays = processor_batch(samples, seed=7)
    # Rows of a group share the prompt image: copy the first image of each group.
    per_image = arrays["pixel_values"].shape[0] // len(samples)
    pixels = arrays["pixel_values"].reshape(len(samples), per_image, -1)
    pixels = np.repeat(pixels[::GROUP], GROUP, axis=0).reshape(arrays["pixel_values"].shape)
    arrays["pixel_values"] = pixels
    length = arrays["input_ids"].shape[1]
    response = np.zeros_like(arrays["input_ids"], bool)
    for row, n in enumerate(RESPONSE_LENGTHS):
        response[row, length - n :] = n > 0
    return hf_model, model, arrays, response


def init(model, optimizer):
    """A train state on copies of the model's arrays: the step donates (consumes) its state."""
    graphdef, state = init_state(model, optimizer)
    return graphdef, jax.tree.map(jnp.array, state)


def train_batch(model, arrays, response, micro_batches=1):
    return build_train_batch(
        model.config,
        arrays["input_ids"],
        arrays["attention_mask"],
        response,
        numpy_grpo_advantages(REWARDS, GROUP),
        arrays["pixel_values"],
        arrays["image_grid_thw"],
        micro_batches,
    )


def hf_token_logprobs(hf_model, arrays, pixel_values=None):
    batch = dict(arrays, pixel_values=arrays["pixel_values"] if pixel_values is None else pixel_values)
    logits = torch.from_numpy(hf_logits(hf_model, batch)).double()
    return torch.log_softmax(logits, -1).numpy()


@pytest.mark.parametrize("perturbation", ["gray", "blacken_pixels"])
def test_scores_match_transformers(setup, perturbation):
    """old_logp = HF teacher-forced log-probs; exact-KL dependency against a gray image =
    KL between HF's distributions with the original and the gray image (NumPy). The gray
    image is made in the step ("gray") or handed over as host-made pixels ("blacken_pixels"
    reads whatever the host blackened)."""
    hf_model, model, arrays, response = setup
    gray = ((128 / 255 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)).astype(np.float32)
    gray_pixels = np.broadcast_to(np.repeat(gray, 2 * 14 * 14), arrays["pixel_values"].shape).copy()
    config = step_lib.StepConfig(group_size=GROUP, estimator="kl", perturbation=perturbation)
    graphdef, state = init(model, optax.sgd(0.0))
    batch = train_batch(model, arrays, response)
    if perturbation == "blacken_pixels":
        batch = build_train_batch(
            model.config,
            arrays["input_ids"],
            arrays["attention_mask"],
            response,
            batch.advantages[0],
            arrays["pixel_values"],
            arrays["image_grid_thw"],
            perturbed_pixel_values=gray_pixels,
        )
    scored = programs.make_score_rollouts(config, graphdef)(state.params, batch, jax.random.key(0))
    logp = hf_token_logprobs(hf_model, arrays)
    logq = hf_token_logprobs(hf_model, arrays, gray_pixels)

    # The batch covers the positions predicting a response token: the last R but one.
    length, window = arrays["input_ids"].shape[1], scored.old_logp.shape[-1]
    assert window == max(RESPONSE_LENGTHS)
    positions = slice(length - window - 1, length - 1)
    targets, mask = arrays["input_ids"][:, length - window :], response[:, length - window :]
    logp, logq = logp[:, positions], logq[:, positions]
    expected_logp = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    expected_kl = (np.exp(logp) * (logp - logq)).sum(-1)
    np.testing.assert_allclose(np.asarray(scored.old_logp[0])[mask], expected_logp[mask], atol=1e-4)
    np.testing.assert_allclose(np.asarray(scored.dependency[0])[mask], expected_kl[mask], atol=1e-4)
    assert np.all(np.asarray(scored.dependency[0])[~mask] == 0)
    assert expected_kl[mask].max() > 1e-4  # the image matters, so the check has teeth


def test_vppo_step_lowers_the_loss_on_a_fixed_batch(setup):
    _, model, arrays, response = setup
    config = step_lib.StepConfig(group_size=GROUP)
    optimizer = make_optimizer(1e-3)
    graphdef, state = init(model, optimizer)
    batch = programs.make_score_rollouts(config, graphdef)(
        state.params, train_batch(model, arrays, response), jax.random.key(1)
    )
    train_step = programs.make_train_step(config, optimizer, graphdef)
    losses = []
    for i in range(6):
        state, metrics = train_step(state, batch, jax.random.key(2))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 1e-3, losses
    assert int(state.step) == 6 and int(state.skipped_steps) == 0
    # TGF keeps ceil(0.4 |o|) tokens of each response (NumPy count, not the code under test).
    lengths = np.array(RESPONSE_LENGTHS)
    selected = sum(int(np.ceil(0.4 * n - 1e-9)) for n in lengths)
    assert float(metrics["tgf/selected_fraction"]) == pytest.approx(selected / lengths.sum(), abs=1e-6)
    assert float(metrics["tas/alpha_min"]) >= 0.9 - 1e-6
    assert np.isfinite(float(metrics["dependency/token_p90"]))


def test_gradient_accumulation_over_4_micro_batches_equals_full_batch(setup):
    _, model, arrays, response = setup
    config = step_lib.StepConfig(group_size=GROUP)
    optimizer = optax.sgd(1.0)  # the parameter change is then exactly -gradient
    graphdef, state = init(model, optimizer)
    full = programs.make_score_rollouts(config, graphdef)(
        state.params, train_batch(model, arrays, response), jax.random.key(3)
    )
    micro = train_batch(model, arrays, response, micro_batches=4)
    regroup = lambda a: a.reshape(4, -1, *a.shape[2:])
    micro = micro.replace(
        old_logp=regroup(full.old_logp), dependency=regroup(full.dependency), old_entropy=regroup(full.old_entropy)
    )
    train_step = programs.make_train_step(config, optimizer, graphdef)
    (grads_full, metrics_full), (grads_micro, metrics_micro) = parameter_changes(train_step, state, (full, micro))
    assert_same_update(grads_full, grads_micro)
    assert float(metrics_full["loss"]) == pytest.approx(float(metrics_micro["loss"]), abs=1e-5)


def test_another_loss_and_a_kl_accumulate_over_micro_batches_exactly(setup):
    """VPPO with GSPO-token, Dr.GRPO's constant normaliser and a k3 KL term: 4 micro-batches
    give the update of one (sums over the whole batch's counts; every loss and aggregation is
    checked so against NumPy in tests/test_policy_losses.py). The reference's log-probs come
    from the scoring pass, here on weights other than the policy's so that the KL is not 0."""
    _, model, arrays, response = setup
    loss = step_lib.LossConfig(policy_loss="gspo_token", aggregation="constant", kl_coef=0.1)
    config = step_lib.StepConfig(group_size=GROUP, loss=loss)
    optimizer = optax.sgd(1.0)  # the parameter change is then exactly -gradient
    graphdef, state = init(model, optimizer)
    reference = jax.tree.map(lambda p: p * 0.9, state.params)
    full = programs.make_score_rollouts(config, graphdef)(
        state.params, train_batch(model, arrays, response), jax.random.key(3), reference
    )
    mask = np.asarray(full.response_mask)
    assert np.abs(np.asarray(full.ref_logp - full.old_logp))[mask].min() > 0
    regroup = lambda a: a.reshape(4, -1, *a.shape[2:])
    micro = train_batch(model, arrays, response, micro_batches=4).replace(
        **{name: regroup(getattr(full, name)) for name in ("old_logp", "dependency", "old_entropy", "ref_logp")}
    )
    train_step = programs.make_train_step(config, optimizer, graphdef)
    (one, metrics_one), (four, metrics_four) = parameter_changes(train_step, state, (full, micro))
    assert_same_update(one, four)
    assert float(metrics_one["kl_loss"]) > 1e-4
    for name in ("loss", "kl_loss", "pg_loss"):
        assert float(metrics_one[name]) == pytest.approx(float(metrics_four[name]), abs=1e-5)


def test_per_group_tas_accumulates_in_pass_over_whole_groups_exactly(setup):
    """With TAS per group and one group per micro-batch, no micro-batch's shaping needs
    another's: VPPO runs in-pass over 2 micro-batches (no scoring pass) and its update equals
    the one-pass update (a deterministic perturbation, so both draw the same I')."""
    _, model, arrays, response = setup
    config = step_lib.StepConfig(group_size=GROUP, tas_scope="per_group", perturbation="gray")
    assert not step_lib.needs_scoring(config, 1, 2, GROUP)
    optimizer = optax.sgd(1.0)  # the parameter change is then exactly -gradient
    graphdef, state = init(model, optimizer)
    train_step = programs.make_train_step(config, optimizer, graphdef)
    batches = [train_batch(model, arrays, response, micro_batches) for micro_batches in (1, 2)]
    assert not any(batch.scored for batch in batches)
    (one, metrics_one), (two, metrics_two) = parameter_changes(train_step, state, batches)
    assert_same_update(one, two)
    for name in ("loss", "tas/alpha_max", "dependency/token_mean"):
        assert float(metrics_one[name]) == pytest.approx(float(metrics_two[name]), abs=1e-5)


def test_which_steps_need_a_scoring_pass(setup):
    """pi_old from the update's own forward unless a later update reuses the rollouts, or the
    shaping of one micro-batch needs the others' dependency (global TAS, or groups split)."""
    vppo = step_lib.StepConfig(group_size=GROUP)
    per_group = step_lib.StepConfig(group_size=GROUP, tas_scope="per_group")
    assert not step_lib.needs_scoring(vppo, 1, 1, 8)
    assert step_lib.needs_scoring(vppo, 1, 2, 4)  # global TAS over two micro-batches
    assert not step_lib.needs_scoring(per_group, 1, 2, 4)
    assert step_lib.needs_scoring(per_group, 1, 4, 2)  # half groups
    assert not step_lib.needs_scoring(step_lib.StepConfig(group_size=GROUP, tas=False), 1, 4, 2)
    assert not step_lib.needs_scoring(step_lib.StepConfig(vppo=False), 1, 4, 2)
    assert step_lib.needs_scoring(per_group, 3, 1, 8)  # later updates are off-policy
    assert step_lib.extra_forwards(per_group, 1, 2, 4) == (0, 1)
    assert step_lib.extra_forwards(vppo, 1, 2, 4) == (1, 1)
    _, model, arrays, response = setup
    graphdef, state = init(model, optax.sgd(0.0))
    batch = train_batch(model, arrays, response, micro_batches=2)
    with pytest.raises(ValueError, match="global TAS needs precomputed scores"):
        jax.eval_shape(
            lambda s: step_lib.train_step(vppo, optax.sgd(0.0), graphdef, s, batch, jax.random.key(0)), state
        )
    # A KL to the reference: its log-probs come from the scoring pass, whatever the micro-batching.
    kl = step_lib.StepConfig(group_size=GROUP, tas_scope="per_group", loss=step_lib.LossConfig(kl_coef=0.1))
    reward_kl = step_lib.StepConfig(vppo=False, kl_penalty_coef=0.1)
    assert step_lib.needs_scoring(kl, 1, 1, 8) and step_lib.needs_scoring(reward_kl, 1, 1, 8)
    assert step_lib.extra_forwards(kl, 1, 1, 8) == (2, 1)  # pi_old's and the reference's
    with pytest.raises(ValueError, match="loss.kl_coef needs the reference's log-probs"):
        jax.eval_shape(lambda s: step_lib.train_step(kl, optax.sgd(0.0), graphdef, s, batch, jax.random.key(0)), state)


def test_grpo_baseline_traces_no_perturbed_forward(setup, monkeypatch):
    _, model, arrays, response = setup
    calls = []
    original = perturbation.perturb_images
    monkeypatch.setattr(perturbation, "perturb_images", lambda *a: calls.append(1) or original(*a))
    batch = train_batch(model, arrays, response)
    for vppo in (False, True):
        config = step_lib.StepConfig(group_size=GROUP, vppo=vppo)
        graphdef, state = init(model, optax.sgd(0.0))
        jax.jit(lambda s, b, k: step_lib.train_step(config, optax.sgd(0.0), graphdef, s, b, k)).lower(
            state, batch, jax.random.key(0)
        )
        assert len(calls) == (1 if vppo else 0)


def test_non_finite_update_is_skipped(setup):
    _, model, arrays, response = setup
    config = step_lib.StepConfig(group_size=GROUP)
    optimizer = make_optimizer(1e-3)
    graphdef, state = init(model, optimizer)
    batch = train_batch(model, arrays, response)
    advantages = batch.advantages.copy()
    advantages[0, 1] = np.nan  # e.g. a reward that came back NaN
    batch = batch.replace(advantages=advantages)
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = programs.make_train_step(config, optimizer, graphdef)(state, batch, jax.random.key(0))
    assert float(metrics["skipped"]) == 1.0 and int(state.skipped_steps) == 1
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_static_tas_needs_beta_max():
    with pytest.raises(ValueError, match="beta_max"):
        step_lib.StepConfig(tas_mode="static")
    with pytest.raises(ValueError, match="estimator"):
        step_lib.StepConfig(estimator="l2")
    with pytest.raises(ValueError, match="policy_loss='gspo' has no per-token term for TGF"):
        step_lib.StepConfig(loss=step_lib.LossConfig(policy_loss="gspo"))
    step_lib.StepConfig(tgf=False, loss=step_lib.LossConfig(policy_loss="gspo"))  # GSPO without TGF
    step_lib.StepConfig(loss=step_lib.LossConfig(policy_loss="gspo_token"))  # or token by token


def scope_names(lowered: jax.stages.Lowered) -> set[str]:
    """The scopes in the operations' names of a lowered program: its text names each operation
    as loc("jit(f)/jvp(outer)/inner/op"), beside file and function locations."""
    names = re.findall(r'loc\("([^"]+)"', lowered.as_text(debug_info=True))
    parts = {part for name in names if "/" in name and not name.startswith("/") for part in name.split("/")[:-1]}
    return {re.sub(r"^(\w+\()+|\)+$", "", part) for part in parts}  # jvp(loss) -> loss


def test_a_profile_names_the_step_phases_and_the_model_blocks(setup):
    """The compiled step's operations carry the names of its phases and of the model's blocks
    (jax.named_scope), which a profile shows: an in-pass VPPO step, a scoring pass, a prefill."""
    _, model, arrays, response = setup
    config = step_lib.StepConfig(group_size=GROUP)
    graphdef, state = init(model, optax.sgd(0.0))
    batch = train_batch(model, arrays, response)
    step = jax.jit(lambda s, b, k: step_lib.train_step(config, optax.sgd(0.0), graphdef, s, b, k))
    scopes = scope_names(step.lower(state, batch, jax.random.key(0)))
    phases = {"policy_forward", "perturbed_forward", "dependency", "shaping", "loss", "update"}
    blocks = {"vision_tower", "vision_block", "merger", "decoder_layer", "attention", "mlp"}
    assert phases | blocks <= scopes, sorted(phases | blocks - scopes)
    scoring = jax.jit(lambda p, b, k: step_lib.score_rollouts(config, graphdef, p, b, k))
    scopes = scope_names(scoring.lower(state.params, batch, jax.random.key(0)))
    assert {"scoring", "perturbed_forward", "dependency"} <= scopes and "update" not in scopes
    inputs = qwen2_5_vl.prepare_inputs(
        model.config, arrays["input_ids"], arrays["attention_mask"], arrays["pixel_values"], arrays["image_grid_thw"]
    )
    prefill = jax.jit(lambda params, i: nnx.merge(graphdef, params).prefill(i)[0])
    assert {"vision_tower", "decoder_layer", "lm_head"} <= scope_names(prefill.lower(state.params, inputs))
