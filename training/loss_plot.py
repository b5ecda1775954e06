"""Loss curves from ``log.jsonl``: a run's ``loss_curve.png`` (and ``score.py cv``'s per-fold curves).

The LM loss (~2-12 nats per answer token) and the head's BCE losses (~0.1-1) get a panel each, so
neither flattens the other. A head loss of exactly 0.0 is the zero-weighted term of a logging window
without data for it (no citations, no relevance labels: the domain stage has no relevance labels),
not a measurement: such points are left out, and a part without any is named in its panel as having
no data instead of being drawn as a flat line at zero. Few points get markers (a one-step run is a
visible dot), steps are integer ticks, and the figure has a title.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

LOSS_PARTS = {
    "loss": "total (weighted sum)",
    "lm": "answer tokens (LM)",
    "align": "alignment pairs",
    "relevance": "note-sentence relevance",
}
HEAD_PARTS = ("align", "relevance")
NO_DATA = {"align": "no cited answer sentences", "relevance": "no relevance labels"}
PANELS = (("language model: loss per answer token", ("loss", "lm")), ("alignment head: BCE losses", HEAD_PARTS))
MARKERS_UP_TO = 50  # points per line; longer runs are plain lines


def read_log_rows(log_path: Path) -> list[dict]:
    """The logged training rows (a ``diverged`` record has no losses and is left out)."""
    if not Path(log_path).is_file():
        return []
    rows = [json.loads(line) for line in Path(log_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "step" in r and "loss" in r]


def loss_points(rows: Sequence[dict], part: str) -> tuple[list[int], list[float]]:
    """Steps and values where ``part`` was measured (see the module docstring for head losses)."""
    kept = [
        (r["step"], r[part]) for r in rows if r.get(part) is not None and not (part in HEAD_PARTS and r[part] == 0.0)
    ]
    return [s for s, _ in kept], [v for _, v in kept]


def loss_figure(runs: Mapping[str, Sequence[dict]], title: str, parts: Sequence[str] = tuple(LOSS_PARTS)):
    """A matplotlib Figure: one panel per scale (LM, head), one line per run and part; returns
    (figure, the parts drawn, in panel order). ``runs``: label -> log rows ('' for a single run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    points = {(label, part): loss_points(rows, part) for label, rows in runs.items() for part in parts}
    has_head = any(points[(label, p)][0] for label in runs for p in HEAD_PARTS if p in parts)
    panels = [
        (name, [p for p in members if p in parts]) for name, members in PANELS if has_head or members != HEAD_PARTS
    ]  # a run without the head: the LM panel only
    panels = [(name, members) for name, members in panels if members]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(7, 3.2 * len(panels) + 0.8), squeeze=False)
    drawn: list[str] = []
    for ax, (panel, members) in zip(axes[:, 0], panels):
        for i, label in enumerate(runs):
            for j, part in enumerate(members):
                steps, values = points[(label, part)]
                if not steps:
                    continue
                style = dict(color=f"C{i}", linestyle=("-", "--")[j % 2]) if len(runs) > 1 else dict(color=f"C{j}")
                ax.plot(
                    steps,
                    values,
                    label=f"{label}: {part}" if label else f"{part}: {LOSS_PARTS[part]}",
                    marker="o" if len(steps) <= MARKERS_UP_TO else None,
                    markersize=4,
                    **style,
                )
                if part not in drawn:
                    drawn.append(part)
        for part in members:  # said in the legend, never drawn as a line at zero
            if part in HEAD_PARTS and not any(points[(label, part)][0] for label in runs):
                ax.plot([], [], linestyle="none", label=f"{part}: no data ({NO_DATA[part]})")
        ax.set_title(panel, fontsize=9)
        ax.set_ylabel("loss (window mean)", fontsize=8)
        # integer steps, also for a one-step run (a single integer in view is enough)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1, steps=[1, 2, 5, 10]))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig, drawn


def plot_losses(log_path: Path, out_png: Path, title: str | None = None) -> list[str]:
    """``loss_curve.png`` of one run from its ``log.jsonl``; returns the parts drawn (for tests)."""
    import matplotlib.pyplot as plt

    rows = read_log_rows(log_path)
    if not rows:
        return []
    fig, drawn = loss_figure({"": rows}, title or f"Training losses: {Path(log_path).parent.name}")
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return drawn
