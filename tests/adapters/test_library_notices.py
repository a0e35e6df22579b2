"""Notices libraries log that an mmadapter user cannot act on stay out of the log; everything else passes."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from mmadapter.adapters.library_notices import DROPPED_NOTICES


@pytest.mark.parametrize(("logger_name", "prefix"), DROPPED_NOTICES)
def test_a_dropped_notice_reaches_no_handler_and_other_records_pass(caplog, logger_name, prefix):
    log = logging.getLogger(logger_name)
    with caplog.at_level(logging.WARNING):
        log.warning(prefix + " and the rest of the notice")
        log.warning("something else from the same library")
    assert [r.getMessage() for r in caplog.records] == ["something else from the same library"]


def test_filters_are_in_place_before_peft_imports_bitsandbytes():
    """bitsandbytes logs its `kernels` notice while it is imported (peft imports it): importing mmadapter's
    adapters first must already drop it, whatever this CPU is (the notice itself appears only with AVX512-BF16)."""
    script = (
        "import logging\n"
        "import mmadapter.adapters\n"
        "from mmadapter.adapters.library_notices import DropNotice\n"
        "names = [n for n, _ in mmadapter.adapters.library_notices.DROPPED_NOTICES]\n"
        "assert all(any(isinstance(f, DropNotice) for f in logging.getLogger(n).filters) for n in names)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "gemm_4bit_forward" not in done.stderr
