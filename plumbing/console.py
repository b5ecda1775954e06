"""What the CLIs show on stderr: known-harmless library noise hidden unless ``--verbose``, and
``--no-progress`` hiding every bar (ours, transformers' weight loading, the HF hub's downloads)."""

from __future__ import annotations

import logging
import os
import sys
import warnings


# What each hidden message is, and why it is harmless (``--verbose`` shows them all):
#  - torch's C++ warnings (TORCH_CPP_LOG_LEVEL), e.g. DDP's "find_unused_parameters=True was
#    specified ... but did not find any unused parameters", once per rank: the joint head's parts
#    can sit out a batch, so the flag must stay on even when a given batch used them all. They are
#    printed by torch's C++ logger, which reads its level once, when torch is imported.
#  - bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (logged at its
#    import on CPUs with AVX512-BF16): its own fallback kernel is correct.
#  - the HF hub's retry lines ("... thrown while requesting HEAD ...", "Retrying in 1s [Retry
#    1/5]"): the optional `kernels` package asks the hub for that kernel at bitsandbytes' import and
#    retries five times offline; a download that really fails still raises with its own message.
#  - the `kernels` package's own notes, e.g. "Skipping publisher trust check for
#    'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode"
#    (kernels >= 0.19, a dependency of transformers >= 5.25): the same optional CPU kernel; this
#    toolkit fetches no kernel itself.
#  - FutureWarnings of the libraries' own internals (e.g. transformers' is_gradient_checkpointing):
#    nothing a user of this toolkit can act on. Our code raises no FutureWarning of its own.
QUIET_LOGGERS = ("bitsandbytes", "huggingface_hub.utils._http", "kernels")
TORCH_CPP_LOG_LEVEL = "TORCH_CPP_LOG_LEVEL"


def quiet_library_noise(verbose: bool) -> None:
    """Hide messages that say nothing about the user's run; ``verbose`` keeps them. Call it before
    torch and bitsandbytes are imported (torch's C++ log level is read, and bitsandbytes' note is
    logged, at import). A level the user set in TORCH_CPP_LOG_LEVEL is kept."""
    if verbose:
        return
    os.environ.setdefault(TORCH_CPP_LOG_LEVEL, "ERROR")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*find_unused_parameters=True was specified")  # if routed to Python
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def hide_progress_bars() -> None:
    """No bar anywhere: transformers' loading bars, the HF hub's and datasets' download bars."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    # transformers takes its bars' setting from the hub's when it is imported; importing it here
    # only to switch them off would cost a load that never needs it (the standalone load) seconds.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
    try:
        from huggingface_hub.utils import disable_progress_bars  # type: ignore[attr-defined]  # lazily exported

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
