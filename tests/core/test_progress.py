"""A passing progress bar in a log (no terminal) ends its line, so the next message is not glued to it."""

from __future__ import annotations

import sys

from mmadapter.core.progress import passing_bar


def test_a_bar_written_to_a_log_leaves_the_next_message_on_its_own_line(capsys):
    assert list(passing_bar(range(3), desc="reading rows.jsonl")) == [0, 1, 2]
    print("error: rows.jsonl:2: not JSON", file=sys.stderr)
    log = capsys.readouterr().err  # pytest's stderr is not a terminal
    assert "reading rows.jsonl: 3it" in log or "reading rows.jsonl: 100%" in log
    assert "\nerror: rows.jsonl:2: not JSON" in log
