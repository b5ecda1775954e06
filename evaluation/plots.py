"""PNG plots of a cross-validation run (matplotlib, Agg backend; nothing is shown).

* ``pr_curve.png``: precision-recall of the head's link probabilities and the
  ensemble's scores over all held-out (answer, note) pairs, with each system's actual
  operating point (the thresholds chosen on training folds).
* ``f1_vs_threshold.png``: held-out pair F1 against an absolute threshold on those
  scores, with the thresholds the folds chose marked. Diagnostic only: nothing is
  tuned on it.
* ``loss_curves.png``: training losses per fold from each fold's ``RUN/log.jsonl`` (LM and head
  losses on panels of their own scale).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, out_png: Path, title: str, legend: bool = True) -> None:
    """The style every plot here shares: small title and legend, light grid; written, then closed."""
    ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def pooled_pairs(scores: Mapping[str, np.ndarray], golds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Flattened scores and 0/1 labels over all cases' pairs (case order of ``golds``)."""
    s = [np.asarray(scores[c], dtype=np.float64).ravel() for c in golds]
    g = [np.asarray(golds[c], dtype=bool).ravel() for c in golds]
    return (np.concatenate(s) if s else np.zeros(0)), (np.concatenate(g) if g else np.zeros(0, dtype=bool))


def f1_curve(scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    out = []
    n_gold = labels.sum()
    for t in thresholds:
        hit = scores >= t
        tp = (hit & labels).sum()
        out.append(0.0 if tp == 0 else 2 * tp / (hit.sum() + n_gold))
    return np.asarray(out)


def plot_pr(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    points: Mapping[str, tuple[float, float]],
    out_png: Path,
    title: str,
) -> None:
    """``curves``: system -> (scores, labels) of held-out pairs; ``points``: system -> (recall, precision)."""
    from sklearn.metrics import precision_recall_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (scores, labels) in curves.items():
        if labels.any():
            precision, recall, _ = precision_recall_curve(labels, scores)
            ax.plot(recall, precision, label=f"{name} (held-out pairs)")
        if name in points:
            r, p = points[name]
            ax.plot([r], [p], marker="o", linestyle="none", label=f"{name} operating point")
    base = next((labels.mean() for _, labels in curves.values() if labels.size), None)
    if base is not None:
        ax.axhline(base, color="grey", linestyle=":", label="chance (gold rate)")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    _finish(plt, fig, ax, out_png, title)


def plot_f1_vs_threshold(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    chosen: Mapping[str, Sequence[float]],
    out_png: Path,
    title: str,
) -> None:
    """Held-out F1 against an absolute threshold; ``chosen``: system -> thresholds the folds picked (absolute)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    grid = np.linspace(0, 1, 101)
    for name, (scores, labels) in curves.items():
        (line,) = ax.plot(grid, 100 * f1_curve(scores, labels, grid), label=f"{name}")
        for t in chosen.get(name, []):
            ax.axvline(t, color=line.get_color(), linestyle="--", alpha=0.5)
    ax.set_xlabel("threshold on the system's score (dashed: chosen on training folds)")
    ax.set_ylabel("held-out pair F1 (x100)")
    _finish(plt, fig, ax, out_png, title)


def plot_losses(logs: Mapping[str, Path], out_png: Path, title: str) -> None:
    """Per fold (``logs``: fold label -> RUN/log.jsonl) the LM loss and, on a panel of its own
    scale, the head's losses (:func:`training.loss_plot.loss_figure`)."""
    from training.loss_plot import loss_figure, read_log_rows

    plt = _pyplot()
    runs = {label: rows for label, path in logs.items() if (rows := read_log_rows(path))}
    if not runs:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.text(0.5, 0.5, "no training logs (head not trained)", ha="center", va="center", transform=ax.transAxes)
        _finish(plt, fig, ax, out_png, title, legend=False)
        return
    fig, _ = loss_figure(runs, title, parts=("lm", "align", "relevance"))
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
