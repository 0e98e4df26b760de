r"""The paper's reward: binary accuracy of the last \boxed{} in a response.

A port of the reference, VPPO-RL's examples/reward_function/math.py, function
`compute_score_wo_format` (EasyR1's math reward without its format term):

    response = re.sub(r"\s*(<|>|/)\s*", r"\1", response)  # "handle qwen2.5vl-32b format"
    accuracy = 1.0 if grade_answer(extract_boxed_content(response), ground_truth) else 0.0

with `extract_boxed_content` and `grade_answer` from mathruler.grader (mathruler 0.1.0).
Only the response is stripped, never the ground truth. The stripping serves the reference's
format check (dropped here, as in the paper's recipe); since mathruler removes spaces itself, it
changes accuracy only in contrived answers, but we keep it to grade exactly as the reference.
We keep mathruler's behaviour as it is, quirks included, so rewards match the reference's:
- the LAST "\boxed{" is taken (rfind); if its braces never close (a truncated response)
  the answer is the string "None", even when an earlier \boxed{} is complete;
- no "\boxed{" at all (also "\boxed {") gives the string "None" too, which is graded like
  any answer: it scores 1 against a ground truth "None" (case-insensitive);
- an integer ground truth needs an integer-looking answer ("\frac{4}{2}" vs "2" scores 0),
  and two fractions a/b must be identical ("2/4" vs "\frac{1}{2}" scores 0);
- \frac{a}{b} becomes the text "a/b" without parentheses before sympy compares, so
  "\frac{1}{x+1}" and "\frac{1}{x}+1" grade as equal;
- sympy can run for minutes on adversarial answers ("\boxed{10000000!}"), which is why rewards
  run in worker processes with a time limit (pool.py).
"""

import re

from mathruler.grader import extract_boxed_content, grade_answer

from vppo_jax.rollout.rewards.registry import register

_SPACE_AROUND_TAG_MARKS = re.compile(r"\s*(<|>|/)\s*")


def strip_space_around_tag_marks(response):
    """ "< /think >" -> "</think>": the reference's fix for Qwen2.5-VL-32B's spaced tags."""
    return _SPACE_AROUND_TAG_MARKS.sub(r"\1", response)


@register("accuracy")
def accuracy(response, answer):
    boxed = extract_boxed_content(strip_space_around_tag_marks(response))
    return 1.0 if grade_answer(boxed, answer) else 0.0
