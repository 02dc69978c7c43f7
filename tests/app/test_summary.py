"""The end-of-run summary and plot show what the run measured, label AdamW's figures as
computed, and point to ``galorax compare`` for AdamW trained beside
(:func:`galorax.app.report.format_summary`, :func:`galorax.app.report.curves_figure`); the
comparison's plot draws AdamW's curves beside the others'
(:func:`galorax.app.compare_report.comparison_figure`)."""

from __future__ import annotations

import re
from typing import Any

import matplotlib.pyplot as plt
import pytest

from galorax.app.compare_report import comparison_figure, plot_comparison
from galorax.app.report import adamw_pointer, curves_figure, format_summary, plot_curves

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
    assert pointer == [
        "AdamW not trained here: `galorax compare --preset tiny` trains it beside, measured"
    ]


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


def _records(start: float, steps: int = 4) -> list[dict[str, Any]]:
    """``metrics.jsonl``'s records: a train loss per step, validation at 0 and the end."""
    recs: list[dict[str, Any]] = [{"step": 0, "val_loss": start}]
    recs += [{"step": i, "loss": start - 0.25 * i} for i in range(1, steps + 1)]
    return [*recs, {"step": steps, "val_loss": start - 0.25 * steps}]


@pytest.fixture
def figure():
    """Closes the figure a test made (a test that fails must not leak it)."""
    made = []
    yield made.append
    for fig in made:
        plt.close(fig)


def _legend(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_train_plot_labels_what_it_measured_and_points_to_compare(figure):
    fig = curves_figure({"galore": _records(5.0)}, "tiny (stdlib)")
    figure(fig)
    assert _legend(fig) == ["galore train (EMA)", "galore val"]  # no AdamW curve, none implied
    assert [t.get_text() for t in fig.texts] == [adamw_pointer()]
    assert "`galorax compare`" in adamw_pointer() and "not trained here" in adamw_pointer()


def test_train_plot_of_adamw_needs_no_pointer(figure):
    fig = curves_figure({"adamw": _records(5.0)})
    figure(fig)
    assert _legend(fig) == ["adamw train (EMA)", "adamw val"] and not fig.texts


def _result(label: str, lr: float, start: float) -> dict[str, Any]:
    """One run of ``galorax compare``'s sweep, as ``compare.py`` collects it."""
    summary = _summary(label) | {"val_loss": start - 1.0}
    return {"label": label, "lr": lr, "summary": summary, "metrics": _records(start)}


def test_compare_plot_draws_adamw_beside_galore(figure):
    results = [_result("adamw", 1e-3, 5.0), _result("galore", 1e-2, 4.5)]
    fig = comparison_figure(results, "galorax compare: tiny")
    figure(fig)
    assert _legend(fig) == ["adamw (lr 0.001) val", "galore (lr 0.01) val"]
    assert len(fig.axes[0].get_lines()) == 4  # each: a validation curve and a train EMA
    table = fig.axes[1].tables[0].get_celld()
    assert {table[r, 0].get_text().get_text() for r in (1, 2)} == {"adamw", "galore"}


def test_both_plots_write_a_png(tmp_path):
    plot_curves({"galore": _records(5.0)}, tmp_path / "loss_curve.png", "tiny")
    plot_comparison([_result("adamw", 1e-3, 5.0)], tmp_path / "compare.png", "compare")
    for name in ("loss_curve.png", "compare.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.get_fignums()  # both closed their figure
