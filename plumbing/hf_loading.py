"""The keywords every model load passes to ``from_pretrained``: the model's code stays what is installed."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

# transformers reads ``use_kernels`` from 4.54 on; older versions would hand it to the model's config.
FIRST_WITH_KERNELS_SWITCH = (4, 54)


def _release(text: str) -> tuple[int, ...]:
    """The leading numbers of a version ("5.25.0rc1" -> (5, 25, 0))."""
    parts = []
    for piece in text.split(".")[:3]:
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def local_code_only(transformers_version: str | None = None) -> dict[str, bool]:
    """``trust_remote_code=False``, and ``use_kernels=False`` where transformers knows it.

    From 5.25 on, transformers swaps layers' forwards at load time for kernels it downloads from
    the Hub (``kernels`` package) unless told not to: code nobody here has read, fetched where
    clinical data sits, missing offline, and numerics our fused-kernel probes never checked."""
    if transformers_version is None:
        try:
            transformers_version = version("transformers")
        except PackageNotFoundError:
            transformers_version = "0"
    kwargs = {"trust_remote_code": False}
    if _release(transformers_version) >= FIRST_WITH_KERNELS_SWITCH:
        kwargs["use_kernels"] = False
    return kwargs
