"""Train several recipes in one multi-process launch (saves the start-up time per recipe).

torchrun --standalone --nproc_per_node 2 tests/train/ddp_driver.py A.yaml B.yaml
"""

import sys

from accelerate import PartialState

from mmadapter.train.loop import train
from mmadapter.train.recipe import load_recipe

if __name__ == "__main__":
    for recipe in sys.argv[1:]:
        train(load_recipe(recipe))
    PartialState().destroy_process_group()
