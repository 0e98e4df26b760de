"""avg@k and pass@k of a policy on benchmark files, at the paper's evaluation settings.

    python -m vppo_jax.eval --checkpoint=runs/vppo_7b --data mathverse.parquet dynamath.parquet
    python -m vppo_jax.eval --checkpoint=runs/vppo_7b --data=mathverse.parquet,dynamath.parquet
    python -m vppo_jax.eval --checkpoint=Qwen/Qwen2.5-VL-7B-Instruct --data mathverse.parquet --out=results/base --k=8

--data takes the benchmark files as a comma-separated list or as the words that follow it
(a shell glob: --data data/benchmarks/*.parquet).

--checkpoint is one of
- a training run's workdir (config.json + checkpoints/): its latest checkpoint (or --step),
  with the run's own prompt length, image budget, response length and reward; or one of its
  checkpoint directories (WORKDIR/checkpoints/STEP), the same as --step=STEP;
- an HF directory (or Hugging Face Hub name) or a scripts/convert_hf_to_jax.py checkpoint:
  with the paper recipe's settings (vppo_jax/trainer/config.py).
Any of these, the benchmark files and --out may be in a bucket (gs://...); a benchmark file
may also be ORG/NAME/FILE, a file of a Hub dataset.
Every problem gets k responses sampled at temperature 1.0, top-p 1.0 (the paper's evaluation). Per
benchmark file (parquet or JSON lines with problem/answer/images columns, names settable):
avg@k, the mean accuracy over all k x N responses (the paper's metric), and pass@k, the
share of problems with at least one correct response. The average is the unweighted mean
over benchmarks, as in the paper's Avg column. Examples the data pipeline cannot use (bad
image, prompt too long, ...) are left out and counted in the summary.

Bad input (a path that is no checkpoint, a step the run has no checkpoint of, a benchmark
file without usable problems) is one error line and exit status 2 (--debug adds the traceback).

Writes OUT/<benchmark>.jsonl (one line per problem: index, answer, responses, rewards) and
OUT/summary.json (OUT defaults to WORKDIR/evaluation for a run, where the sweep aggregator
finds it), and prints the results as a markdown table. The evaluation itself:
vppo_jax/eval/benchmarks.py.
"""

import functools

from absl import flags, logging

from vppo_jax.eval.benchmarks import EVALUATION_DIR, EvalOptions, evaluate
from vppo_jax.io.cli import parse_flags, run_program

FLAGS = flags.FLAGS


def define_flags():
    """Only when run as the program: the reward workers, spawned, re-import this module."""
    flags.DEFINE_string("checkpoint", None, "A run's workdir, HF directory (or Hub name) or converted checkpoint.")
    flags.DEFINE_list("data", None, "Benchmark files (.parquet, .jsonl): comma-separated, or the words after --data.")
    flags.DEFINE_string(
        "out",
        None,
        "Directory for summary.json and the per-problem <benchmark>.jsonl (default "
        f"with a run's workdir: WORKDIR/{EVALUATION_DIR}).",
    )
    flags.DEFINE_integer("k", 8, "Responses per problem.")
    flags.DEFINE_integer("step", None, "With a run's workdir: its checkpoint (default latest).")
    flags.DEFINE_string("problem_key", None, "Column of the problem text (default: problem).")
    flags.DEFINE_string("answer_key", None, "Column of the reference answer (default: answer).")
    flags.DEFINE_string("images_key", None, "Column of the image list (default: images).")
    flags.DEFINE_integer("max_new_tokens", None, "Default: the run's, or the recipe's 2048.")
    flags.DEFINE_string("reward", None, "Registered reward name (default: the run's, or accuracy).")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Default: the run's, or bfloat16.")
    flags.DEFINE_integer("max_examples", 0, "First N usable problems per file (0: all).")
    flags.DEFINE_integer("batch_prompts", 16, "Problems sampled together.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.mark_flags_as_required(["checkpoint"])


def benchmark_files(data: list[str] | None, words: list[str]) -> list[str]:
    """--data's files and the words absl left over (the rest of `--data a.parquet b.parquet`);
    raises ValueError without --data, or with none given."""
    if data is None:
        if words:
            raise ValueError(
                f"unexpected argument(s) {' '.join(words)}: benchmark files go after --data "
                "(--data a.parquet b.parquet, or --data=a.parquet,b.parquet)"
            )
        raise ValueError("--data is required: the benchmark files (--data a.parquet b.parquet)")
    files = [*data, *words]
    if not files:
        raise ValueError("--data names no benchmark file")
    return files


def main(argv):
    logging.set_verbosity(logging.WARNING)  # as before absl: INFO logs of orbax, JAX, ... stay hidden
    evaluate(
        EvalOptions(
            checkpoint=FLAGS.checkpoint,
            data=tuple(argv[1:]),
            out=FLAGS.out,
            k=FLAGS.k,
            step=FLAGS.step,
            problem_key=FLAGS.problem_key,
            answer_key=FLAGS.answer_key,
            images_key=FLAGS.images_key,
            max_new_tokens=FLAGS.max_new_tokens,
            reward=FLAGS.reward,
            dtype=FLAGS.dtype,
            max_examples=FLAGS.max_examples,
            batch_prompts=FLAGS.batch_prompts,
            seed=FLAGS.seed,
        )
    )


if __name__ == "__main__":  # the reward workers are spawned: they re-import this module
    define_flags()
    run_program(
        main, flags_parser=functools.partial(parse_flags, arguments=lambda words: benchmark_files(FLAGS.data, words))
    )
