"""The experiment configuration: every field, its default (the paper's 7B recipe), and the
translation into the objects the compiled code takes.

Config files under configs/ start from `default_config()` and change what their recipe
changes; any field can be overridden on the command line (`--config.algo.tgf_k=0.2`).
"""

from __future__ import annotations

import dataclasses
import math
import typing

import jax
import ml_collections
import optax
from flax import nnx

from vppo_jax.data import prompts
from vppo_jax.errors import InputError
from vppo_jax.models.qwen2_5_vl import lora
from vppo_jax.models.qwen2_5_vl.config import check_compute
from vppo_jax.rollout import sampling
from vppo_jax.rollout.rewards.registry import get_reward
from vppo_jax.trainer import wandb_run
from vppo_jax.trainer.optimizer import make_optimizer
from vppo_jax.vppo import advantages
from vppo_jax.vppo.loss import LossConfig
from vppo_jax.vppo.step import StepConfig


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # The policy: an HF directory, a Hugging Face Hub name (Qwen/Qwen2.5-VL-7B-Instruct), a
    # checkpoint from scripts/convert_hf_to_jax.py (any of them may be in a bucket, gs://...), or ""
    # for the tiny random model of the embedded default. `dtype` computes (sampling, scoring,
    # the update's forward and backward); `param_dtype` holds the parameters and the Adam
    # moments: "float32" master weights, or "bfloat16" with Kahan-compensated AdamW for tight
    # memory (vppo_jax/trainer/optimizer.py).
    # `remat`: what the backward keeps of each layer ("none", "full": only its input, "dots": its
    # matmul outputs); `attention_block`: tokens per block of the decoder's attention, beyond
    # which it never forms a (T, T) array, and the patch slots of a frame beyond which the
    # vision tower's full attention runs window by window (vppo_jax/models/qwen2_5_vl/attention.py);
    # `layer_loop`: "scan" (one compiled layer in a loop: compile time flat in depth), "unroll"
    # (faster on a CPU), or "auto": unrolled on a CPU, scanned on accelerators.
    c.model = ml_collections.ConfigDict(
        dict(path="", dtype="bfloat16", param_dtype="float32", remat="none", attention_block=512, layer_loop="auto")
    )
    # What trains (docs/training.md#what-trains): `freeze_vision` holds the vision tower and merger
    # fixed (no gradient, no optimizer state, kept in `dtype`; the perturbed forward still runs
    # through them). `lora.rank` > 0 trains LoRA adapters (scaled by alpha / rank) on the decoder's
    # linear layers named in `lora.targets`, every other weight fixed (vppo_jax/models/qwen2_5_vl/lora.py).
    c.model.freeze_vision = False
    c.model.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=lora.TARGETS))

    c.data = ml_collections.ConfigDict(
        dict(
            # parquet or jsonl in the ViRL39K schema (problem, answer, images): local, gs://..., or
            # ORG/NAME/FILE, a file of a Hugging Face Hub dataset
            train_files=("",),
            val_files=("",),
            problem_key="problem",
            answer_key="answer",
            images_key="images",
            # The image budget (image_processor.fit_pixel_budget): an image outside [min_pixels, max_pixels]
            # is scaled into it, upscaling small images (0 switches a side off); the image processor
            # then rounds each side to a multiple of 28. The reference's: 256 to 1280 units of 28 x 28.
            min_pixels=256 * 28 * 28,
            max_pixels=1280 * 28 * 28,
            max_prompt_length=4096,
            # The user turn: "reference" (the problem, then the paper's think-then-\boxed{} instruction),
            # "plain" (the problem alone) or a text file with {problem} where the problem goes.
            prompt_template="reference",
            seed=1,
        )
    )

    c.rollout = ml_collections.ConfigDict(
        dict(
            prompts_per_step=384,  # prompts kept per rollout batch (after online filtering)
            group_size=8,
            temperature=1.0,
            top_p=0.99,
            top_k=0,
            max_new_tokens=2048,
            # Prompts are left-padded to the next length of the form 2^k or 1.5 x 2^k at or above
            # this (one compile per length): larger means fewer compiles and more padding.
            min_prompt_length=512,
            # Prompts prefilled and decoded together (0: the whole round at once): the sampler's
            # memory grows with this, its speed too. A round that it does not divide ends with a
            # wave padded with empty prompts. The recipes choose theirs with the planner.
            wave_prompts=0,
            # The optimizer state waits in host memory while sampling (on TPUs and GPUs; a CPU's
            # device memory is host memory already), leaving the device's memory to the sampler;
            # it comes back for the update.
            offload_optimizer_state=True,
            max_filter_rounds=8,  # dynamic sampling: rounds of sampling to fill the batch
            # The collapse guard (vppo_jax/trainer/collapse_guard.py): a step whose batch holds fewer live
            # groups than this share of prompts_per_step is starved; this many starved steps in a
            # row stop the run with an error (0: never stop).
            min_live_share=0.25,
            max_starved_steps=10,
        )
    )

    c.reward = ml_collections.ConfigDict(dict(name="accuracy", timeout_s=10.0, workers=8))

    # The algorithm (docs/algorithm.md): every field and default of StepConfig and LossConfig
    # (vppo_jax/vppo/step.py, loss.py), written there once, plus the trainer's online filter.
    # vppo=False gives the GRPO/DAPO baseline. `advantage` (vppo_jax/vppo/advantages.py): "grpo",
    # "dr_grpo" (no std normalisation), "rloo" (leave-one-out baseline) or "reinforce_pp_baseline"
    # (group baseline, then whitened over the batch's tokens).
    c.algo = algo_defaults()
    c.algo.online_filter, c.algo.accuracy_bounds = True, (0.01, 0.99)
    c.algo.advantage = "grpo"

    c.optim = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-6,
            schedule="constant",
            warmup_steps=0,
            b1=0.9,
            b2=0.999,
            weight_decay=0.01,
            max_grad_norm=1.0,
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            # Length as the reference counts it: full rollout batches per pass over the training
            # set, times the epochs (ViRL39K: 38870 // 384 x 2 = 202 steps). steps > 0 overrides.
            epochs=2,
            steps=0,
            updates_per_rollout=3,  # optimizer steps per rollout batch (384 -> 3 x 128 prompts)
            # Gradient accumulation inside one optimizer step (exact: one token mean over the whole
            # update). micro_batches > 0: that many (the recipes choose theirs with the planner);
            # 0: as many as keep each device's share of a micro-batch within micro_batch_tokens
            # tokens (verl's ppo_max_token_len_per_gpu; a prompt its rows of one group share counts
            # once, as the forward runs it once), rows split evenly, at least one row per device.
            # On an accelerator more rows per micro-batch run faster until memory runs out
            # (`python -m vppo_jax.plan` prints it per device; the recipes set theirs); on a CPU,
            # which is compute-bound at any size, 2048 tokens run as fast as 8192 with a third of
            # the activations (README, "Training").
            micro_batches=0,
            micro_batch_tokens=2048,
            # Packed micro-batches (vppo_jax/vppo/packing.py): each device's share is one bin of
            # micro_batch_tokens tokens filled with whole sequences (a prompt once, then its
            # samples' responses), not rows padded to the longest: the update's work follows the
            # tokens. It packs where it can and is exact: with micro-batches from the token
            # budget (micro_batches=0) that holds the longest prompt and response, and the step's
            # own perturbation; otherwise (a fixed micro_batches, a smaller budget, or
            # algo.perturbation="blacken_pixels", the host's) the update keeps padded rows.
            packing=True,
            seed=0,
        )
    )

    # A checkpoint every `every_steps` steps and at the last one; 0 writes none (smoke runs, benchmarks).
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=10, keep=3))
    c.eval = ml_collections.ConfigDict(dict(every_steps=10, k=8, temperature=1.0, top_p=1.0, max_examples=0))
    # Device mesh (vppo_jax/parallel/sharding.py): batch rows over data x fsdp, parameters and optimizer
    # state over fsdp (model dim) and tensor (heads, MLP, vocab). One size may be -1 (the rest
    # of the devices). The default is one device, as a run on a CPU wants; recipes set theirs.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    # Overrides of the logical-axis -> mesh-axes table (vppo_jax/parallel/sharding.py DEFAULT_RULES):
    # (logical axis, mesh axes) pairs, mesh axes a name, a tuple of names or None (replicated).
    c.sharding_rules = ()
    # Weights & Biases beside TensorBoard (vppo_jax/trainer/wandb_run.py): off while wandb_project is "".
    # The same scalars per step; entity and name default to wandb's (your default entity, a random name).
    c.logging = ml_collections.ConfigDict(dict(wandb_project="", wandb_entity="", wandb_name=""))
    return c


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
    """The argument after a config file's colon (`configs/ablation.py:tas_only,runlocal`), as
    a ConfigDict over `defaults`. Tokens are comma-separated: `key=value` (parsed as the
    default's type), a bare key of a bool default (set True), or one bare word that is not a
    key: the value of `name` (which variant of the config: an ablation's name)."""
    parsed = ml_collections.ConfigDict(defaults)
    for token in filter(None, (t.strip() for t in arg.split(","))):
        key, has_value, value = token.partition("=")
        if has_value and key in defaults:
            default = defaults[key]
            parsed[key] = value.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(value)
        elif not has_value and isinstance(defaults.get(token), bool):
            parsed[token] = True
        elif not has_value and "name" in defaults and not parsed.name:
            parsed.name = token
        else:
            raise InputError(
                f"config argument {token!r} in {arg!r}: this config takes {sorted(defaults)} "
                "(key=value, or a bare key for a flag)."
            )
    return parsed


def check_names(c: ml_collections.ConfigDict):
    """Resolves every name the config holds (reward, prompt template, the algorithm's choices,
    precision, wandb when asked for), so that a typo fails in the first second, not after the model has loaded.

    A name that does not resolve raises InputError, whatever the module that checks it raised."""
    try:
        get_reward(c.reward.name)
        check_compute(c.model.remat, c.model.attention_block, layer_loop(c.model.layer_loop))
        prompts.prompt_template(c.data.prompt_template)
        step_config(c)  # StepConfig checks its choices
        lora_config(c)  # and LoRAConfig its rank and targets
        if c.algo.advantage not in advantages.ADVANTAGES:
            raise InputError(f"algo.advantage={c.algo.advantage!r}; choose one of {advantages.ADVANTAGES}.")
        optimizer(c)  # and make_optimizer the parameter dtype
        check_micro_batching(c.train)
        wandb_run.check_available(c.logging)
    except InputError:
        raise
    except (ValueError, ImportError) as error:  # ImportError: a reward module, wandb
        raise InputError(str(error)) from error


# StepConfig fields the config keeps elsewhere: the rollout's group size and temperature.
_FROM_ROLLOUT = ("group_size", "temperature")


def algo_defaults() -> ml_collections.ConfigDict:
    """StepConfig's fields (LossConfig's flattened in) with their defaults; a field whose
    default is None (beta_max) is typed so that the command line can set it."""
    defaults = {}
    for cls in (StepConfig, LossConfig):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name in _FROM_ROLLOUT or field.name == "loss":
                continue
            default = field.default
            if default is None:
                field_type = next(t for t in typing.get_args(hints[field.name]) if t is not type(None))
                default = ml_collections.FieldReference(None, field_type=field_type)
            defaults[field.name] = default
    return ml_collections.ConfigDict(defaults)


def step_config(c: ml_collections.ConfigDict) -> StepConfig:
    """The compiled step's configuration from the config's `algo` section (validated there)."""
    pick = lambda cls: {
        f.name: c.algo[f.name] for f in dataclasses.fields(cls) if f.name not in _FROM_ROLLOUT and f.name != "loss"
    }
    return StepConfig(
        **pick(StepConfig),
        group_size=c.rollout.group_size,
        temperature=c.rollout.temperature,
        loss=LossConfig(**pick(LossConfig)),
    )


def lora_config(c: ml_collections.ConfigDict) -> lora.LoRAConfig:
    m = c.model.lora
    return lora.LoRAConfig(rank=m.rank, alpha=m.alpha, targets=tuple(m.targets))


def trainable(c: ml_collections.ConfigDict) -> nnx.filterlib.Filter:
    """The parameters the update trains (the rest frozen, vppo_jax/vppo/batch.py TrainState):
    LoRA's adapters alone, every parameter but the vision tower's and merger's (`visual`), or all."""
    if c.model.lora.rank:
        return nnx.LoRAParam
    if c.model.freeze_vision:
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("visual")))
    return nnx.Param


def check_micro_batching(t: ml_collections.ConfigDict):
    """Raises InputError for a train section that names neither a micro-batch count nor a budget."""
    if t.micro_batches < 0 or (not t.micro_batches and t.micro_batch_tokens <= 0):
        raise InputError(
            f"train.micro_batches={t.micro_batches}, train.micro_batch_tokens={t.micro_batch_tokens}: give a "
            "positive micro-batch count, or 0 and a positive token budget per device."
        )


def packs(c: ml_collections.ConfigDict) -> bool:
    """Whether the update runs packed micro-batches (train.packing, where it can and is exact:
    micro-batches from a token budget that holds the longest prompt and response, the
    perturbation drawn in the step)."""
    longest = c.data.max_prompt_length + c.rollout.max_new_tokens
    budget = not c.train.micro_batches and c.train.micro_batch_tokens >= longest
    return bool(c.train.packing) and budget and c.algo.perturbation != "blacken_pixels"


def micro_batches(
    c: ml_collections.ConfigDict,
    rows: int,
    row_tokens: int,
    row_shards: int = 1,
    prompt_tokens: int = 0,
    group_size: int = 1,
) -> int:
    """Micro-batches of an update of `rows` rows of `row_tokens` tokens split over `row_shards`
    devices: train.micro_batches, or (when 0) the fewest whose per-device rows fit in
    train.micro_batch_tokens, at least one row per device.

    Rows come in groups of `group_size` sharing their first `prompt_tokens` tokens, and a
    device's rows of one group run that prompt once (`response_hidden_states`): r rows cost
    r x row_tokens less the prompts they do not run again.
    """
    t = c.train
    check_micro_batching(t)
    if t.micro_batches:
        return t.micro_batches
    per_device = rows // row_shards
    tokens = lambda r: r * row_tokens - (r - r // math.gcd(r, group_size)) * prompt_tokens
    fits = lambda r: r == 1 or tokens(r) <= t.micro_batch_tokens
    return next(m for m in range(1, per_device + 1) if per_device % m == 0 and fits(per_device // m))


def layer_loop(name: str, backend: str | None = None) -> str:
    """model.layer_loop resolved for `backend` (default: JAX's): "auto" unrolls on a CPU."""
    if name != "auto":
        return name
    return "unroll" if (backend or jax.default_backend()) == "cpu" else "scan"


def training_steps(c: ml_collections.ConfigDict, train_rows: int) -> int:
    """The run's rollout steps: train.steps, or train.epochs passes over `train_rows` rows in
    full batches of rollout.prompts_per_step (the reference's dataloader drops the last partial one)."""
    if c.train.steps:
        return c.train.steps
    per_epoch = train_rows // c.rollout.prompts_per_step
    if not per_epoch or c.train.epochs <= 0:
        raise InputError(
            f"train.epochs={c.train.epochs} over {train_rows} training rows at rollout.prompts_per_step="
            f"{c.rollout.prompts_per_step} gives no step: set train.epochs >= 1, or train.steps."
        )
    return per_epoch * c.train.epochs


def learning_rate(c: ml_collections.ConfigDict) -> optax.Schedule:
    """The schedule over the run's optimizer steps (train.steps must be resolved: `training_steps`)."""
    o = c.optim
    total = max(c.train.steps, 1) * c.train.updates_per_rollout
    if o.schedule == "constant":
        main = optax.constant_schedule(o.learning_rate)
    elif o.schedule == "cosine":
        main = optax.cosine_decay_schedule(o.learning_rate, max(total - o.warmup_steps, 1))
    else:
        raise InputError(f"optim.schedule={o.schedule!r}; choose 'constant' or 'cosine'.")
    if not o.warmup_steps:
        return main
    warmup = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
    return optax.join_schedules([warmup, main], [o.warmup_steps])


def optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = c.optim
    return make_optimizer(learning_rate(c), o.b1, o.b2, o.weight_decay, o.max_grad_norm, c.model.param_dtype)


def sampling_params(c: ml_collections.ConfigDict, special, **overrides) -> sampling.SamplingParams:
    """The rollout's sampling settings; `special` holds the tokenizer's end/pad token ids."""
    r = c.rollout
    settings = dict(
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_k=r.top_k,
        top_p=r.top_p,
        group_size=r.group_size,
        end_token_ids=(special.im_end, special.endoftext),
        pad_token_id=special.endoftext,
        min_prompt_length=r.min_prompt_length,
        wave_prompts=r.wave_prompts,
    )
    return sampling.SamplingParams(**(settings | overrides))
