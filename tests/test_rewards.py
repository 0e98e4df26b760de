r"""The verifiable reward of the paper's recipe and the worker pool that grades it.

Expected accuracies are derived by hand from the reference (VPPO-RL's
examples/reward_function/math.py on mathruler 0.1.0's grader); each case says which rule
of the grader decides it.

The pool's workers import this module to find the test rewards below: JAX, which the pool
must tolerate in its caller, is imported inside the tests so that they start quickly.
"""

import os
import time

import numpy as np
import psutil
import pytest

from vppo_jax.rollout import rewards
from vppo_jax.rollout.rewards.accuracy import accuracy, strip_space_around_tag_marks

SHORT_TIMEOUT_S = 2.0
GENEROUS_TIMEOUT_S = 60.0  # for tests that are not about timeouts, on a loaded 2-core CPU

ACCURACY_CASES = [
    # response, ground truth, reward: the rule that decides it
    ("<think>6 times 7</think> \\boxed{42}", "42", 1.0),  # identical after normalisation
    ("\\boxed{41}", "42", 0.0),
    ("\\boxed{42.0}", "42", 1.0),  # integer-valued floats are written as integers
    ("\\boxed{1,000}", "1000", 1.0),  # thousands separators go for integers
    ("\\boxed{\\frac{4}{2}}", "2", 0.0),  # integer truth: the answer must look like an integer
    ("\\boxed{30^\\circ}", "30", 1.0),  # degrees dropped
    ("\\boxed{5 cm}", "5", 1.0),  # units dropped
    # fractions
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),  # the MATH normaliser maps exactly "0.5" to \frac{1}{2}
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.25}", "\\frac{1}{4}", 1.0),  # sympy: 1/4 - 0.25 == 0
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),  # integer a/b is rewritten as \frac{a}{b}
    ("\\boxed{2/4}", "\\frac{1}{2}", 0.0),  # two fractions must be identical: no reducing
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    # LaTeX forms
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),  # dfrac -> frac
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", 1.0),  # sympy: sqrt(2)/2 = 1/sqrt(2)
    ("\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{\\sqrt{3}}{2}", 0.0),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", 1.0),  # \left, \right and spaces dropped
    ("\\boxed{(2,1)}", "(1,2)", 0.0),  # tuples compare element by element, in order
    # the reference's \frac{a}{b} -> "a/b" has no parentheses: 1/x+1 on both sides
    ("\\boxed{\\frac{1}{x+1}}", "\\frac{1}{x}+1", 1.0),
    # multiple choice
    ("\\boxed{B}", "B", 1.0),
    ("\\boxed{b}", "B", 1.0),  # text answers are compared in lower case
    ("\\boxed{\\text{B}}", "B", 1.0),  # an enclosing \text{} is dropped
    ("\\boxed{(B)}", "B", 1.0),  # "(b)" is a 1-tuple whose element sympy finds equal to b
    ("\\boxed{C}", "B", 0.0),
    # which \boxed{}
    ("\\boxed{\\{1, 2\\}}", "\\{1,2\\}", 1.0),  # nested (escaped) braces stay in the content
    ("\\boxed{1} no, \\boxed{2}", "2", 1.0),  # the last \boxed{} counts
    ("\\boxed{1} no, \\boxed{2}", "1", 0.0),
    ("\\boxed{1} no, \\boxed{2", "1", 0.0),  # the last one is unclosed: the answer is "None"
    ("The answer is 42.", "42", 0.0),  # no \boxed{}: the answer is "None"
    ("The answer is \\boxed {42}.", "42", 0.0),  # "\boxed {" is not "\boxed{"
    ("I cannot tell.", "None", 1.0),  # ... and "None" is graded like any answer
    ("\\boxed{}", "42", 0.0),
    # spaced tags and marks; mathruler drops spaces itself, so the reference's stripping of
    # whitespace around < > / (for its format check) does not decide these
    ("< think >x is small</ think >\n\\boxed{x < 3}", "x<3", 1.0),
    ("\\boxed{1 / 2}", "\\frac{1}{2}", 1.0),
]


@pytest.mark.parametrize("response, answer, expected", ACCURACY_CASES)
def test_accuracy_grades_like_the_reference(response, answer, expected):
    assert accuracy(response, answer) == expected


def test_whitespace_around_angle_brackets_and_slashes_is_stripped():
    response = "< think >\n a / b\t< / think >  \\boxed{ x  >  3 }"
    assert strip_space_around_tag_marks(response) == "<think>a/b</think>\\boxed{ x>3 }"


def test_shared_pool_grades_a_batch_like_the_function():
    responses, answers, expected = zip(*ACCURACY_CASES)
    scores, stats = rewards.score_responses(list(responses), list(answers), "accuracy", timeout_s=GENEROUS_TIMEOUT_S)
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, expected)
    assert stats == {"timeouts": 0, "errors": 0}


# ---------------------------------------------------------------- test rewards for the pool
# Module-level, so that the workers can import them.


@rewards.register("test_hangs_on_hang")
def hangs_on_hang(response, answer):
    while response == "hang":
        time.sleep(1)
    return float(response == answer)


@rewards.register("test_raises_on_raise")
def raises_on_raise(response, answer):
    if response == "raise":
        raise ZeroDivisionError("as asked")
    return float(response == answer)


@rewards.register("test_exits_on_exit")
def exits_on_exit(response, answer):
    if response == "exit":
        os._exit(3)  # the worker process dies without a word
    return float(response == answer)


def _spawned_children():
    """pids of this process's worker processes (not the resource tracker); none is a zombie."""
    children = psutil.Process().children()
    assert not [child for child in children if child.status() == psutil.STATUS_ZOMBIE]
    return {child.pid for child in children if "spawn_main" in " ".join(child.cmdline())}


def _start_jax():
    """JAX imported and its backend running in this process, as in the trainer."""
    import jax.numpy as jnp

    jnp.ones(3).sum().block_until_ready()


@pytest.fixture(scope="module")
def pool():
    """One pool for the tests below, which switch rewards on it as a run's batches would."""
    _start_jax()
    with rewards.RewardPool(workers=2) as pool:
        yield pool


def test_a_hung_grader_times_out_and_the_pool_goes_on():
    _start_jax()
    others = _spawned_children()  # e.g. the shared pool's workers
    pool = rewards.RewardPool(workers=2)
    # The pool's own record: right after start() a child may not have exec'd spawn_main yet,
    # so its command line cannot identify it.
    pool_pids = lambda: {worker.process.pid for worker in pool._workers}
    started_with = pool_pids()
    scores, stats = pool.score_responses(
        ["a", "hang", "b", "c"], ["a", "hang", "b", "x"], "test_hangs_on_hang", timeout_s=SHORT_TIMEOUT_S
    )
    np.testing.assert_array_equal(scores, [1, 0, 1, 0])
    assert stats == {"timeouts": 1, "errors": 0}

    workers = pool_pids()
    (hung,) = started_with - workers
    assert len(workers) == 2 and not psutil.pid_exists(hung)  # killed, reaped, replaced

    scores, stats = pool.score_responses(
        ["a", "b", "c"], ["a", "b", "c"], "test_hangs_on_hang", timeout_s=GENEROUS_TIMEOUT_S
    )
    np.testing.assert_array_equal(scores, [1, 1, 1])
    assert stats == {"timeouts": 0, "errors": 0}

    pool.close()
    assert _spawned_children() == others
    with pytest.raises(RuntimeError, match="closed"):
        pool.score_responses(["a"], ["a"], "test_hangs_on_hang")


def test_an_answer_that_hangs_sympy_times_out(pool):
    # mathruler hands "(1/2)-(10000000!)" to sympy, which computes the factorial: minutes.
    scores, stats = pool.score_responses(
        ["\\boxed{10000000!}", "\\boxed{42}"], ["\\frac{1}{2}", "42"], "accuracy", timeout_s=SHORT_TIMEOUT_S
    )
    np.testing.assert_array_equal(scores, [0, 1])
    assert stats == {"timeouts": 1, "errors": 0}


def test_a_raising_grader_scores_zero_and_counts_as_an_error(pool):
    scores, stats = pool.score_responses(
        ["raise", "a", "raise", "b"], ["raise", "a", "raise", "x"], "test_raises_on_raise", timeout_s=GENEROUS_TIMEOUT_S
    )
    np.testing.assert_array_equal(scores, [0, 1, 0, 0])
    assert stats == {"timeouts": 0, "errors": 2}


def test_a_grader_that_kills_its_worker_scores_zero_and_the_pool_goes_on(pool):
    scores, stats = pool.score_responses(
        ["exit", "a", "b"], ["exit", "a", "b"], "test_exits_on_exit", timeout_s=GENEROUS_TIMEOUT_S
    )
    np.testing.assert_array_equal(scores, [0, 1, 1])
    assert stats == {"timeouts": 0, "errors": 1}
    scores, stats = pool.score_responses(["exit", "a"], ["x", "a"], "test_exits_on_exit", timeout_s=GENEROUS_TIMEOUT_S)
    np.testing.assert_array_equal(scores, [0, 1])
    assert stats == {"timeouts": 0, "errors": 1}


def test_an_empty_batch_scores_nothing(pool):
    scores, stats = pool.score_responses([], [], "accuracy")
    assert scores.shape == (0,) and scores.dtype == np.float32
    assert stats == {"timeouts": 0, "errors": 0}


# ---------------------------------------------------------------- the registry


def test_unknown_reward_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown reward 'acuracy'; registered: accuracy, "):
        rewards.get_reward("acuracy")


def test_a_reward_is_found_by_module_path():
    assert rewards.get_reward("vppo_jax.rollout.rewards.accuracy:accuracy") is accuracy


def test_rewards_must_be_module_level_functions():
    with pytest.raises(TypeError, match="not a module-level function"):
        rewards.register("test_lambda")(lambda response, answer: 1.0)


def test_a_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("accuracy")(raises_on_raise)
