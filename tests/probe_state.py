"""gpt1.train that also writes, to the directory GPT1_TEST_STATE_DIR, the full fp32 weights, Adam moments,
Adam step and param-group hyperparameters, gathered across ranks with DeepSpeed's own accessors: after every
checkpoint save (saved_stepNNNNNNNN.pt) and right after a resume's load (loaded_stepNNNNNNNN.pt). Those
accessors are independent of the universal-checkpoint conversion, so the two files compare a resumed run's
state with the state the checkpoint was saved from. Run it where gpt1.train runs:
    GPT1_TEST_STATE_DIR=DIR python tests/probe_state.py <gpt1.train flags>
    GPT1_TEST_STATE_DIR=DIR deepspeed --num_gpus 2 tests/probe_state.py <gpt1.train flags>
"""

import os
import sys

import torch
import torch.distributed as dist

from gpt1 import checkpoint, train


def gather(engine):
    """{param name: {fp32, exp_avg, exp_avg_sq}} and the optimizer's per-group step and hyperparameters."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "single_partition_of_fp32_groups"):
        # ZeRO 1-2 link each parameter to its slice of the moments after the first optimizer step, for every
        # param group at once, when only the first group's moments exist: link them again, now
        for i, lp_group in enumerate(opt.bit16_groups):
            lazy_init_hp_params_optimizer_state(lp_group, opt.single_partition_of_fp32_groups[i], opt.optimizer.state)
    params = {n: {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                  "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
              for n, p in engine.module.named_parameters()}
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    groups = [{k: v for k, v in g.items() if k in ("lr", "weight_decay", "betas", "eps")} for g in inner.param_groups]
    steps = {float(s["step"]) for s in inner.state.values() if "step" in s}
    return {"params": params, "groups": groups, "adam_steps": sorted(steps)}


def dump(engine, kind, step):
    state = gather(engine)  # a collective under ZeRO-3: every rank gathers
    if dist.get_rank() == 0:
        torch.save(state, os.path.join(os.environ["GPT1_TEST_STATE_DIR"], f"{kind}_step{step:08d}.pt"))


def probe():
    save, load = checkpoint.save, checkpoint.load

    def save_and_dump(engine, run, cfg, rank, step, sampler):
        save(engine, run, cfg, rank, step, sampler)
        dump(engine, "saved", step)

    def load_and_dump(engine, run, cfg, rank, sampler):
        step = load(engine, run, cfg, rank, sampler)
        dump(engine, "loaded", step)
        return step

    checkpoint.save, checkpoint.load = save_and_dump, load_and_dump


if __name__ == "__main__":
    os.makedirs(os.environ["GPT1_TEST_STATE_DIR"], exist_ok=True)
    probe()
    train.main(sys.argv[1:])
