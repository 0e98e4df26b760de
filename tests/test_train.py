"""The trainer end to end on the tiny default: outputs, exact resume after SIGKILL, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vppo_jax.embedded import synthetic
from vppo_jax.trainer.checkpoints import claim_workdir
from vppo_jax.trainer.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tiny_task):
    return tiny_task


def write_config(path, assets, **overrides) -> str:
    """A config file: the tiny test recipe on the shared assets, plus `overrides` (dotted names)."""
    lines = [
        "from configs import tiny",
        "def get_config(arg=''):",
        "    c = tiny.get_config('test')",
        f"    c.model.path = {assets['model']!r}",
        f"    c.data.train_files = ({assets['train']!r},)",
        f"    c.data.val_files = ({assets['val']!r},)",
        *(f"    c.{name} = {value!r}" for name, value in overrides.items()),
        "    return c",
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def train_command(config: str, workdir) -> list[str]:
    return [sys.executable, "-m", "vppo_jax.train", f"--config={config}", f"--workdir={workdir}"]


def run(config: str, workdir):
    out = subprocess.run(train_command(config, workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def deterministic(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines]


def test_tiny_run_writes_metrics_tensorboard_and_checkpoints(tmp_path, assets):
    # No online filter: every group updates, whatever the rewards. The reference's perturbation
    # geometry: images blackened on the host, read by the step. A reward module of the user's,
    # beside the config file (the run starts from the repository root, not from there). The
    # recipes' memory settings: layers rematerialised, attention in blocks shorter than a row.
    (tmp_path / "my_reward.py").write_text(
        "from vppo_jax.rollout.rewards import register\n\n\n"
        "@register('always_one')\ndef always_one(response, answer):\n    return 1.0\n"
    )
    config = write_config(
        tmp_path / "config.py",
        assets,
        **{
            "train.steps": 2,
            "checkpoint.every_steps": 1,
            "algo.online_filter": False,
            "algo.perturbation": "blacken_pixels",
            "reward.name": "my_reward:always_one",
            "model.remat": "full",
            "model.attention_block": 32,
        },
    )
    out = run(config, tmp_path / "run")
    assert (
        "images: the first training image (84 x 84 px) reaches the model at 84 x 84 px, 9 image tokens "
        "(data.min_pixels=0, data.max_pixels=0, then sides rounded to multiples of 28)"
    ) in out.stdout
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [line["rollout/accuracy"] for line in lines] == [1.0, 1.0]  # graded with the user's module
    assert [line["step"] for line in lines] == [0, 1]
    for name in (
        "loss",
        "rollout/accuracy",
        "grad_norm",
        "dependency/token_mean",
        "time/rollout",
        "time/update",
        "time/tokens_per_second",
        "eval/avg@2",
        "eval/pass@2",
        "data/skipped_bad_image",
    ):
        assert name in lines[-1], name
    assert os.listdir(tmp_path / "run" / "tensorboard")
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1", "2"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 2


def test_sigkill_and_restart_gives_the_metrics_of_an_uninterrupted_run(tmp_path, assets):
    # No online filter: a random policy scores 0, and the entropy term must still move the
    # parameters so every later step depends on the restored state.
    overrides = {"train.steps": 4, "checkpoint.every_steps": 1, "algo.online_filter": False}
    config = write_config(tmp_path / "config.py", assets, **overrides)
    run(config, tmp_path / "straight")
    reference = deterministic(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    assert len({line["entropy"] for line in reference}) > 1  # the state changes from step to step

    workdir = tmp_path / "killed"
    process = subprocess.Popen(
        train_command(config, workdir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "2").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(read_metrics(workdir / "metrics.jsonl")) < 4
    run(config, workdir)
    assert deterministic(read_metrics(workdir / "metrics.jsonl")) == reference


def test_bad_examples_are_skipped_and_counted(tmp_path, assets):
    rows = synthetic.generate_rows(12, seed=5)
    rows[0]["images"] = [{"bytes": b"not an image", "path": None}]
    rows[1]["answer"] = None
    rows[2]["problem"] = "count " * 400  # longer than max_prompt_length
    bad = tmp_path / "bad.parquet"
    synthetic.write_parquet(rows, str(bad))
    config = write_config(tmp_path / "config.py", dict(assets, train=str(bad)), **{"train.steps": 2})
    run(config, tmp_path / "run")
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["data/skipped_bad_image"] >= 1
    assert last["data/skipped_missing_field"] >= 1
    assert last["data/skipped_too_long"] >= 1


def test_a_hanging_grader_times_out_and_the_run_goes_on(tmp_path, assets):
    config = write_config(
        tmp_path / "config.py",
        assets,
        **{
            "train.steps": 1,
            "reward.name": "tests.hanging_reward:hang",
            "reward.timeout_s": 0.5,
            "eval.every_steps": 100,
            "rollout.prompts_per_step": 2,
            "rollout.group_size": 2,
            "checkpoint.every_steps": 0,
        },
    )
    run(config, tmp_path / "run")
    (line,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert line["rollout/timeouts"] > 0 and line["rollout/accuracy"] == 0.0
    assert not os.listdir(tmp_path / "run" / "checkpoints")  # checkpoint.every_steps=0: none, not even the last


def test_a_packed_run_updates_as_a_padded_one(tmp_path, assets):
    """The same first step (the same rollout) with train.packing off and on: the same update.
    VPPO's dependency against the gray image (a random blackening draws by patch slot, and slots
    differ between layouts), TAS and TGF off: the tiny model's dependency is of the order of the
    float rounding by which the layouts differ, and their rankings would magnify it
    (tests/test_packing.py checks them exactly on a model that sees its images)."""
    overrides = {
        "train.steps": 1,
        "checkpoint.every_steps": 0,
        "eval.every_steps": 100,
        "algo.online_filter": False,
        "reward.name": "tests.hash_reward:one_in_six",
        "algo.perturbation": "gray",
        "algo.tas": False,
        "algo.tgf": False,
    }
    lines = {}
    # The padded rows in one micro-batch, the packed ones in one bin (the tiny recipe's).
    layouts = {False: {"train.packing": False, "train.micro_batches": 1}, True: {}}
    for packing, layout in layouts.items():
        config = write_config(tmp_path / f"config_{packing}.py", assets, **(overrides | layout))
        run(config, tmp_path / f"run_{packing}")
        (lines[packing],) = read_metrics(tmp_path / f"run_{packing}" / "metrics.jsonl")
    padded, packed = lines[False], lines[True]
    assert padded["rollout/accuracy"] == packed["rollout/accuracy"] > 0  # one rollout, some rewards
    assert padded["response_tokens"] == packed["response_tokens"]
    for name in ("loss", "pg_loss", "entropy", "grad_norm", "dependency/token_mean"):
        assert packed[name] == pytest.approx(padded[name], rel=1e-4), name


def test_a_workdir_of_another_config_is_refused(tmp_path):
    from configs import tiny

    config = tiny.get_config("test")
    claim_workdir(str(tmp_path), config)
    claim_workdir(str(tmp_path), config)  # the same run resumes
    config.train.steps = 99  # extending a run is allowed
    claim_workdir(str(tmp_path), config)
    config.algo.tgf_k = 0.2
    with pytest.raises(ValueError, match=r"another config \(algo.tgf_k: 0.4 -> 0.2\)"):
        claim_workdir(str(tmp_path), config)


def test_a_collapsed_run_stops_with_an_error_that_names_the_cause(tmp_path, assets):
    # The tiny model is not warm-started: every response scores 0, dynamic sampling keeps no
    # group, and the guard must count those steps, skip their updates and stop the run.
    config = write_config(
        tmp_path / "config.py",
        assets,
        **{
            "train.steps": 6,
            "rollout.max_filter_rounds": 1,
            "rollout.max_starved_steps": 3,
            "eval.every_steps": 100,
        },
    )
    out = subprocess.run(train_command(config, tmp_path / "run"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 3
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("error: The policy has collapsed: for 3 consecutive steps (up to step 2)")
    )
    assert "Traceback" not in out.stderr
    for knob in ("optim.learning_rate", "rollout.max_filter_rounds", "rollout.max_new_tokens"):
        assert knob in out.stderr
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [line["rollout/empty_steps"] for line in lines] == [1, 2, 3]
    assert [line["rollout/live_share"] for line in lines] == [0.0, 0.0, 0.0]
    assert [line["rollout/filler_groups"] for line in lines] == [4, 4, 4]  # the whole batch is padding
    assert not any("loss" in line for line in lines)  # no optimizer update without a live group
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]  # written before the stop


@pytest.mark.parametrize("recipe", ["vppo_7b", "vppo_32b", "dapo_7b", "grpo_7b"])
def test_the_paper_recipes_train_two_epochs_of_virl39k_as_the_reference_counts_them(recipe):
    import importlib

    from vppo_jax.trainer.config import training_steps

    config = importlib.import_module(f"configs.{recipe}").get_config()
    # ViRL39K's 38,870 rows in full batches of 384 prompts: 101 per epoch, 202 in two.
    assert training_steps(config, 38870) == 202
    assert training_steps(importlib.import_module(f"configs.{recipe}").get_config("runlocal"), 38870) == 2
    config.rollout.prompts_per_step = 40000
    with pytest.raises(ValueError, match="gives no step: set train.epochs >= 1, or train.steps"):
        training_steps(config, 38870)


def test_micro_batches_come_from_the_token_budget_unless_counted():
    from vppo_jax.trainer.config import default_config, micro_batches

    config = default_config()  # 2048 tokens per device and micro-batch
    assert micro_batches(config, rows=256, row_tokens=192) == 32  # 8 rows of 192 tokens (10 would fit)
    assert micro_batches(config, rows=1024, row_tokens=6144, row_shards=8) == 128  # one row per device
    assert micro_batches(config, rows=96, row_tokens=500, row_shards=2) == 12  # 4 fit; 48 rows split as 12 x 4
    # Groups of 8 rows sharing a 64-token prompt, which a device's rows of a group run once:
    # 8 rows of 64 + 128 tokens cost 64 + 8 x 128 = 1088, 16 rows (two groups) 2176: 8 fit.
    # With 16-token responses 64 rows cost 8 x (64 + 8 x 16) = 1536, 128 rows 3072: 64 fit
    # (16 counting every row's prompt).
    assert micro_batches(config, rows=256, row_tokens=192, prompt_tokens=64, group_size=8) == 32
    assert micro_batches(config, rows=256, row_tokens=80, prompt_tokens=64, group_size=8) == 4
    assert micro_batches(config, rows=256, row_tokens=80) == 16
    # Rows of 2048 + 2048 tokens fit 2 to a 6144 budget only with their shared prompt counted once.
    config.train.micro_batch_tokens = 6144
    assert micro_batches(config, rows=1024, row_tokens=4096, row_shards=16) == 64  # 1 of 4096 per device
    assert micro_batches(config, rows=1024, row_tokens=4096, row_shards=16, prompt_tokens=2048, group_size=8) == 32
    config.train.micro_batch_tokens = 100
    assert micro_batches(config, rows=256, row_tokens=192) == 256  # never less than a row
    config.train.micro_batches = 4
    assert micro_batches(config, rows=256, row_tokens=192) == 4  # a count wins

    # The shipped recipes: one row per device per micro-batch on any topology (1024 rows per
    # update; 7B rows of 4096 + 2048 tokens, 32B rows of 4096 + 4096).
    from configs import vppo_7b, vppo_32b

    for devices, count in ((8, 128), (16, 64), (32, 32)):
        assert micro_batches(vppo_7b.get_config(), rows=1024, row_tokens=6144, row_shards=devices) == count
        assert micro_batches(vppo_32b.get_config(), rows=1024, row_tokens=8192, row_shards=devices) == count


@pytest.mark.parametrize(
    "override, message",
    [
        ({"reward.name": "no_such_module:score"}, "reward 'no_such_module:score': cannot import no_such_module"),
        ({"data.prompt_template": "fancy"}, "data.prompt_template='fancy' is neither one of"),
        ({"algo.estimator": "kl2"}, "estimator='kl2'; choose one of"),
        ({"algo.advantage": "ppo"}, "algo.advantage='ppo'; choose one of"),
        ({"algo.kl_estimator": "kl"}, "kl_estimator='kl'; choose one of"),
        ({"algo.policy_loss": "gspo"}, "policy_loss='gspo' has no per-token term for TGF to filter: use"),
        ({"model.param_dtype": "float16"}, "model.param_dtype='float16'; choose one of"),
        ({"train.micro_batches": 0, "train.micro_batch_tokens": 0}, "train.micro_batch_tokens=0: give a positive"),
    ],
)
def test_every_name_in_the_config_is_checked(override, message):
    from configs import tiny
    from vppo_jax.trainer.config import check_names

    config = tiny.get_config()
    for name, value in override.items():
        section, field = name.split(".")
        config[section][field] = value
    with pytest.raises(ValueError, match=message):
        check_names(config)


def test_a_name_that_does_not_resolve_fails_before_anything_loads(tmp_path, assets):
    config = write_config(tmp_path / "config.py", assets, **{"reward.name": "no_such_module:score"})
    out = subprocess.run(train_command(config, tmp_path / "run"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: reward 'no_such_module:score': cannot import no_such_module")
    assert not (tmp_path / "run" / "config.json").exists()  # refused before the workdir was claimed
    debug = subprocess.run(
        [*train_command(config, tmp_path / "run"), "--debug"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr


def test_a_recipe_without_model_or_data_is_refused_without_touching_demo_fields(tmp_path):
    """Only a config with a `synthetic` section is the embedded default; the 7B recipe with
    no model.path must say what to set, not reach for demo-only fields."""
    from configs import vppo_7b
    from vppo_jax.embedded.assets import is_embedded_default
    from vppo_jax.trainer.trainer import Trainer

    config = vppo_7b.get_config("runlocal")
    assert not is_embedded_default(config)
    with pytest.raises(ValueError, match="names no model"):
        Trainer(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_mistyped_override_is_one_line_and_exit_status_2(tmp_path):
    out = subprocess.run(
        [*train_command("configs/tiny.py", tmp_path / "run"), "--config.rollout.group_sise=4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: the config has no field 'group_sise'; Did you mean \"group_size\" instead "
        'of "group_sise"? (all fields: vppo_jax/trainer/config.py)'
    )


def test_loading_a_model_config_without_torch_says_nothing_about_pytorch():
    hide_torch = "import sys; sys.modules['torch'] = None; "
    quiet = subprocess.run(
        [
            sys.executable,
            "-c",
            hide_torch + "from vppo_jax.embedded.tiny_model import write_tiny_model; import transformers",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "PyTorch was not found" not in quiet.stderr
    bare = subprocess.run(
        [sys.executable, "-c", hide_torch + "import transformers"], capture_output=True, text=True, timeout=300
    )
    assert "PyTorch was not found" in bare.stderr  # what transformers says without the filter


def test_prompts_are_padded_from_rollout_min_prompt_length():
    from configs import tiny
    from vppo_jax.data.prompts import SpecialTokens
    from vppo_jax.models.qwen2_5_vl.inputs import left_pad_to_bucket
    from vppo_jax.trainer.config import sampling_params

    config = tiny.get_config()
    config.rollout.min_prompt_length = 16
    params = sampling_params(config, SpecialTokens(1, 2, 0, 3, 4, 5))
    ids = np.ones((1, 46), np.int32)
    arrays = {"input_ids": ids, "attention_mask": ids, "mm_token_type_ids": 0 * ids}
    assert left_pad_to_bucket(arrays, params.min_prompt_length, 0)["input_ids"].shape == (1, 48)
    config.rollout.min_prompt_length = 512
    params = sampling_params(config, SpecialTokens(1, 2, 0, 3, 4, 5))
    assert left_pad_to_bucket(arrays, params.min_prompt_length, 0)["input_ids"].shape == (1, 512)
