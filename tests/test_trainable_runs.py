"""Runs that train part of the model, end to end: a LoRA run's export holds merged full weights
that transformers loads with the logits of the run's own (unmerged) policy; a run with the vision
tower frozen resumes from its checkpoints and exports every weight, the tower's unchanged."""

import os

import numpy as np
import torch
from test_conversion import all_tensors, assert_bit_identical
from test_export import processor_inputs, trainer_restore
from test_train import run, write_config
from transformers import Qwen2_5_VLForConditionalGeneration

from scripts import convert_jax_to_hf
from vppo_jax.trainer.metrics import read_metrics

SMALL = {
    "train.steps": 2,
    "checkpoint.every_steps": 1,
    "algo.online_filter": False,  # every group updates, whatever the rewards
    "eval.every_steps": 100,
    "rollout.prompts_per_step": 2,
    "rollout.group_size": 2,
    "rollout.max_new_tokens": 4,
    "reward.workers": 1,
}


def trained_and_exported(tmp_path, tiny_task, **overrides) -> tuple[str, str]:
    run(write_config(tmp_path / "config.py", tiny_task, **SMALL, **overrides), tmp_path / "run")
    assert convert_jax_to_hf.convert(str(tmp_path / "run"), str(tmp_path / "export")) == 0
    return str(tmp_path / "run"), str(tmp_path / "export")


def test_a_lora_export_is_the_merged_policy(tmp_path, tiny_task):
    targets = ("q_proj", "v_proj", "down_proj")
    lora = {"model.lora.rank": 4, "model.lora.alpha": 8.0, "model.lora.targets": targets, "optim.learning_rate": 1e-2}
    workdir, export = trained_and_exported(tmp_path, tiny_task, **lora)
    batch = processor_inputs(export)
    hf_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(export, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf_model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    ours = np.asarray(trainer_restore(workdir, 2)(**batch))
    real = batch["attention_mask"].astype(bool)
    assert np.abs(theirs - ours)[real].max() <= 1e-5
    # The targeted kernels moved (B is no longer zero), every other weight is the base model's.
    base, exported = all_tensors(tiny_task["model"]), all_tensors(export)
    changed = {name for name in base if not torch.equal(base[name], exported[name])}
    assert changed and all(name.endswith(tuple(f"{t}.weight" for t in targets)) for name in changed), changed
    assert len(changed) == len(targets) * 2  # the tiny model's 2 decoder layers


def test_a_run_with_the_vision_tower_frozen_resumes_and_exports_every_weight(tmp_path, tiny_task):
    workdir, export = trained_and_exported(tmp_path, tiny_task, **{"model.freeze_vision": True})
    # Resumed from checkpoint 2 (orbax restores the trained and frozen parts) for one more step.
    longer = SMALL | {"model.freeze_vision": True, "train.steps": 3}
    run(write_config(tmp_path / "config.py", tiny_task, **longer), workdir)
    assert [m["step"] for m in read_metrics(os.path.join(workdir, "metrics.jsonl"))] == [0, 1, 2]
    base, exported = all_tensors(tiny_task["model"]), all_tensors(export)
    assert sorted(base) == sorted(exported)
    vision = [name for name in base if name.startswith(("visual.", "model.visual."))]
    assert vision
    assert_bit_identical({n: base[n] for n in vision}, {n: exported[n] for n in vision})
    assert all(not torch.equal(base[n], exported[n]) for n in base if n.endswith("q_proj.weight") and n not in vision)
