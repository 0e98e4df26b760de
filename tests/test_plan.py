"""The planner on the tiny config: per-device figures against sizes computed here, the verdict, bad meshes."""

import json
import math
import os
import subprocess
import sys

import jax
from flax import nnx

from vppo_jax.models.qwen2_5_vl import abstract_model
from vppo_jax.parallel.sharding import make_mesh, param_shardings, tree_paths
from vppo_jax.plan import bytes_per_device, model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_plan(*flags: str) -> subprocess.CompletedProcess:
    # The planner makes its own fake devices: the test process's XLA_FLAGS must not leak in. The
    # byte counts below are XLA:CPU's (no TPU tiling), whether or not libtpu is installed
    # (tests/test_tpu_compile.py compiles for the TPU).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "-m", "vppo_jax.plan", "--config=configs/tiny.py", "--compiler=xla_cpu", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tiny_plan_on_four_devices(tmp_path):
    # v5p-8: 4 devices, and a named topology also gets the throughput on paper.
    out = run_plan("--topology=v5p-8", "--mesh=1,4,1", "--device_memory_gib=0.1", f"--json={tmp_path / 'plan.json'}")
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())

    # Parameters: every matrix of the tiny model splits 4 ways on its model dim; norms and
    # some biases stay whole. So a quarter of the matrices plus at most all the vectors.
    state = nnx.split(abstract_model(model_config("tiny", "", "float32")), nnx.Param)[1]
    stacked = lambda path: path.startswith(("language_model/layers/", "visual/blocks/"))
    sizes = [
        (math.prod(p.shape) * 4, p.ndim - stacked(path))
        for path, p in zip(jax.tree.leaves(tree_paths(state)), jax.tree.leaves(state))
    ]
    matrices = sum(size for size, ndim in sizes if ndim == 2)
    vectors = sum(size for size, ndim in sizes if ndim == 1)
    assert matrices / 4 <= plan["params"] <= matrices / 4 + vectors
    assert plan["opt_state"] == 2 * plan["params"] + 8  # Adam's two moments; int32 step counts of Adam and the schedule

    phases = {p["name"]: p for p in plan["phases"]}
    assert set(phases) == {"update step", "rollout prefill", "rollout decode"}  # one update per rollout: no scoring
    # The decode loop takes the text decoder's parameters (jit drops the unused vision tower's)
    # and the prompts' KV cache, one row per prompt (8 prompts over 4 devices, 256 slots),
    # which their 8 samples share; the samples' own response caches (32 slots each) are its
    # temporaries. Bytes per slot of one row: 2 layers x keys and values x 2 kv heads x 32
    # dims x fp32. Besides: each prompt's logits (fp32), mask and next position, a key per sample.
    slot = 2 * 2 * 2 * 32 * 4
    prompt_cache, response_cache = slot * (8 // 4) * 256, slot * (8 * 8 // 4) * 32
    vocab = model_config("tiny", "", "float32").text.vocab_size
    besides = (8 // 4) * (vocab * 4 + 256 + 4) + (8 * 8 // 4) * 8
    mesh = make_mesh({"fsdp": 4}, jax.devices()[:4])
    text = nnx.State({k: v for k, v in state.items() if k != "visual"})
    text_params = bytes_per_device(text, param_shardings(mesh, text))
    decode = phases["rollout decode"]
    assert decode["arguments"] == text_params + prompt_cache + besides
    assert decode["temporaries"] >= response_cache
    # The update takes the train state and gives it back in place (donated).
    assert phases["update step"]["aliased"] >= plan["params"] + plan["opt_state"]
    for phase in phases.values():
        assert phase["temporaries"] > 0 and phase["compile_s"] > 0
        assert phase["total"] == (
            phase["arguments"] + phase["outputs"] - phase["aliased"] + phase["temporaries"] + phase["resident"]
        )

    assert not plan["fits"] and plan["peak"] > 0.1 * 2**30
    assert "verdict: does NOT fit in 0.1 GiB per device" in out.stdout and "to fit:" in out.stdout
    assert out.stdout.startswith("planning tiny") and "\ncompiler: xla:cpu (jaxlib" in out.stdout
    assert (
        "fits per device on (v5p 95 GiB: yes, v4 32 GiB: yes, v6e 32 GiB: yes, v5e 16 GiB: yes, h100 80 GiB: yes)"
        in out.stdout
    )
    assert "| update step |" in out.stdout
    # One VPPO update per rollout in one micro-batch: no pi_old pass, the perturbed forward
    # runs inside the update.
    assert plan["extra_forwards"] == [0, 1]
    assert "| rollout decode |" in out.stdout and "| update |" in out.stdout and "step on paper: " in out.stdout


def test_a_kl_plans_the_scoring_pass_with_the_reference_resident(tmp_path):
    """A KL to the reference: the scoring pass runs (pi_old's and the reference's forwards) and
    takes the reference's parameters, which stay resident through the other phases (the tiny
    model computes in float32, so they weigh what the parameters weigh)."""
    out = run_plan("--mesh=1,4,1", "--config.algo.kl_coef=0.1", f"--json={tmp_path / 'plan.json'}")
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    phases = {p["name"]: p for p in plan["phases"]}
    assert set(phases) == {"score rollouts", "update step", "rollout prefill", "rollout decode"}
    assert phases["score rollouts"]["arguments"] >= 2 * plan["params"]
    assert phases["update step"]["resident"] == plan["params"]
    assert phases["rollout decode"]["resident"] >= plan["params"]
    assert plan["extra_forwards"] == [2, 1]


def test_the_state_of_each_precision_mode_matches_its_hand_count():
    """bf16 compute; fp32 master weights with fp32 Adam moments, or bf16 weights with bf16
    moments and a bf16 Kahan buffer. Counted here from the parameter shapes, on one device."""
    from configs import tiny
    from vppo_jax.parallel import sharding
    from vppo_jax.plan import plan

    elements = sum(
        math.prod(p.shape)
        for p in jax.tree.leaves(nnx.split(abstract_model(model_config("tiny", "", "float32")), nnx.Param)[1])
    )
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    plans = {}
    for param_dtype in ("float32", "bfloat16"):
        config = tiny.get_config()
        config.model.dtype, config.model.param_dtype = "bfloat16", param_dtype
        plans[param_dtype] = plan(config, model_config("tiny", "", "bfloat16", param_dtype), mesh, phases=("decode",))
    master, kahan = plans["float32"], plans["bfloat16"]
    assert master["params"] == 4 * elements
    assert master["opt_state"] == 2 * 4 * elements + 8  # mu and nu; Adam's and the schedule's int32 counts
    assert kahan["params"] == 2 * elements
    assert kahan["opt_state"] == 3 * 2 * elements + 4  # mu, nu and the compensation; one int32 count
    # While sampling on the bf16 copy, the fp32 master weights stay resident with the moments.
    (decode_master,), (decode_kahan,) = master["phases"], kahan["phases"]
    assert decode_master.resident == master["opt_state"] + master["params"]
    assert decode_kahan.resident == kahan["opt_state"]
    assert decode_master.arguments >= 2 * elements  # the bf16 copy of the weights
    # With host memory (a TPU or GPU) the optimizer state waits there while sampling.
    config = tiny.get_config()
    config.model.dtype = "bfloat16"
    offloaded = plan(config, model_config("tiny", "", "bfloat16", "float32"), mesh, ("decode",), host_memory=True)
    assert offloaded["phases"][0].resident == master["params"]
    config.rollout.offload_optimizer_state = False
    kept = plan(config, model_config("tiny", "", "bfloat16", "float32"), mesh, ("decode",), host_memory=True)
    assert kept["phases"][0].resident == master["params"] + master["opt_state"]


def test_a_mesh_that_does_not_cover_the_topology_is_refused():
    out = run_plan("--topology=v5p-8", "--mesh=1,3,1")
    assert out.returncode == 2 and "Traceback" not in out.stderr  # bad input: one line
    assert "mesh {'data': 1, 'fsdp': 3, 'tensor': 1} uses 3 of the 4 devices of v5p-8" in out.stderr
    out = run_plan("--topology=v6e-9")
    assert out.returncode == 2 and "--topology='v6e-9': 9 v6e chips: a slice has a power of two" in out.stderr
    out = run_plan("--topology=h200")
    assert out.returncode == 2 and "--topology='h200': choose a TPU slice (v5p-N" in out.stderr


def test_the_sampler_is_planned_for_one_wave():
    """rollout.wave_prompts = 3 of the round's 8 prompts, rounded up to the 4 batch shards: one
    prompt per device instead of two, so the decode loop takes one prompt's cache row, logits,
    mask and position and its 8 samples' keys less (counted by hand, as above)."""
    from configs import tiny
    from vppo_jax.plan import plan

    model_cfg = model_config("tiny", "", "float32")
    mesh = make_mesh({"fsdp": 4}, jax.devices()[:4])
    decodes = {}
    for wave in (0, 3):
        config = tiny.get_config()
        config.rollout.wave_prompts = wave
        result = plan(config, model_cfg, mesh, phases=("decode",))
        decodes[wave] = result["phases"][0]
        assert result["prompts"] == (4 if wave else 8)
    slot = 2 * 2 * 2 * 32 * 4
    one_prompt = slot * 256 + model_cfg.text.vocab_size * 4 + 256 + 4 + 8 * 8
    assert decodes[0].arguments - decodes[3].arguments == one_prompt


def test_the_update_holds_what_the_config_trains():
    """bf16 compute, fp32 master weights. model.freeze_vision: the vision tower in bf16 with no
    Adam moments; LoRA: the adapters and their moments in fp32, the whole base model in bf16.
    Counted here from the parameter shapes, on one device."""
    from configs import tiny
    from vppo_jax.models.qwen2_5_vl import init_model, lora
    from vppo_jax.plan import plan

    model_cfg = model_config("tiny", "", "bfloat16", "float32")
    count = lambda tree: sum(math.prod(p.shape) for p in jax.tree.leaves(tree))
    state = nnx.split(abstract_model(model_cfg), nnx.Param)[1]
    elements, vision = count(state), count(state["visual"])
    adapted_model = nnx.eval_shape(lambda: lora.add_adapters(init_model(model_cfg), lora.LoRAConfig(rank=4)))
    adapters = count(nnx.state(adapted_model, nnx.LoRAParam))
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    plans = []
    for freeze_vision, rank in ((False, 0), (True, 0), (False, 4)):
        config = tiny.get_config()
        config.model.dtype, config.model.freeze_vision, config.model.lora.rank = "bfloat16", freeze_vision, rank
        plans.append(plan(config, model_cfg, mesh, phases=("update",)))
    full, frozen, adapted = plans
    assert (full["params"], full["frozen"]) == (4 * elements, 0)
    assert (frozen["params"], frozen["frozen"]) == (4 * (elements - vision), 2 * vision)
    assert (adapted["params"], adapted["frozen"]) == (4 * adapters, 2 * elements)
    for p in plans:
        assert p["opt_state"] == 2 * p["params"] + 8  # Adam's moments of the trained parameters alone
    # The update takes 10 bytes less per vision parameter (fp32 weight and moments -> a bf16
    # weight), and makes no fp32 gradient for them.
    (full_update,), (frozen_update,) = full["phases"], frozen["phases"]
    assert full_update.arguments - frozen_update.arguments == 10 * vision
    assert frozen_update.temporaries < full_update.temporaries


def test_a_packed_update_is_planned_for_the_tokens_of_the_mean_lengths(tmp_path):
    """train.packing (the tiny recipe's): the update runs bins of the token budget, as many as the rollout's mean
    lengths fill; at short responses its compiled FLOPs fall below the padded update's, whose
    rows run to rollout.max_new_tokens (32) whatever the responses' lengths."""
    flops = {}
    layouts = {"padded": "--config.train.packing=False", "packed": "--config.train.micro_batch_tokens=512"}
    for name, option in layouts.items():
        out = run_plan("--topology=v5p-8", "--mesh=1,4,1", "--response_tokens=8", option, f"--json={tmp_path}/p.json")
        assert out.returncode == 0, out.stderr[-3000:]
        plan = json.loads((tmp_path / "p.json").read_text())
        flops[name] = next(p["flops"] for p in plan["phases"] if p["name"] == "update step")
    # 8 prompts of 116 tokens (16 the image) and 8 x 8 responses: 1,440 tokens, three bins of 512.
    assert plan["packed"]["micro_batches"] == 1 and plan["packed"]["rows"] == 4 * 22
    assert "update: packed, one bin of 512 tokens per device and micro-batch, 1 micro-batches" in out.stdout
    assert "VPPO's twin bin" in out.stdout
    assert flops["packed"] < 0.7 * flops["padded"]
