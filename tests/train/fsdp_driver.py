"""Run several `mmadapter train` command lines in one multi-process launch (saves the start-up time per run).

torchrun --standalone --nproc_per_node 2 tests/train/fsdp_driver.py train A.yaml -- train --resume RUN

The CLI ends the process group after its run; here it stays for the next command and ends at the end.

With MMADAPTER_TEST_KILL_AT=<a checkpoint's temporary folder> the main process kills itself with SIGKILL
while that checkpoint is half written (its optimizer shards are on disk, the adapter is not).
"""

import os
import signal
import sys

from accelerate import PartialState

import mmadapter.train.checkpointing as checkpointing
from mmadapter.cli.main import main

KILL_AT = os.environ.get("MMADAPTER_TEST_KILL_AT")
_save_adapter = checkpointing.save_adapter


def save_adapter(model, directory, **kwargs):
    if str(directory) == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return _save_adapter(model, directory, **kwargs)


if __name__ == "__main__":
    checkpointing.save_adapter = save_adapter
    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    commands, current = [], []
    for arg in sys.argv[1:]:
        if arg == "--":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    for command in [*commands, current]:
        if main(command) != 0:
            sys.exit(1)
    destroy(PartialState())
