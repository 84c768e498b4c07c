"""gpt1.train with a NaN loss on rank 0 at the optimizer steps listed in GPT1_TEST_NAN_STEPS (1-based, for
gradient accumulation 1): the fault the non-finite guard's tests inject. Run it where gpt1.train runs:
    GPT1_TEST_NAN_STEPS=2,3 python tests/inject_nan.py <gpt1.train flags>
    GPT1_TEST_NAN_STEPS=2,3 deepspeed --num_gpus 2 tests/inject_nan.py <gpt1.train flags>
"""

import os
import sys

import torch.distributed as dist

from gpt1 import train
from gpt1.model import GPT1


def inject(steps):
    forward, calls = GPT1.forward, [0]

    def forward_with_nan(self, input_ids, labels=None):
        out = forward(self, input_ids, labels)
        if self.training and labels is not None:
            calls[0] += 1
            if calls[0] in steps and dist.get_rank() == 0:
                out.loss = out.loss * float("nan")
        return out

    GPT1.forward = forward_with_nan


if __name__ == "__main__":
    inject({int(s) for s in os.environ["GPT1_TEST_NAN_STEPS"].split(",")})
    train.main(sys.argv[1:])
