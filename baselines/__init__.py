"""Retrieval baselines (no fine-tuned model needed).

Subtask 4 scorers share one protocol, :class:`baselines.aligners.Aligner`
(``score(case) -> [n_answer, n_note]``); :func:`baselines.linking.link_pairs` turns any
score matrix into links (absolute or relative threshold, per-answer cap, top-1
fallback). :mod:`baselines.ensemble` holds the weighted ensemble's settings
(:class:`EnsembleConfig`, a small JSON file) and their grid-search tuning
(:func:`fit_ensemble`); :mod:`baselines.crossval` gives case-grouped folds for honest
held-out numbers; :mod:`baselines.fit` is the tuning CLI
(``python -m baselines.fit --xml X --key K --out ensemble.json [--cross-encoder]``).
:mod:`baselines.extractive` is the Subtask 3 baseline.
"""
