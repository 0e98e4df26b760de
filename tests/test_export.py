"""scripts/convert_jax_to_hf.py on a training run: the export is the policy of the step asked
for (transformers' logits against the trainer's own restore of that checkpoint), in a bucket
too, with the processor files transformers needs, and bad input refused in one line."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from test_conversion import all_tensors, assert_bit_identical
from test_train import run, write_config
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from benchmarks.peer_task import image_text_processor_class
from scripts import convert_hf_to_jax, convert_jax_to_hf
from vppo_jax.errors import InputError
from vppo_jax.eval import runs
from vppo_jax.io import paths
from vppo_jax.models import qwen2_5_vl
from vppo_jax.models.qwen2_5_vl import lora
from vppo_jax.models.qwen2_5_vl.image_processor import ImageProcessor
from vppo_jax.rollout.policy import compute_model, load_policy
from vppo_jax.trainer import config as config_lib
from vppo_jax.trainer.checkpoints import RunCheckpoints
from vppo_jax.vppo.batch import init_state

from fake_bucket import fake_bucket
from hf_reference import random_image

STEPS = 2
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_task) -> str:
    """A run of the tiny test recipe, smaller still, with a checkpoint after each of its STEPS
    updates (no online filter: every group updates, whatever the rewards)."""
    directory = tmp_path_factory.mktemp("export_run")
    overrides = {
        "train.steps": STEPS,
        "checkpoint.every_steps": 1,
        "algo.online_filter": False,
        "eval.every_steps": 100,
        "rollout.prompts_per_step": 2,
        "rollout.group_size": 2,
        "rollout.max_new_tokens": 4,
        "reward.workers": 1,
    }
    run(write_config(directory / "config.py", tiny_task, **overrides), directory / "run")
    return str(directory / "run")


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict:
    """Exports of the run: the latest step (default), step 1, and the latest in bfloat16."""
    directory = tmp_path_factory.mktemp("exports")
    out = {name: str(directory / name) for name in ("latest", "step1", "bf16")}
    assert convert_jax_to_hf.convert(trained, out["latest"]) == 0
    assert convert_jax_to_hf.convert(trained, out["step1"], step=1) == 0
    assert convert_jax_to_hf.convert(trained, out["bf16"], dtype="bfloat16") == 0
    return out


def trainer_restore(workdir: str, step: int):
    """The run's policy model at checkpoint `step`, as the trainer resumes it: the whole train
    state restored by RunCheckpoints (not the export's partial read of the parameters)."""
    config = config_lib.default_config()
    config.update(json.loads(open(os.path.join(workdir, "config.json")).read()))
    policy = load_policy(config.model.path, config.model.dtype, config.model.param_dtype)
    model = lora.add_adapters(policy.model, config_lib.lora_config(config))  # the run's adapters, unmerged
    optimizer, trainable = config_lib.optimizer(config), config_lib.trainable(config)
    abstract_state = jax.eval_shape(lambda: init_state(model, optimizer, trainable)[1])
    checkpoints = RunCheckpoints(workdir, config.checkpoint.keep)
    state = checkpoints.restore(step, abstract_state)[0]
    checkpoints.close()
    return compute_model(nnx.graphdef(model), state.model_params, model.config)


def processor_inputs(export: str) -> dict:
    """Two prompts with images of different sizes, left-padded, as transformers' Qwen2.5-VL
    processor (the export's own tokenizer and image processor) prepares them. Its video processor
    is left out: it needs torchvision, whose PyPI wheels do not load beside the CPU torch pinned here."""
    tokenizer = AutoTokenizer.from_pretrained(export)
    tokenizer.pad_token, tokenizer.padding_side = "<|endoftext|>", "left"
    processor = image_text_processor_class()(AutoImageProcessor.from_pretrained(export), tokenizer)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    texts = [f"<|im_start|>user\n{image}How many shapes?<|im_end|>", f"{image}Count the red ones, then the blue ones."]
    images = [random_image(84, 84, seed=1), random_image(30, 140, seed=2)]
    batch = processor(text=texts, images=images, padding=True, return_tensors="np", return_mm_token_type_ids=True)
    return {name: np.asarray(batch[name]) for name in MODEL_INPUTS}


def test_export_gives_transformers_the_logits_of_the_policy_at_that_step(trained, exported):
    batch = processor_inputs(exported["latest"])
    assert (batch["attention_mask"] == 0).any() and len(batch["image_grid_thw"]) == 2  # padding and images both used
    hf_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(exported["latest"], dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf_model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    ours = np.asarray(trainer_restore(trained, STEPS)(**batch))
    real = batch["attention_mask"].astype(bool)
    assert np.abs(theirs - ours)[real].max() <= 1e-5


def test_export_holds_the_parameters_of_the_step_asked_for(trained, exported, tmp_path):
    # save_pretrained of the trainer's restore of each step, against the exports bit for bit.
    for step, export in ((STEPS, exported["latest"]), (1, exported["step1"])):
        qwen2_5_vl.save_pretrained(trainer_restore(trained, step), str(tmp_path / str(step)))
        assert_bit_identical(all_tensors(tmp_path / str(step)), all_tensors(export))
    latest, first = all_tensors(exported["latest"]), all_tensors(exported["step1"])
    changed = [name for name in latest if not torch.equal(latest[name], first[name])]
    assert len(changed) > len(latest) // 2  # the second update moved the parameters
    # The run's directory form names the step as well.
    assert convert_jax_to_hf.convert(os.path.join(trained, "checkpoints", "1"), str(tmp_path / "by_path")) == 0
    assert_bit_identical(all_tensors(tmp_path / "by_path"), first)


def test_bf16_export_is_the_bf16_cast_of_the_parameters(exported):
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in all_tensors(exported["latest"]).items()}
    assert_bit_identical(expected, all_tensors(exported["bf16"]))
    config = json.loads(open(os.path.join(exported["bf16"], "config.json")).read())
    assert config["dtype"] == "bfloat16"
    assert json.loads(open(os.path.join(exported["latest"], "config.json")).read())["dtype"] == "float32"


def test_export_has_the_processor_the_run_was_trained_with(exported, tiny_task):
    export = exported["latest"]
    assert sorted(os.listdir(export)) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
    ]
    # transformers' image processor from the export prepares images as the run's did (from the
    # base model, which has no preprocessor_config.json); 30 x 40 px is below min_pixels.
    run_processor = ImageProcessor.from_pretrained(tiny_task["model"])
    for image in (random_image(30, 40, seed=3), random_image(300, 500, seed=4)):
        theirs = AutoImageProcessor.from_pretrained(export)(images=[image], return_tensors="np")
        np.testing.assert_array_equal(theirs["pixel_values"], run_processor(image)[0])
    # AutoProcessor reads the processor class from the export's files and builds its parts; the
    # one part it cannot build without torchvision (see processor_inputs) is the video processor.
    try:
        import torchvision  # noqa: F401

        assert type(AutoProcessor.from_pretrained(export)).__name__ == "Qwen2_5_VLProcessor"
    except ImportError:
        with pytest.raises(ImportError, match="Qwen2VLVideoProcessor requires the Torchvision library"):
            AutoProcessor.from_pretrained(export)


def test_export_from_and_into_a_bucket(trained, exported, tmp_path):
    with fake_bucket() as bucket:
        paths.copy_tree(trained, f"{bucket}/run")
        assert convert_jax_to_hf.convert(f"{bucket}/run", f"{bucket}/export", step=1) == 0
        paths.copy_tree(f"{bucket}/export", str(tmp_path / "export"))
    assert_bit_identical(all_tensors(tmp_path / "export"), all_tensors(exported["step1"]))
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json"):
        assert (tmp_path / "export" / name).read_text() == open(os.path.join(exported["step1"], name)).read()


def test_bad_input_is_one_line_and_status_2(trained, exported, tmp_path, capsys):
    def refused(checkpoint, step=None, out=tmp_path / "out") -> str:
        assert convert_jax_to_hf.convert(str(checkpoint), str(out), step=step) == 2
        (line,) = capsys.readouterr().err.splitlines()
        return line

    assert refused(trained, step=7) == f"error: {trained}/checkpoints has no checkpoint 7; it holds steps [1, 2]."
    assert "is neither a training run's workdir" in refused(tmp_path)
    assert "does not exist" in refused(tmp_path / "missing")
    assert "is checkpoint 1 of" in refused(os.path.join(trained, "checkpoints", "1"), step=2)
    assert os.listdir(tmp_path) == []  # nothing written
    before = all_tensors(exported["step1"])
    assert "already exists" in refused(trained, out=exported["step1"])
    assert_bit_identical(all_tensors(exported["step1"]), before)  # not written over with the latest step


def test_the_model_a_run_started_from_is_found(tmp_path, tiny_task):
    # The embedded default's model lies in the run's workdir, named by the path the run was started with.
    workdir = tmp_path / "moved_run"
    shutil.copytree(tiny_task["model"], workdir / "embedded" / "warm_start")
    config = config_lib.default_config()
    config.model.path = "runs/tiny/embedded/warm_start"  # relative to a directory this test is not in
    assert runs.base_model_dir(str(workdir), config) == str(workdir / "embedded" / "warm_start")
    # A converted checkpoint keeps its config and tokenizer in hf/.
    assert convert_hf_to_jax.convert(tiny_task["model"], str(tmp_path / "converted")) == 0
    config.model.path = str(tmp_path / "converted")
    assert runs.base_model_dir(str(workdir), config) == str(tmp_path / "converted" / "hf")
    config.model.path = "runs/elsewhere/model"
    with pytest.raises(InputError, match="names model.path='runs/elsewhere/model', which is not found here"):
        runs.base_model_dir(str(workdir), config)
