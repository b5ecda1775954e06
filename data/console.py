"""What the CLIs show on stderr: known-harmless library noise hidden unless ``--verbose``, and
``--no-progress`` hiding every bar (ours, transformers' weight loading, the HF hub's downloads)."""
from __future__ import annotations

import logging
import os
import warnings


def quiet_library_noise(verbose: bool) -> None:
    """Hide warnings that say nothing about the user's run (FutureWarnings from transformers,
    bitsandbytes' note that its CPU build has no GPU gemm); ``verbose`` keeps them."""
    if verbose:
        return
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate)(\.|$)")
    # "Failed to load CPU gemm_4bit_forward from kernels-community" is logged when bitsandbytes is
    # imported on a CPU without the optional `kernels` package; its slower fallback is correct.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def hide_progress_bars() -> None:
    """No bar anywhere: transformers' loading bars, the HF hub's and datasets' download bars."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
