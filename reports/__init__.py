"""``report.html``: the one self-contained page a user opens to read a run case by case.

Below both ``inference`` and ``evaluation`` (each writes one) and above ``metrics`` (the
per-case scores are the official per-case terms). The page holds note text: it is the
user's local file and is never printed; nothing here logs.
"""
