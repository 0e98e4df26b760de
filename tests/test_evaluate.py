"""python -m vppo_jax.eval: avg@k and pass@k recomputed from its per-problem results, the same
responses from every kind of checkpoint of the same weights, clear errors for other paths."""

import json
import os

import jax
import numpy as np
import pytest

from scripts import convert_hf_to_jax
from vppo_jax.embedded import synthetic
from vppo_jax.embedded.tiny_model import write_tiny_model
from vppo_jax.errors import InputError
from vppo_jax.eval import benchmarks as evaluate
from vppo_jax.eval.__main__ import benchmark_files
from vppo_jax.rollout.policy import load_policy
from vppo_jax.trainer.checkpoints import RunCheckpoints, claim_workdir
from vppo_jax.trainer.config import default_config, learning_rate
from vppo_jax.trainer.optimizer import make_optimizer
from vppo_jax.vppo.batch import init_state

from hash_reward import one_in_six

K = 4
PROBLEMS = 4
REWARD = "hash_reward:one_in_six"
COLUMNS = {"problem": "question", "answer": "solution", "images": "pictures"}  # not the default names


def renamed(rows: list[dict]) -> list[dict]:
    return [{COLUMNS[key]: row[key] for key in COLUMNS} for row in rows]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Two benchmarks (parquet, and JSON lines with image files) with renamed columns, a tiny
    model ("base") and the same architecture and tokenizer with other weights ("trained")."""
    directory = tmp_path_factory.mktemp("assets")
    files = synthetic.write_splits(str(directory), train=8, val=PROBLEMS, seed=0)
    corpus = synthetic.tokenizer_corpus(files["train"])
    shapes = directory / "shapes.parquet"
    synthetic.write_parquet(renamed(synthetic.generate_rows(PROBLEMS, seed=1)), str(shapes))
    counting = directory / "counting.jsonl"
    with open(counting, "w") as f:
        for number, row in enumerate(renamed(synthetic.generate_rows(PROBLEMS, seed=2))):
            image = f"image_{number}.png"
            (directory / image).write_bytes(row["pictures"][0]["bytes"])
            f.write(json.dumps(dict(row, pictures=[image])) + "\n")
    return {
        "base": write_tiny_model(str(directory / "base"), corpus, seed=0),
        "trained": write_tiny_model(str(directory / "trained"), corpus, seed=1),
        "benchmarks": [str(shapes), str(counting)],
    }


def run_evaluate(checkpoint: str, out, benchmarks: list[str], **extra) -> dict:
    """The CLI's evaluation in this process (the sampler compiles once for all calls); returns
    summary.json. out=None leaves --out to its default."""
    evaluate.evaluate(
        evaluate.EvalOptions(
            checkpoint=checkpoint,
            data=benchmarks,
            k=K,
            max_new_tokens=4,
            reward=REWARD,
            problem_key="question",
            answer_key="solution",
            images_key="pictures",
            out=str(out) if out else None,
            **extra,
        )
    )
    with open(os.path.join(out or os.path.join(checkpoint, evaluate.EVALUATION_DIR), evaluate.SUMMARY_FILE)) as f:
        return json.load(f)


def test_data_files_are_a_comma_list_or_the_words_after_data():
    # --data a.parquet b.parquet (a shell glob): absl leaves b.parquet over, a further file.
    assert benchmark_files(["a.parquet"], ["b.parquet"]) == ["a.parquet", "b.parquet"]
    assert benchmark_files(["a.parquet", "b.parquet"], []) == ["a.parquet", "b.parquet"]  # --data=a.parquet,b.parquet
    with pytest.raises(ValueError, match="unexpected argument.* go after --data"):
        benchmark_files(None, ["a.parquet"])
    with pytest.raises(ValueError, match="--data is required"):
        benchmark_files(None, [])


def per_problem(out, benchmark: str) -> list[dict]:
    with open(os.path.join(out, evaluate.benchmark_name(benchmark) + ".jsonl")) as f:
        return [json.loads(line) for line in f]


def responses(out, benchmark: str) -> list[list[str]]:
    return [line["responses"] for line in per_problem(out, benchmark)]


def test_avg_and_pass_at_k_match_the_per_problem_results(tmp_path, assets):
    summary = run_evaluate(assets["trained"], tmp_path, assets["benchmarks"], dtype="float32")
    averages = []
    for benchmark in assets["benchmarks"]:
        lines = per_problem(tmp_path, benchmark)
        assert [line["index"] for line in lines] == list(range(PROBLEMS))
        rewards = np.array([line["rewards"] for line in lines])
        assert rewards.shape == (PROBLEMS, K)
        # The rewards are the grader's on the recorded responses.
        assert rewards.tolist() == [[one_in_six(r, "") for r in line["responses"]] for line in lines]
        expected = {f"avg@{K}": rewards.mean(), f"pass@{K}": (rewards == 1).any(axis=1).mean()}
        result = summary["benchmarks"][evaluate.benchmark_name(benchmark)]
        assert result == pytest.approx({"problems": PROBLEMS, "skipped": 0, **expected})
        averages.append(expected)
    assert summary["average"] == pytest.approx({m: np.mean([a[m] for a in averages]) for m in averages[0]})
    assert 0 < summary["average"][f"avg@{K}"] < summary["average"][f"pass@{K}"] < 1  # a test with teeth
    assert summary["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 4}


def write_run(workdir, base: str, trained: str, step: int):
    """A run's workdir on `base` whose checkpoint `step` holds the weights of `trained`, as the trainer saves it."""
    config = default_config()
    config.model.path, config.model.dtype = base, "float32"
    config.rollout.max_new_tokens, config.reward.name, config.reward.workers = 4, REWARD, 1
    claim_workdir(str(workdir), config)
    optimizer = make_optimizer(learning_rate(config))  # a schedule, as the trainer's
    _, state = init_state(load_policy(base, "float32").model, optimizer)
    _, trained_state = init_state(load_policy(trained, "float32").model, optimizer)
    checkpoints = RunCheckpoints(str(workdir), keep=3)
    checkpoints.save(step, state.replace(params=trained_state.params), jax.random.key(0), {}, {})
    checkpoints.close()


def test_every_kind_of_checkpoint_gives_the_responses_of_its_weights(tmp_path, assets):
    benchmark = assets["benchmarks"][:1]
    run_evaluate(assets["trained"], tmp_path / "hf", benchmark, dtype="float32")
    convert_hf_to_jax.convert(assets["trained"], str(tmp_path / "converted"))
    run_evaluate(str(tmp_path / "converted"), tmp_path / "converted_eval", benchmark, dtype="float32")
    write_run(tmp_path / "run", assets["base"], assets["trained"], step=3)
    summary = run_evaluate(str(tmp_path / "run"), None, benchmark)  # the default --out: WORKDIR/evaluation
    run_evaluate(assets["base"], tmp_path / "base", benchmark, dtype="float32")

    expected = responses(tmp_path / "hf", benchmark[0])
    assert responses(tmp_path / "converted_eval", benchmark[0]) == expected
    assert responses(tmp_path / "run" / evaluate.EVALUATION_DIR, benchmark[0]) == expected
    assert summary["step"] == 3
    # A run's checkpoint directory is that step of the run; a step it has no checkpoint of is refused.
    assert evaluate.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "3"), None, "float32")[2] == 3
    with pytest.raises(InputError, match=r"has no checkpoint 4; it holds steps \[3\]"):
        evaluate.load_checkpoint(str(tmp_path / "run"), 4, "float32")
    assert responses(tmp_path / "base", benchmark[0]) != expected  # the weights matter


def test_paths_that_are_not_checkpoints_are_refused_clearly(tmp_path, assets):
    benchmark = assets["benchmarks"][:1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither a training run's workdir .* nor a checkpoint written by"):
        run_evaluate(str(tmp_path / "empty"), tmp_path / "out", benchmark)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_evaluate(str(tmp_path / "missing"), tmp_path / "out", benchmark)
    config = default_config()
    config.model.path = assets["base"]
    claim_workdir(str(tmp_path / "starting"), config)
    with pytest.raises(InputError, match="has no checkpoint yet"):
        run_evaluate(str(tmp_path / "starting"), tmp_path / "out", benchmark)
    with pytest.raises(ValueError, match="--out is needed"):
        run_evaluate(assets["base"], None, benchmark)
