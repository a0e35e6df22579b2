"""Notices that libraries log by themselves and that tell an mmadapter user nothing they can act on, kept out
of the log. Each is dropped by a filter on the library's own logger (every other record passes); the package
imports this module first, because bitsandbytes logs one of them while peft imports it."""

from __future__ import annotations

import logging

#: (logger, start of the message) of each dropped notice, and why.
DROPPED_NOTICES = (
    # LLM.int8 computes in fp16 by design, and says so at every matmul whose input is not fp16 (every one on a
    # bf16 or fp32 base).
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast"),
    # On CPUs with AVX512-BF16, bitsandbytes asks at import for the `kernels` package, which downloads a 4-bit
    # matmul from the Hugging Face Hub at run time; without it bitsandbytes uses its own CPU kernel.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    # mmadapter checks every length against the model's context itself (training: data.max_length; serving: the
    # prompt-token limit, a 400 before any model work) and counts a long prompt piece by piece on purpose; the
    # tokenizer's warning that a text is longer than model_max_length then reads as an error that did not happen.
    ("transformers.tokenization_utils_base", "Token indices sequence length is longer than the specified maximum"),
)


class DropNotice(logging.Filter):
    """Drops the records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def drop_library_notices() -> None:
    """Install the filters once (a logger made here is the one the library gets when it imports later)."""
    for logger_name, prefix in DROPPED_NOTICES:
        log = logging.getLogger(logger_name)
        if not any(isinstance(f, DropNotice) and f.prefix == prefix for f in log.filters):
            log.addFilter(DropNotice(prefix))


drop_library_notices()
