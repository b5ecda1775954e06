"""What the CLIs show on stderr: known-harmless library noise hidden unless ``--verbose``, and
``--no-progress`` hiding every bar (ours, transformers' weight loading, the HF hub's downloads)."""
from __future__ import annotations

import logging
import os
import warnings


def quiet_library_noise(verbose: bool) -> None:
    """Hide messages that say nothing about the user's run; ``verbose`` keeps them. Call it before
    bitsandbytes is imported (its note is logged at import)."""
    if verbose:
        return
    # Deprecation notices of the libraries' own internals (e.g. transformers' is_gradient_checkpointing):
    # nothing a user of this toolkit can act on. Our code raises no FutureWarning of its own.
    warnings.filterwarnings("ignore", category=FutureWarning)
    # "Failed to load CPU gemm_4bit_forward from kernels-community" is logged when bitsandbytes is
    # imported on a CPU without the optional `kernels` package; its fallback is correct.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def hide_progress_bars() -> None:
    """No bar anywhere: transformers' loading bars, the HF hub's and datasets' download bars."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars  # type: ignore[attr-defined]  # lazily exported

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
