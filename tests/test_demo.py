"""`make demo`'s comparison of pretrained and from-scratch finetuning (launcher/demo.py): the
paired standard error of the difference in accuracy, and the lines that say what it means.

The comparison on real runs (per-example scores against the trainer's accuracy, the learning-rate
pick) is in tests/test_finetune.py::test_pretrained_vs_scratch_at_equal_budget, which shares its
runs with the other finetuning tests.
"""

from __future__ import annotations

import math
import re

import pytest

from lmforge.launcher.demo import Z_CLEAR, comparison_lines, paired_difference

LINE = re.compile(
    r"^  pretrained - scratch  (?P<diff>[+-]\d+\.\d\d) ± (?P<se>\d+\.\d\d) points of accuracy "
    r"\(paired standard error over the same (?P<n>[\d,]+) reviews: (?P<pre>[\d,]+) right only "
    r"from pretrained, (?P<scratch>[\d,]+) only from scratch\)$"
)


def test_paired_difference_on_known_numbers():
    # differences 1, 0, 0, 1: mean 0.5, sample variance 1/3, SE sqrt(1/3 / 4)
    diff, se = paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert diff == 0.5 and se == pytest.approx(math.sqrt(1 / 12))
    # the same accuracies (0.6 vs 0.5) paired two ways: the SE follows the per-example
    # differences, not the two accuracies
    together = paired_difference([1] * 5 + [0] * 5, [1] * 5 + [0] * 5)
    assert together == (0.0, 0.0)
    a = [1] * 60 + [0] * 40
    agree = paired_difference(a, [1] * 50 + [0] * 50)  # scratch's right ones are a's too
    apart = paired_difference(a, [0] * 50 + [1] * 50)  # right on different examples
    assert agree[0] == pytest.approx(0.1) and apart[0] == pytest.approx(0.1)
    assert agree[1] == pytest.approx(math.sqrt((10 * 0.9**2 + 90 * 0.1**2) / 99 / 100))
    assert apart[1] > 3 * agree[1]
    assert comparison_lines([1, 0, 1], [1, 0, 1], "reviews")[1] == (
        "  => no difference: both models are right on exactly the same examples"
    )
    with pytest.raises(ValueError, match="same examples: 3 vs 2"):
        paired_difference([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="at least 2 examples, got 1"):
        paired_difference([1], [0])


@pytest.mark.parametrize(
    ("pretrained", "scratch", "verdict"),
    [
        # the demo's figures before learning rates were picked: 0.7466 vs 0.7610 on 1,247
        ([1] * 853 + [1] * 78 + [0] * 96 + [0] * 220, [1] * 853 + [0] * 78 + [1] * 96 + [0] * 220,
         "within noise"),
        ([1] * 700 + [1] * 120 + [0] * 40 + [0] * 140, [1] * 700 + [0] * 120 + [1] * 40 + [0] * 140,
         "helps"),
        ([1] * 700 + [1] * 40 + [0] * 120 + [0] * 140, [1] * 700 + [0] * 40 + [1] * 120 + [0] * 140,
         "hurts"),
    ],
    ids=["within-noise", "helps", "hurts"],
)  # fmt: skip
def test_comparison_lines_say_the_difference_and_what_it_means(pretrained, scratch, verdict):
    first, meaning = comparison_lines(pretrained, scratch, "reviews")
    m = LINE.match(first)
    assert m, first
    diff, se = paired_difference(pretrained, scratch)
    assert float(m["diff"]) == pytest.approx(100 * diff, abs=0.005)
    assert float(m["se"]) == pytest.approx(100 * se, abs=0.005)
    only_pre = sum(p > s for p, s in zip(pretrained, scratch, strict=True))
    only_scratch = sum(s > p for p, s in zip(pretrained, scratch, strict=True))
    assert (m["n"], m["pre"], m["scratch"]) == (
        f"{len(pretrained):,}",
        f"{only_pre:,}",
        f"{only_scratch:,}",
    )
    z = abs(diff) / se
    if verdict == "within noise":
        assert z < Z_CLEAR
        assert meaning == (
            f"  => the difference is within noise ({z:.1f} standard errors, under 2): this test "
            "split does not show pretraining helping or hurting"
        )
    else:
        assert z >= Z_CLEAR
        assert meaning == (
            f"  => pretraining {verdict} by {100 * abs(diff):.2f} ± {100 * se:.2f} points "
            f"({z:.1f} standard errors from no difference)"
        )
