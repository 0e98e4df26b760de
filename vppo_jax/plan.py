"""Will a recipe fit, and how long is a step? Per-device memory and time of the compiled programs.

    python -m vppo_jax.plan --config=configs/vppo_7b.py --model=7b --topology=v5p-32 [--mesh=1,-1,1]

Nothing is allocated: the real train step (and the rollout scoring, when the recipe uses it),
the sampler's prefill and decode loop are lowered and compiled for the recipe's shapes with
abstract arrays, on the recipe's mesh (or --mesh=data,fsdp,tensor), by the compiler the
report's first line names:
- a TPU slice (v5p-32, v4-64, v5e-16, v6e-64, ...): the TPU compiler, on the slice's own
  devices made by libtpu without a TPU (requirements-tpu.txt; vppo_jax/parallel/tpu.py);
- 8xh100: XLA's GPU compiler on an H100 target description, without a GPU (JAX's CUDA
  plugin, requirements-gpu.txt; vppo_jax/parallel/gpu.py);
- otherwise (neither installed, --compiler=xla_cpu, cpu-N): XLA:CPU on as many fake CPU
  devices as the topology has chips. Its fusion, rematerialisation and buffer reuse are not
  the accelerator's, so its temporaries are an estimate (same order, not the byte).
Printed per device: parameters and optimizer state (from their shardings) and each program's
arguments, outputs and temporaries (the compiler's memory analysis), the peak against the
device's memory and a verdict; then the step's time, from the compiler (each program's cost
with its loops counted, vppo_jax/parallel/hlo_cost.py, times its runs per step; the TPU
compiler's alone gives seconds) beside the MFU-based figure, with the FLOPs of each.

What is assumed (state of the code, not of the hardware):
- the optimizer state stays on the devices while updating, and while sampling too unless
  rollout.offload_optimizer_state moves it to host memory (a TPU or GPU topology; on cpu-N
  host memory is the device's, so it still counts); the master weights stay while sampling
  when they are held in another dtype than the compute dtype (the sampler runs on a copy
  cast to the compute dtype);
- the sampler runs one wave of rollout.wave_prompts prompts (the round when 0) at a time;
- one image per prompt at the recipe's largest image (data.max_pixels, as a square), the
  longest prompt bucket and max_new_tokens for every row: the worst case of a step.
Topologies: a TPU name counts TensorCores where a chip has two, JAX sees one device per chip
(v4, v5p megacore), so v5p-8 = 4 devices, v5p-32 = 16, v5p-64 = 32, v4-64 = 32; v5e and v6e
count chips (v6e-64 = 64 devices); 8xh100 = 8 GPUs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time

from absl import flags
from ml_collections import config_flags

from vppo_jax.errors import InputError
from vppo_jax.io import hub, paths
from vppo_jax.io.cli import run_program
from vppo_jax.parallel import gpu, tpu

GIB = 1 << 30
# Memory per device (GiB): one JAX device per TPU chip or GPU.
DEVICE_MEMORY_GIB = {"v5p": 95, "v4": 32, "v6e": 32, "v5e": 16, "h100": 80}
GPU_TOPOLOGIES = {"8xh100": ("h100", 8)}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    kind: str  # v5p, v4, v5e, v6e, h100 or cpu
    devices: int
    memory_gib: float  # per device; 0 for cpu-N (no limit checked)

    @property
    def is_tpu(self) -> bool:
        return self.kind in tpu.GENERATIONS


FLAGS = flags.FLAGS


def define_flags():
    """The command line (defined only when run as a program: the trainer has a --config too)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string(
        "model",
        "",
        "a preset of vppo_jax/models/qwen2_5_vl/presets.py (7b, 32b, tiny, ...), an HF/converted "
        "model directory or a Hub name. Default: the config's model.path, tiny when empty.",
    )
    flags.DEFINE_string(
        "topology",
        "v5p-8",
        "A Cloud TPU slice (v5p-32, v4-64, v5e-16, v6e-16, ...: compiled by the TPU compiler when libtpu "
        "is installed), 8xh100, or cpu-N (N devices).",
    )
    flags.DEFINE_string("mesh", "", "data,fsdp,tensor sizes (one may be -1). Default: the config's mesh.")
    flags.DEFINE_float("device_memory_gib", 0.0, "Memory per device; default: the topology's.")
    flags.DEFINE_enum(
        "compiler",
        "auto",
        ["auto", "xla_cpu"],
        "auto: the TPU compiler for a TPU slice when libtpu is installed, XLA:CPU otherwise; xla_cpu: always XLA:CPU.",
    )
    flags.DEFINE_string("json", "", "Also write the figures (bytes per device) to this JSON file.")
    flags.DEFINE_string("hlo_dir", "", "Also write each compiled program's optimized HLO text into this directory.")
    flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for prefill, scoring and updates.")
    flags.DEFINE_float("decode_mfu", 0.1, "Model FLOPs utilisation assumed for decoding (memory-bound).")
    flags.DEFINE_integer("text_tokens", 100, "Mean text tokens of a prompt besides its image, for the FLOPs.")
    flags.DEFINE_integer("response_tokens", 0, "Mean response tokens for the FLOPs (0: rollout.max_new_tokens).")
    flags.DEFINE_float("sampling_rounds", 1.0, "Mean rounds of sampling per step (dynamic sampling), for the FLOPs.")
    flags.mark_flags_as_required(["config"])


def topology(name: str) -> Topology:
    """A topology by name: a Cloud TPU slice (v5p-32, v6e-16, ...), 8xh100, or cpu-N."""
    if name in GPU_TOPOLOGIES:
        kind, devices = GPU_TOPOLOGIES[name]
        return Topology(name, kind, devices, DEVICE_MEMORY_GIB[kind])
    if name.startswith("cpu-") and name[4:].isdigit() and int(name[4:]) > 0:
        return Topology(name, "cpu", int(name[4:]), 0.0)
    parsed = tpu.parse_slice(name)
    if parsed is not None:
        generation, chips = parsed
        try:
            tpu.chip_grid(generation, chips)
        except ValueError as e:
            raise InputError(f"--topology={name!r}: {e}") from None
        return Topology(name, generation, chips, DEVICE_MEMORY_GIB[generation])
    raise InputError(
        f"--topology={name!r}: choose a TPU slice (v5p-N, v4-N, v5e-N, v6e-N, e.g. v5p-32), "
        f"{', '.join(GPU_TOPOLOGIES)} or cpu-N."
    )


def model_config(name: str, config_path: str, dtype: str, param_dtype: str | None = None):
    """A Qwen2.5-VL config by preset name (qwen2_5_vl.PRESETS: 7b, 32b, ...; no download), the tiny
    default's, or a directory's (or a Hub name's: its config.json alone), computing in `dtype` with
    parameters in `param_dtype` (default: `dtype`)."""
    from vppo_jax.models.qwen2_5_vl import PRESETS, preset

    name = name or config_path or "tiny"
    if name.lower() == "tiny":  # its vocabulary and special-token ids as the tiny tokenizer has them
        from vppo_jax.embedded.tiny_model import tiny_config

        return tiny_config().with_precision(dtype, param_dtype)
    if name.lower() in PRESETS:
        return preset(name).with_precision(dtype, param_dtype)
    from vppo_jax.models.qwen2_5_vl.hf_io import read_config

    name = hub.resolve_model(name, allow_patterns=["config.json"])  # a Hub model's config alone, no weights
    config_dir = os.path.join(name, "hf") if paths.is_dir(os.path.join(name, "hf")) else name
    return read_config(config_dir)[0].with_precision(dtype, param_dtype)


def image_grid(config, max_pixels: int) -> tuple[int, int, int]:
    """(t, h, w) patches of the largest square image within the budget (112 px without one)."""
    unit = config.vision.patch_size * config.vision.spatial_merge_size
    side = max(1, math.isqrt(max_pixels) // unit) if max_pixels else 112 // unit
    return 1, side * config.vision.spatial_merge_size, side * config.vision.spatial_merge_size


def abstract_batch(model_cfg, rows: int, length: int, grid, leading: tuple[int, ...] = (), images: int = 0):
    """ModelInputs of ShapeDtypeStructs: `rows` sequences of `length` tokens, one image each
    (or `images` images in all)."""
    import jax
    import numpy as np

    from vppo_jax.models.qwen2_5_vl.inputs import (
        ModelInputs,
        VisionInputs,
        bucket,
        count_windows,
        largest_frame_windows,
    )

    vcfg = model_cfg.vision
    windows = bucket(count_windows(vcfg, np.array([grid] * (images or rows))))
    slots = windows * vcfg.window_units**2 * vcfg.merge_unit
    shape = lambda *s, dtype: jax.ShapeDtypeStruct((*leading, *s), dtype)
    return ModelInputs(
        input_ids=shape(rows, length, dtype=np.int32),
        attention_mask=shape(rows, length, dtype=np.bool_),
        position_ids=shape(3, rows, length, dtype=np.int32),
        image_token_slot=shape(rows, length, dtype=np.int32),
        vision=VisionInputs(
            patches=shape(slots, vcfg.patch_dim, dtype=np.float32),
            slot_valid=shape(slots, dtype=np.bool_),
            segment_ids=shape(slots, dtype=np.int32),
            rotary_hw=shape(slots, 2, dtype=np.int32),
            frame_windows=min(bucket(largest_frame_windows(vcfg, np.array([grid]))), windows),
        ),
    )


@dataclasses.dataclass
class Phase:
    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int  # XLA's peak of live temporaries (buffer assignment)
    # State held on the device besides: the optimizer state (0 for the update, which takes it as an
    # argument; 0 while sampling when it waits in host memory), and the master weights while sampling.
    resident: int
    compile_s: float
    runs: float = 1.0  # times the program runs in one step (waves x sampling rounds, updates per rollout)
    # XLA's cost analysis as the compiler reports it, per device: every loop body counted once.
    xla_flops: float = 0.0
    xla_bytes: float = 0.0
    xla_seconds: float = 0.0  # the TPU compiler's optimal_seconds (0 from XLA:CPU, which has none)
    # The same program with each loop counted as often as it runs (vppo_jax/parallel/hlo_cost.py).
    flops: float = 0.0  # matmul FLOPs per device per run
    cycles: float = 0.0  # the TPU compiler's estimated cycles, loops counted (0: no estimates)
    cycles_once: float = 0.0  # the same, every loop body once
    loops: list = dataclasses.field(default_factory=list)  # [trips, known] of each while loop
    seconds_per_cycle: float = 0.0  # the compiler's optimal_seconds over its cycles, when it gives both

    @property
    def program(self) -> int:
        """Arguments + outputs (less the donated buffers they share) + temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def total(self) -> int:
        return self.program + self.resident

    @property
    def seconds(self) -> float:
        """The compiler's time for one run with its loops counted: its estimated cycles at the
        rate of its optimal_seconds (0 without both)."""
        return self.cycles * self.seconds_per_cycle


def _compiled_phase(
    name: str, jitted, args, resident: int, runs: float = 1.0, dynamic_trips: int = 1, hlo_dir: str = ""
) -> Phase:
    """`jitted` compiled for `args`: XLA's memory and cost analyses, and its cost with the loops
    counted (`dynamic_trips`: the trip count of a loop whose bound is data); the optimized HLO
    text is written to `hlo_dir`/<name>.hlo.txt when given."""
    from vppo_jax.parallel import hlo_cost

    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    # (XLA:CPU's peak_memory_in_bytes comes out below its own temp size: not used.)
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    text = compiled.as_text()
    if hlo_dir:
        paths.makedirs(hlo_dir)
        paths.write_text(os.path.join(hlo_dir, name.replace(" ", "_") + ".hlo.txt"), text)
    counted = hlo_cost.loop_cost(text, dynamic_trips)
    # The TPU compiler's optimal_seconds, or -1 where it has none (a program with loops bounded by data).
    optimal = max(float(cost.get("optimal_seconds", 0.0)), 0.0)
    return Phase(
        name,
        m.argument_size_in_bytes,
        m.output_size_in_bytes,
        m.alias_size_in_bytes,
        m.temp_size_in_bytes,
        resident,
        seconds,
        runs=runs,
        xla_flops=float(cost.get("flops", 0.0)),
        xla_bytes=float(cost.get("bytes accessed", 0.0)),
        xla_seconds=optimal,
        flops=counted.flops,
        cycles=counted.cycles,
        cycles_once=counted.cycles_once,
        loops=[list(loop) for loop in counted.loops],
        seconds_per_cycle=optimal / counted.cycles_once if optimal and counted.cycles_once else 0.0,
    )


def bytes_per_device(tree, shardings) -> int:
    import jax

    return sum(
        math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
        for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
    )


def plan(
    config,
    model_cfg,
    mesh,
    phases=("update", "score", "prefill", "decode"),
    host_memory: bool = False,
    sampling_rounds: float = 1.0,
    hlo_dir: str = "",
    mean_lengths: tuple[float, float] | None = None,
) -> dict:
    """Per-device bytes of parameters, optimizer state and each compiled phase on `mesh`, and
    each phase's cost; `host_memory`: the devices have host memory of their own (TPU, GPU)
    for the optimizer state to wait in while sampling (rollout.offload_optimizer_state);
    `sampling_rounds`: mean rounds of sampling per step (dynamic sampling); `mean_lengths`:
    the mean text tokens of a prompt (its image aside) and of a response, which size a packed
    update's micro-batches (train.packing; default: the longest).

    How often each program runs in a step (Phase.runs), as the trainer runs them: the scoring
    pass and the update once per update of the rollout (train.updates_per_rollout), each over
    all its micro-batches in one program (a scan: counted inside, by its loop); the prefill
    and the decode loop once per wave of prompts, ceil(prompts_per_step / wave_prompts) waves
    per round, `sampling_rounds` rounds. Inside the decode program, each of its
    DECODE_SEGMENTS loops stops at end tokens: counted here as running its whole block of
    ceil((max_new_tokens - 1) / DECODE_SEGMENTS) steps (no end token: the worst case).
    `hlo_dir`: where to write each compiled program's HLO text."""
    import jax
    import numpy as np
    from flax import nnx

    from vppo_jax.models.qwen2_5_vl import init_model, lora
    from vppo_jax.models.qwen2_5_vl.inputs import length_bucket
    from vppo_jax.models.qwen2_5_vl.model import prompt_run
    from vppo_jax.parallel import sharding
    from vppo_jax.rollout import sampling
    from vppo_jax.trainer import config as config_lib
    from vppo_jax.vppo import programs
    from vppo_jax.vppo.batch import TrainBatch, init_state, scored_like, train_state_shardings
    from vppo_jax.vppo.step import extra_forwards, needs_scoring

    r, t, d = config.rollout, config.train, config.data
    optimizer, step_config = config_lib.optimizer(config), config_lib.step_config(config)
    model = nnx.eval_shape(lambda: lora.add_adapters(init_model(model_cfg), config_lib.lora_config(config)))
    graphdef, params = nnx.split(model, nnx.Param)
    trainable = config_lib.trainable(config)
    state = jax.eval_shape(lambda p: init_state(nnx.merge(graphdef, p), optimizer, trainable)[1], params)
    state_shardings = train_state_shardings(mesh, optimizer, state)
    sharded = lambda tree, shardings: jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )
    state = sharded(state, state_shardings)
    params_bytes = bytes_per_device(state.params, state_shardings.params)
    frozen_bytes = bytes_per_device(state.frozen, state_shardings.frozen)
    opt_bytes = bytes_per_device(state.opt_state, state_shardings.opt_state)

    grid = image_grid(model_cfg, d.max_pixels)
    prompt_length = length_bucket(d.max_prompt_length, r.min_prompt_length)
    update_rows = r.prompts_per_step * r.group_size // t.updates_per_rollout
    micro_batches = config_lib.micro_batches(
        config, update_rows, prompt_length + r.max_new_tokens, sharding.batch_shards(mesh), prompt_length, r.group_size
    )
    rows = update_rows // micro_batches
    packed = None
    if config_lib.packs(config):  # bins of the token budget, as many as a rollout of the mean lengths fills
        text_tokens, response_tokens = mean_lengths or (prompt_length, r.max_new_tokens)
        prompt_tokens = text_tokens + math.prod(grid) // model_cfg.vision.merge_unit
        packed = packed_shape(config, sharding.batch_shards(mesh), update_rows, prompt_tokens, response_tokens)
        packed["twin"] *= step_config.vppo  # GRPO perturbs nothing: no twin bins
        micro_batches, rows = packed["micro_batches"], packed["rows"]
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    results = []
    compiled_phase = functools.partial(_compiled_phase, hlo_dir=hlo_dir)

    # The update on one micro-batched slice of the rollout batch, as the trainer runs it.
    per_row = lambda dtype: jax.ShapeDtypeStruct((micro_batches, rows, r.max_new_tokens), dtype)  # the responses
    if packed:
        batch = packed_batch(model_cfg, packed, grid, step_config.vppo, sharding.batch_shards(mesh))
    else:
        batch = TrainBatch(
            inputs=abstract_batch(model_cfg, rows, prompt_length + r.max_new_tokens, grid, leading=(micro_batches,)),
            prompt_group=math.gcd(r.group_size, rows),  # as build_train_batch finds a rollout's rows
            targets=None,
            response_mask=None,
            advantages=None,
        )
    batch = batch.replace(
        targets=per_row(np.int32),
        response_mask=per_row(np.bool_),
        advantages=jax.ShapeDtypeStruct((micro_batches, rows), np.float32),
    )
    # A KL's reference policy: the initial weights in the compute dtype, sharded like the
    # parameters, resident through every phase (an argument of the scoring pass).
    ref_params, ref_bytes = None, 0
    if step_config.uses_reference:
        ref_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, model_cfg.jnp_dtype), state.model_params)
        ref_shardings = sharding.param_shardings(mesh, ref_params)
        ref_params = sharded(ref_params, ref_shardings)
        ref_bytes = bytes_per_device(ref_params, ref_shardings)
    if needs_scoring(step_config, t.updates_per_rollout, micro_batches, rows, bool(packed)):  # pi_old first
        if "score" in phases:
            program = programs.score_program(step_config, graphdef, mesh, state.model_params, batch, key, ref_params)
            results.append(
                compiled_phase(
                    "score rollouts",
                    program,
                    sharded((state.model_params, batch, key, ref_params), program.in_shardings),
                    opt_bytes,
                    runs=t.updates_per_rollout,
                )
            )
        batch = scored_like(batch, step_config.uses_reference)
    if "update" in phases:
        program = programs.train_step_program(step_config, optimizer, graphdef, mesh, state, batch, key)
        args = sharded((state, batch, key), program.in_shardings)
        results.append(compiled_phase("update step", program, args, ref_bytes, runs=t.updates_per_rollout))

    # The sampler: one wave of prompts (all of a round when rollout.wave_prompts is 0), G samples
    # each, on the weights cast to the compute dtype (vppo_jax.rollout.policy.compute_model); the
    # master weights of the trained parameters stay resident beside them (the frozen ones are in
    # the compute dtype already: the sampler takes them as they are).
    wave = min(r.wave_prompts or r.prompts_per_step, r.prompts_per_step)
    prompts = -(-wave // sharding.batch_shards(mesh)) * sharding.batch_shards(mesh)
    inputs = abstract_batch(model_cfg, prompts, prompt_length, grid)
    compute_params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, model_cfg.jnp_dtype, sharding=a.sharding), state.model_params
    )
    offloaded = r.offload_optimizer_state and host_memory
    sampling_resident = (
        (0 if offloaded else opt_bytes) + (params_bytes if model_cfg.param_dtype != model_cfg.dtype else 0) + ref_bytes
    )
    waves = -(-r.prompts_per_step // wave) * sampling_rounds
    prefill = sampling.compiled_prefill(graphdef, compute_params, inputs, mesh)
    if "prefill" in phases:
        args = sharded((compute_params, inputs), prefill.in_shardings)
        results.append(compiled_phase("rollout prefill", prefill, args, sampling_resident, runs=waves))
    if "decode" in phases:
        prefilled = jax.eval_shape(prefill.jitted, compute_params, sharded(inputs, prefill.in_shardings[1]))
        # No end tokens: every row decodes all max_new_tokens, the worst case.
        params = sampling.SamplingParams(
            max_new_tokens=r.max_new_tokens,
            end_token_ids=(),
            pad_token_id=0,
            temperature=r.temperature,
            top_k=r.top_k,
            top_p=r.top_p,
            group_size=r.group_size,
        )
        keys = jax.ShapeDtypeStruct((prompts * r.group_size,), key.dtype)
        args = (compute_params, prefilled, keys)
        decode = sampling.compiled_decode(graphdef, *args, params, mesh)
        # The steps of one decode loop, as vppo_jax.rollout.sampling._decode splits the response
        # cache (the last token is sampled, never fed back).
        block = -(-max(r.max_new_tokens - 1, 1) // sampling.DECODE_SEGMENTS)
        args = sharded(args, decode.in_shardings)
        results.append(
            compiled_phase("rollout decode", decode, args, sampling_resident, runs=waves, dynamic_trips=block)
        )
    # The TPU compiler gives no optimal_seconds for a program with loops bounded by data (-1 for
    # the decode loop): its estimated cycles are timed at the rate of the prefill's, the same
    # chip's and the same layers' estimate.
    rates = {p.name: p.seconds_per_cycle for p in results if p.seconds_per_cycle}
    rate = rates.get("rollout prefill") or next(iter(rates.values()), 0.0)
    for p in results:
        p.seconds_per_cycle = p.seconds_per_cycle or rate
    return dict(
        params=params_bytes,
        frozen=frozen_bytes,
        opt_state=opt_bytes,
        phases=results,
        rows=rows,
        prompts=prompts,
        length=prompt_length + r.max_new_tokens,
        grid=grid,
        remat=model_cfg.remat,
        extra_forwards=extra_forwards(step_config, t.updates_per_rollout, micro_batches, rows, bool(packed)),
        # as the model runs the update's rows (packed: a prompt once for its group)
        prompt_run=r.group_size if packed else prompt_run(batch.prompt_group, rows, mesh),
        packed=packed,
    )


def packed_shape(config, shards: int, update_rows: int, prompt_tokens: float, response_tokens: float) -> dict:
    """The packed update's shapes (train.packing) for a rollout of these mean lengths: a
    group's prompt and G responses fill bins of train.micro_batch_tokens, split (a prompt copy
    per piece) where a group exceeds one; one bin per device per micro-batch, the bins full
    but for the last micro-batch's; each bin's rows, response slots (its tokens less its
    prompts') and images (one per piece), and its VPPO twin (each row its own prompt)."""
    budget, group = config.train.micro_batch_tokens, config.rollout.group_size
    group_tokens = prompt_tokens + group * response_tokens
    pieces = math.ceil(group_tokens / budget)  # per group
    tokens = update_rows // group * (group_tokens + (pieces - 1) * prompt_tokens)
    bins = math.ceil(tokens / budget)
    sequences = math.ceil(update_rows // group * pieces / bins)  # per bin
    rows_per_bin = math.ceil(update_rows / bins)
    slots = max(1, round(budget - sequences * prompt_tokens))
    return dict(
        budget=budget,
        micro_batches=math.ceil(bins / shards),
        rows=rows_per_bin * shards,
        rows_per_bin=rows_per_bin,
        slots=slots,
        sequences=sequences,
        twin=round(slots + rows_per_bin * prompt_tokens),
        update_rows=update_rows,
        mean_lengths=(prompt_tokens, response_tokens),
    )


def packed_batch(model_cfg, packed: dict, grid, vppo: bool, shards: int):
    """An abstract packed TrainBatch of `packed_shape`'s shapes, its per-row arrays left to fill."""
    import jax
    import numpy as np

    from vppo_jax.models.qwen2_5_vl.packed import TokenTree
    from vppo_jax.vppo.batch import TrainBatch
    from vppo_jax.vppo.packing import PackedLayout, RowBins

    leading = (packed["micro_batches"], shards)
    struct = lambda *shape, dtype=np.int32: jax.ShapeDtypeStruct((*leading, *shape), dtype)

    def tree(length: int) -> TokenTree:
        blocks = -(-length // model_cfg.attention_block)
        per_token = struct(length)
        return TokenTree(struct(length, dtype=np.bool_), per_token, per_token, struct(blocks, blocks), struct(blocks))

    slot = struct(packed["slots"])
    twin = None
    if vppo:
        inputs = abstract_batch(model_cfg, shards, packed["twin"], grid, (packed["micro_batches"],), packed["rows"])
        twin = RowBins(inputs=inputs, tree=tree(packed["twin"]), predicted_by=slot)
    return TrainBatch(
        inputs=abstract_batch(
            model_cfg, shards, packed["budget"], grid, (packed["micro_batches"],), packed["sequences"] * shards
        ),
        targets=None,
        response_mask=None,
        advantages=None,
        packed=PackedLayout(
            tree=tree(packed["budget"]),
            targets=slot,
            predicted_by=slot,
            response_mask=struct(packed["slots"], dtype=np.bool_),
            row=slot,
            column=slot,
            rows_alone=twin,
        ),
        rows=jax.ShapeDtypeStruct((packed["micro_batches"], packed["rows"]), np.int32),
        rollout_rows=packed["update_rows"],
    )


def report(result: dict, mesh_shape: dict, topo: Topology, compiler: str) -> str:
    gib = lambda b: f"{b / GIB:,.2f}"
    update = f"{result['rows']} rows x {result['length']} tokens per micro-batch"
    if packed := result.get("packed"):
        update = (
            f"packed, one bin of {packed['budget']} tokens per device and micro-batch, {packed['micro_batches']} "
            f"micro-batches at {packed['mean_lengths'][0]:.0f} prompt and {packed['mean_lengths'][1]:.0f} response "
            f"tokens on average (the work follows the tokens); a bin holds {packed['rows_per_bin']} "
            f"rows and {packed['slots']} response slots"
            + (f", VPPO's twin bin {packed['twin']} tokens" if packed["twin"] else "")
        )
    lines = [
        f"compiler: {compiler}",
        f"mesh {mesh_shape} on {topo.devices} devices; update: {update}, sampler: {result['prompts']} prompts per "
        f"wave, image grid {result['grid']} per row",
        f"parameters {gib(result['params'])} GiB trained + {gib(result['frozen'])} GiB frozen, optimizer state "
        f"{gib(result['opt_state'])} GiB per device",
        "",
        "| phase | arguments | outputs | aliased | temporaries | program | + resident state | total GiB | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["phases"]:
        lines.append(
            f"| {p.name} | {gib(p.arguments)} | {gib(p.outputs)} | {gib(p.aliased)} | {gib(p.temporaries)} "
            f"| {gib(p.program)} | {gib(p.resident)} | {gib(p.total)} | {p.compile_s:.0f} |"
        )
    peak = max(p.total for p in result["phases"])
    worst = max(result["phases"], key=lambda p: p.total)
    lines.append("")
    lines.append(f"peak per device: {gib(peak)} GiB ({worst.name})")
    if topo.memory_gib:
        fits, used = peak <= topo.memory_gib * GIB, peak / (topo.memory_gib * GIB)
        lines.append(
            f"verdict: {'fits' if fits else 'does NOT fit'} in {topo.memory_gib:g} GiB per device "
            f"({100 * used:.0f}% of it{f', headroom {100 - 100 * used:.0f}%' if fits else ''})"
        )
        if not fits:
            lines.append("to fit: " + advice(result, topo.memory_gib * GIB, mesh_shape))
    others = ", ".join(
        f"{kind} {size} GiB: {'yes' if peak <= size * GIB else 'no'}" for kind, size in DEVICE_MEMORY_GIB.items()
    )
    lines.append(f"fits per device on ({others})")
    return "\n".join(lines)


def advice(result: dict, budget: float, mesh_shape: dict) -> str:
    """What to change, from which term is too large."""
    tips = []
    state = result["params"] + result["frozen"] + result["opt_state"]
    if state > budget / 2:
        tips.append(
            f"parameters + optimizer state alone take {state / GIB:.1f} GiB: more devices on fsdp "
            f"(now {mesh_shape['fsdp']}) or tensor (now {mesh_shape['tensor']})"
        )
    phases = {p.name: p for p in result["phases"]}
    update = phases.get("update step")
    if update and update.total > budget:
        tips.append(
            f"the update's temporaries are {update.temporaries / GIB:,.0f} GiB for {result['rows']} rows per "
            "micro-batch: more train.micro_batches or devices on data/fsdp (down to one row per device), "
            "a smaller data.max_pixels (the vision tower's full-attention layers grow with the square of "
            "an image's patches), model.remat=\"full\" (each layer's backward keeps "
            "only its input; now " + result["remat"] + "), a smaller model.attention_block"
        )
    rollout = [p for name, p in phases.items() if name.startswith("rollout") and p.total > budget]
    if rollout:
        tips.append(
            "the sampler's "
            + " and ".join(
                f"{p.name.split()[1]} ({p.temporaries / GIB:,.0f} GiB temporaries, "
                f"{p.arguments / GIB:,.0f} GiB arguments)"
                for p in rollout
            )
            + ": a smaller rollout.wave_prompts (prompts sampled at once), a smaller data.max_pixels, or more devices"
        )
    return "; ".join(tips) or "no single term dominates: more devices"


def throughput(config, model_cfg, result: dict, topo: Topology) -> str:
    """One rollout step's time, two ways: from the compiler (each program's cost with its loops
    counted, times its runs per step: the padded shapes the programs run at, every response
    at max_new_tokens) and on paper (vppo_jax/flops.py's model FLOPs at mean lengths given by
    the flags, at the assumed MFUs); with the FLOPs each implies."""
    from vppo_jax import flops

    r = config.rollout
    patches = math.prod(result["grid"])
    shape = flops.StepShape(
        prompts=round(r.prompts_per_step * FLAGS.sampling_rounds),
        group_size=r.group_size,
        prompt_tokens=FLAGS.text_tokens + patches // model_cfg.vision.merge_unit,
        image_patches=patches,
        response_tokens=FLAGS.response_tokens or r.max_new_tokens,
        scoring_forwards=result["extra_forwards"][0],
        perturbed_forwards=result["extra_forwards"][1],
        prompt_run=result["prompt_run"],
    )
    peak = flops.PEAK_FLOPS[topo.kind]
    model = flops.step_flops(model_cfg, shape)
    phase_of = {"rollout prefill": "rollout prefill", "rollout decode": "rollout decode"}
    phase_of |= {"score rollouts": "score rollouts", "update step": "update"}
    compiled = {phase_of[p.name]: p for p in result["phases"]}
    timed = all(p.seconds for p in compiled.values())
    lines = [
        f"step time: {shape.prompts} prompts x {shape.group_size} samples; on paper at {shape.prompt_tokens:.0f} "
        f"prompt tokens ({patches // model_cfg.vision.merge_unit} of them the image) and {shape.response_tokens:.0f} "
        f"response tokens on average; {topo.devices} devices at {peak / 1e12:.0f} TFLOP/s bf16 peak each",
        "compiler: the compiled programs' matmul FLOPs and the TPU compiler's optimal_seconds with each loop "
        "counted as often as it runs (XLA's cost analysis counts a loop body once), times the runs per step",
        "",
        "| phase | runs per step | compiler PFLOP per step | compiler s per step | XLA cost analysis per run "
        "(loops once): TFLOP, GB accessed, s | model PFLOP per step | MFU assumed | s at that MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    totals = {"compiler": 0.0, "paper": 0.0}
    for phase, amount in model.items():
        mfu = FLAGS.decode_mfu if phase == "rollout decode" else FLAGS.mfu
        paper_s = flops.step_seconds(amount, topo.devices, peak, mfu)
        totals["paper"] += paper_s
        p = compiled.get(phase)
        if p is None:
            lines.append(f"| {phase} | - | - | - | - | {amount / 1e15:,.3g} | {mfu:.0%} | {paper_s:,.3g} |")
            continue
        compiler_s = p.seconds * p.runs
        totals["compiler"] += compiler_s
        seconds = f"{compiler_s:,.3g}" if p.seconds else "- (no time from this compiler)"
        xla_s = f"{p.xla_seconds:.3g}" if p.xla_seconds else "-"
        lines.append(
            f"| {phase} | {p.runs:g} | {p.flops * p.runs * topo.devices / 1e15:,.3g} | {seconds} | "
            f"{p.xla_flops / 1e12:,.3g}, {p.xla_bytes / 1e9:,.3g}, {xla_s} | {amount / 1e15:,.3g} | {mfu:.0%} | "
            f"{paper_s:,.3g} |"
        )
    reference = "the reference: about 5 min per step on 8 GPUs, 17 h for 202 steps"
    if timed and compiled:
        model_flops = sum(model[phase] for phase in compiled)
        implied = model_flops / (totals["compiler"] * topo.devices * peak)
        lines.append(
            f"step by the compiler: {totals['compiler'] / 60:.1f} min for its phases (model FLOPs over that time: "
            f"{implied:.0%} MFU)"
        )
    lines.append(f"step on paper: {totals['paper'] / 60:.1f} min ({reference})")
    dynamic = sum(not known for p in compiled.values() for _, known in p.loops)
    if dynamic:
        lines.append(f"({dynamic} loops bounded by data counted at their largest trip count: the decode blocks)")
    return "\n".join(lines)


def devices_for(topo: Topology, compiler: str) -> tuple[list, str]:
    """The devices to compile for and the compiler's name, when `compiler` is auto: the TPU's
    own devices (from libtpu, no TPU needed) for a TPU slice when libtpu is installed; the
    GPU's (from JAX's CUDA plugin and a target description, no GPU needed) for 8xh100 when
    the plugin is installed; else as many fake CPU devices as the topology has, for XLA:CPU."""
    import jax

    jax.config.update("jax_platforms", "cpu")  # never probe for an accelerator: compiling only
    why_cpu = "--compiler=xla_cpu" if compiler != "auto" else "a CPU topology"
    if topo.is_tpu and compiler == "auto":
        devices = tpu.topology_devices(topo.name)
        if devices is not None:
            return devices, f"tpu (libtpu {tpu.libtpu_version()}, jax {jax.__version__})"
        why_cpu = "libtpu not installed: pip install -r requirements-tpu.txt for the TPU compiler"
    elif topo.kind in gpu.TARGETS and compiler == "auto":
        devices = gpu.topology_devices(topo.kind, topo.devices)
        if devices is not None:
            return devices, f"gpu (XLA's GPU compiler, JAX's CUDA plugin, jax {jax.__version__}; gives no time)"
        why_cpu = "JAX's CUDA plugin not installed: pip install -r requirements-gpu.txt for the GPU compiler"
    # Fake CPU devices, one per chip of the topology; possible only before JAX starts its backend.
    os.environ["XLA_FLAGS"] = " ".join(
        f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f
    )
    jax.config.update("jax_num_cpu_devices", topo.devices)
    if jax.device_count() != topo.devices:
        raise RuntimeError(
            f"wanted {topo.devices} fake CPU devices, JAX has {jax.device_count()}: run the planner in a fresh process."
        )
    return jax.devices(), (
        f"xla:cpu (jaxlib {jax.__version__}) on {topo.devices} fake CPU devices ({why_cpu}): not the "
        f"{topo.kind} compiler; its fusion, rematerialisation and buffer reuse differ, so the temporaries "
        "are an estimate, and it gives no time"
    )


def main(argv):
    del argv
    topo = topology(FLAGS.topology)
    topo = dataclasses.replace(topo, memory_gib=FLAGS.device_memory_gib or topo.memory_gib)
    devices, compiler = devices_for(topo, FLAGS.compiler)
    from vppo_jax.parallel import sharding

    config = FLAGS.config
    mesh_shape = dict(config.mesh)
    if FLAGS.mesh:
        sizes = [int(s) for s in FLAGS.mesh.split(",")]
        if len(sizes) != 3:
            raise InputError(f"--mesh={FLAGS.mesh!r}: give data,fsdp,tensor, e.g. 1,-1,1.")
        mesh_shape = dict(zip(sharding.MESH_AXES, sizes))
    sharding.use_rules(config.sharding_rules)
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    if mesh.size != topo.devices:
        raise InputError(
            f"mesh {mesh_shape} uses {mesh.size} of the {topo.devices} devices of {FLAGS.topology}: give "
            "--mesh=data,fsdp,tensor with a product of the device count (one size may be -1)."
        )
    mesh_shape = dict(mesh.shape)
    model_cfg = model_config(FLAGS.model, config.model.path, config.model.dtype, config.model.param_dtype)
    from vppo_jax.trainer import config as config_lib

    # "auto" resolves for the topology's chips (scanned on accelerators), not for this CPU.
    backend = "cpu" if topo.kind == "cpu" else "accelerator"
    loop = config_lib.layer_loop(config.model.layer_loop, backend)
    model_cfg = model_cfg.with_compute(config.model.remat, config.model.attention_block, loop)
    print(
        f"planning {FLAGS.model or config.model.path or 'tiny'} (parameters {model_cfg.param_dtype}, compute "
        f"{model_cfg.dtype}, remat {model_cfg.remat}, attention block {model_cfg.attention_block}) on "
        f"{FLAGS.topology}",
        flush=True,
    )
    host_memory = sharding.host_memory_is_separate(backend)
    result = plan(
        config,
        model_cfg,
        mesh,
        host_memory=host_memory,
        sampling_rounds=FLAGS.sampling_rounds,
        hlo_dir=FLAGS.hlo_dir,
        mean_lengths=(FLAGS.text_tokens, FLAGS.response_tokens or config.rollout.max_new_tokens),
    )
    print(report(result, mesh_shape, topo, compiler))
    if topo.kind != "cpu":
        print("\n" + throughput(config, model_cfg, result, topo))
    if FLAGS.json:
        peak = max(p.total for p in result["phases"])
        paths.write_json(
            FLAGS.json,
            dict(
                result,
                phases=[dataclasses.asdict(p) | {"total": p.total, "seconds": p.seconds} for p in result["phases"]],
                compiler=compiler,
                mesh=mesh_shape,
                topology=FLAGS.topology,
                device_memory_gib=topo.memory_gib,
                peak=peak,
                fits=bool(topo.memory_gib) and peak <= topo.memory_gib * GIB,
            ),
            indent=1,
        )


if __name__ == "__main__":
    define_flags()
    run_program(main)
