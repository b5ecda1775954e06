"""Honest evaluation: case-grouped cross-validation, the baseline ladder, error reports, plots.

Every number this package reports comes from cases that the scored system neither
trained nor tuned on (unless the user explicitly allows otherwise, and then every
output says so). Named ``evaluation`` rather than ``evaluate`` so that it does not
shadow the Hugging Face package of that name.
"""
