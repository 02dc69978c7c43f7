"""The end-of-run summary shows what the run measured, and labels AdamW's figures as computed
(:func:`galorax.app.report.format_summary`)."""

from __future__ import annotations

import re
from typing import Any

from galorax.app.report import format_summary

MiB = 2**20


def _summary(optimizer: str = "galore", adamw: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``summary.json`` as :func:`galorax.app.summary.summarize` writes it."""
    return {
        "optimizer": optimizer,
        "preset": "tiny",
        "val_loss_start": 5.5,
        "val_loss": 2.125,
        "val_ppl": 8.37,
        "tokens_per_s": 741.0,
        "n_params": 1_234_567,
        "param_bytes": 4 * 1_234_567,
        "opt_state_bytes": 3 * MiB,
        "step_memory": {"peak": 48 * MiB},
        "adamw": adamw,
    }


REF = {"opt_state_bytes": 10 * MiB, "step_memory": {"peak": 80 * MiB}}


def _sections(text: str) -> list[list[str]]:
    return [block.splitlines() for block in text.split("\n\n")]


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_measured_figures_stand_alone_and_adamw_is_labelled_computed():
    measured, sizes, pointer = _sections(format_summary(_summary(adamw=REF)))
    assert measured[0].split() == ["measured", "galore"]  # no AdamW column: nothing measured
    assert [len(_cells(line)) for line in measured[2:]] == [2, 2, 2]  # no blank cells
    assert "5.5000 -> 2.1250" in measured[2] and "741" in measured[4]
    assert "adamw (computed, not trained)" in sizes[0]
    state = next(line for line in sizes if line.startswith("optimizer state"))
    assert "3.00 MiB (30% of AdamW)" in state and state.endswith("10.00 MiB")
    step = next(line for line in sizes if line.startswith("train step memory"))
    assert "(60% of AdamW)" in step and step.endswith("80.00 MiB")
    assert [len(_cells(line)) for line in sizes[2:]] == [3, 3, 3]  # every AdamW cell filled
    assert pointer == ["AdamW trained beside it, measured: galorax compare --preset tiny"]


def test_no_adamw_column_without_a_reference():
    text = format_summary(_summary(adamw=None))
    measured, sizes, pointer = _sections(text)
    assert _cells(sizes[0]) == ["sizes", "galore"] and "of AdamW" not in text
    assert [len(_cells(line)) for line in sizes[2:]] == [2, 2, 2]
    assert "galorax compare --preset tiny" in pointer[0]


def test_an_adamw_run_is_not_compared_with_itself():
    text = format_summary(_summary("adamw", adamw=REF))
    assert "computed" not in text and "of AdamW" not in text and "galorax compare" not in text
    assert _sections(text)[0][0].split() == ["measured", "adamw"]


def test_8bit_adamw_is_compared_with_computed_adamw():
    text = format_summary(_summary("adamw8bit", adamw=REF))
    assert "adamw (computed, not trained)" in text and "30% of AdamW" in text
