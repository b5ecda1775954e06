"""loss_curve.png as a user reads it (issue 23): LM and head losses on panels of their own scale,
no flat line where a loss had no data, a dot for a one-step run, integer step ticks, a title."""

from __future__ import annotations

import json

import numpy as np

from training.loss_plot import loss_figure, plot_losses


def rows_of(steps, relevance=0.0):
    """Log rows as the loop writes them; the domain stage logs relevance 0.0 (it has no labels)."""
    return [
        {
            "step": s,
            "epoch": 0,
            "lm": 9.0 - 0.01 * s,
            "align": 0.7 - 0.001 * s,
            "relevance": relevance,
            "loss": 9.4 - 0.01 * s,
            "lr": 1e-4,
        }
        for s in steps
    ]


def labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def drawn_lines(ax) -> dict[str, tuple[list, list]]:
    """Legend label -> (x, y) of each line that has points."""
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines if len(line.get_xdata())
    }


def integer_ticks(ax) -> bool:
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


def test_domain_stage_figure_separates_scales_and_drops_the_part_without_data():
    import matplotlib.pyplot as plt

    fig, drawn = loss_figure({"": rows_of(range(10, 130, 10))}, "Training losses: domain stage")
    try:
        lm_ax, head_ax = fig.axes
        assert fig._suptitle.get_text() == "Training losses: domain stage"
        assert lm_ax.get_title().startswith("language model") and head_ax.get_title().startswith("alignment head")
        assert set(drawn_lines(lm_ax)) == {"loss: total (weighted sum)", "lm: answer tokens (LM)"}
        assert set(drawn_lines(head_ax)) == {"align: alignment pairs"}  # no line for relevance...
        assert "relevance: no data (no relevance labels)" in labels(head_ax)  # ...but said in the legend
        assert drawn == ["loss", "lm", "align"]
        # each panel's scale is its own: the head panel's y range is about the BCE, not the LM loss
        assert head_ax.get_ylim()[1] < 1 < 7 < lm_ax.get_ylim()[0]
        assert integer_ticks(lm_ax) and integer_ticks(head_ax)
        assert head_ax.get_xlabel() == "optimizer step"
    finally:
        plt.close(fig)


def test_one_step_run_is_a_visible_point_on_an_integer_tick():
    import matplotlib.pyplot as plt

    fig, _ = loss_figure({"": rows_of([3], relevance=0.6)}, "Training losses: task stage")
    try:
        for ax in fig.axes:
            for line in ax.lines:
                if len(line.get_xdata()):
                    assert line.get_marker() == "o" and list(line.get_xdata()) == [3]
            lo, hi = ax.get_xlim()
            assert [t for t in ax.get_xticks() if lo <= t <= hi] == [3]
        assert "relevance: note-sentence relevance" in drawn_lines(fig.axes[1])
    finally:
        plt.close(fig)


def test_windows_without_head_data_leave_gaps_not_zeros():
    import matplotlib.pyplot as plt

    rows = rows_of(range(1, 7), relevance=0.5)
    for row in rows[2:4]:
        row["relevance"] = 0.0  # windows whose batches had no relevance labels
    fig, _ = loss_figure({"": rows}, "t")
    try:
        x, y = drawn_lines(fig.axes[1])["relevance: note-sentence relevance"]
        assert x == [1, 2, 5, 6] and 0.0 not in y
    finally:
        plt.close(fig)


def test_run_without_the_head_has_one_panel():
    import matplotlib.pyplot as plt

    rows = [{"step": s, "lm": 3.0, "loss": 3.0} for s in (1, 2)]
    fig, drawn = loss_figure({"": rows}, "t")
    try:
        assert len(fig.axes) == 1 and drawn == ["loss", "lm"]
    finally:
        plt.close(fig)


def test_folds_share_a_color_per_fold_and_a_panel_per_scale(tmp_path):
    import matplotlib.pyplot as plt

    runs = {"fold 1": rows_of([1, 2], 0.6), "fold 2": rows_of([1, 2], 0.5)}
    fig, drawn = loss_figure(runs, "cv", parts=("lm", "align", "relevance"))
    try:
        lm_ax, head_ax = fig.axes
        assert set(drawn_lines(lm_ax)) == {"fold 1: lm", "fold 2: lm"}
        assert set(drawn_lines(head_ax)) == {"fold 1: align", "fold 1: relevance", "fold 2: align", "fold 2: relevance"}
        color = {line.get_label(): line.get_color() for line in head_ax.lines}
        assert color["fold 1: align"] == color["fold 1: relevance"] != color["fold 2: align"]
    finally:
        plt.close(fig)


def test_plot_losses_writes_the_png(tmp_path):
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    log.write_text(
        "\n".join(json.dumps(r) for r in rows_of([1, 2, 3]))
        + "\n"
        + json.dumps({"step": 4, "epoch": 0, "diverged": "non-finite loss"})
        + "\n"
    )
    out = tmp_path / "loss_curve.png"
    assert plot_losses(log, out, "Training losses") == ["loss", "lm", "align"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(out)
    assert pixels.shape[0] > 500 and np.ptp(pixels[..., :3]) > 0  # two panels tall, not blank
