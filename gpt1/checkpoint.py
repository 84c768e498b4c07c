"""Run directories, DeepSpeed checkpoints that are complete or ignored, and the final weights.

RUN_DIR/
  config.json               the resolved model, run and DeepSpeed configs (and the data's metadata)
  metrics.jsonl             one JSON row per log interval and per evaluation
  tokenizer/                vocab.json + merges.txt of the data the run trained on
  checkpoints/stepNNNNNNNN/ engine.save_checkpoint's files, one rng_rankNNNNN.pt per rank, and
                            COMPLETE, written last: a checkpoint without it is never resumed from
  checkpoints/latest        the tag of the newest complete checkpoint (replaced atomically)
  model.pt                  the final fp32 weights, consolidated (what generate and export-hf read)
"""

import json
import os
import random
import shutil
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from .config import GPT1Config
from .errors import GPT1Error
from .tokenizer import GPT1Tokenizer


def atomic_write(path, write):
    """write(tmp_path), then rename over `path`: readers see the old file or the whole new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def checkpoint_root(run):
    return os.path.join(run.out, "checkpoints")


def complete_tags(root):
    """Tags of the complete checkpoints under root, oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if os.path.isfile(os.path.join(root, t, "COMPLETE"))]
    return sorted(tags, key=lambda t: json.load(open(os.path.join(root, t, "COMPLETE")))["step"])


def check_run_dir(run, cfg, ds, meta, rank):
    """Refuse a run directory made for another model, or one holding a run that --resume was not asked
    to continue; then (rank 0) write the resolved configs and the tokenizer into it."""
    cfg_path = os.path.join(run.out, "config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path) as f:
                saved = GPT1Config.from_dict(json.load(f)["model"])
        except (ValueError, KeyError, TypeError) as e:
            raise GPT1Error(f"{cfg_path} is not a run config: {e}") from None
        if saved.architecture() != cfg.architecture():
            raise GPT1Error(f"{run.out} was made with another model config ({saved.architecture()}), "
                            f"not {cfg.architecture()}; choose another --out")
    tags = complete_tags(checkpoint_root(run))
    if tags and not run.resume:
        raise GPT1Error(f"{run.out} already holds checkpoints (newest {tags[-1]}); pass --resume to continue "
                        "that run or choose another --out")
    if run.resume and not tags:
        raise GPT1Error(f"--resume: no complete checkpoint under {checkpoint_root(run)}")
    if run.resume:
        verify(checkpoint_root(run), tags[-1], cfg)  # before anything in the run directory is rewritten
    dist.barrier()
    if rank == 0:
        os.makedirs(os.path.join(run.out, "tokenizer"), exist_ok=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(os.path.join(run.data, name), os.path.join(run.out, "tokenizer", name))
        write_json(cfg_path, {"model": cfg.to_dict(), "run": vars(run), "deepspeed": ds, "data": meta,
                              "world_size": dist.get_world_size()})
    dist.barrier()


def rng_state(data_rng):
    state = {"data": data_rng.bit_generator.state, "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(engine, run, cfg, rank, step, data_rng):
    """A checkpoint of every rank's state; marked COMPLETE, pointed at by `latest`, old ones pruned."""
    root, tag = checkpoint_root(run), f"step{step:08d}"
    engine.save_checkpoint(root, tag=tag, client_state={"step": step}, save_latest=False)
    path = os.path.join(root, tag, f"rng_rank{rank:05d}.pt")
    atomic_write(path, lambda tmp: torch.save(rng_state(data_rng), tmp))
    dist.barrier()
    if rank == 0:
        files = {f: os.path.getsize(os.path.join(root, tag, f)) for f in sorted(os.listdir(os.path.join(root, tag)))}
        write_json(os.path.join(root, tag, "COMPLETE"), {"step": step, "model": cfg.architecture(),
                                                          "world_size": dist.get_world_size(), "files": files})
        atomic_write(os.path.join(root, "latest"), lambda tmp: open(tmp, "w").write(tag))
        prune(root, run.keep_checkpoints)
    dist.barrier()


def prune(root, keep):
    """Keep the newest `keep` complete checkpoints; drop the older ones and any partial leftovers."""
    tags = complete_tags(root)
    newest = tags[-1]
    for t in tags[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, t), ignore_errors=True)
    for t in os.listdir(root):
        d = os.path.join(root, t)
        if os.path.isdir(d) and t not in tags and t.startswith("step") and t < newest:
            shutil.rmtree(d, ignore_errors=True)


def verify(root, tag, cfg):
    """Check a checkpoint against its COMPLETE record: model config, file sizes, archive integrity."""
    d = os.path.join(root, tag)
    with open(os.path.join(d, "COMPLETE")) as f:
        record = json.load(f)
    if record["model"] != cfg.architecture():
        raise GPT1Error(f"checkpoint {d} is of another model config ({record['model']}), not {cfg.architecture()}")
    for name, size in record["files"].items():
        path = os.path.join(d, name)
        if not os.path.isfile(path):
            raise GPT1Error(f"checkpoint file {path} is missing")
        if os.path.getsize(path) != size:
            raise GPT1Error(f"checkpoint file {path} is truncated or altered ({os.path.getsize(path)} bytes, "
                            f"{size} when saved)")
        if name.endswith(".pt"):
            try:
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
            except zipfile.BadZipFile:
                bad = name
            if bad is not None:
                raise GPT1Error(f"checkpoint file {path} is corrupt")
    return record


def load(engine, run, cfg, rank, data_rng):
    """Resume from the newest complete checkpoint: weights, optimizer, schedule, loss scaler, RNGs."""
    root = checkpoint_root(run)
    tag = complete_tags(root)[-1]
    record = verify(root, tag, cfg)
    try:
        path, client = engine.load_checkpoint(root, tag=tag)
    except Exception as e:  # noqa: BLE001 - whatever DeepSpeed raised, name the checkpoint
        raise GPT1Error(f"checkpoint {os.path.join(root, tag)} cannot be loaded: {str(e).splitlines()[0]}") from None
    if path is None:
        raise GPT1Error(f"checkpoint {os.path.join(root, tag)} cannot be loaded")
    rng_path = os.path.join(root, tag, f"rng_rank{rank:05d}.pt")
    if record["world_size"] != dist.get_world_size() or not os.path.isfile(rng_path):
        # another world size: the weights resume, the data order is drawn afresh from the step
        data_rng = np.random.default_rng([run.seed, rank, client["step"]])
        torch.manual_seed(run.seed + 1 + rank + client["step"])
        return client["step"], data_rng
    state = torch.load(rng_path, weights_only=False)
    data_rng.bit_generator.state = state["data"]
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return client["step"], data_rng


def save_weights(engine, run, rank):
    """Write the consolidated fp32 weights to RUN_DIR/model.pt (gathered first under ZeRO-3)."""
    import deepspeed

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if rank == 0:
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
            atomic_write(os.path.join(run.out, "model.pt"), lambda tmp: torch.save(state, tmp))


def load_run(run_dir, device="cpu"):
    """(model, tokenizer) of a finished run directory, the model in eval mode."""
    from .model import GPT1

    cfg_path, weights = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "model.pt")
    for path in (cfg_path, weights):
        if not os.path.isfile(path):
            raise GPT1Error(f"{run_dir} is not a finished run directory ({os.path.basename(path)} is missing)")
    with open(cfg_path) as f:
        cfg = GPT1Config.from_dict(json.load(f)["model"])
    model = GPT1(cfg)
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (RuntimeError, zipfile.BadZipFile) as e:
        raise GPT1Error(f"{weights} cannot be loaded: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), GPT1Tokenizer.from_dir(os.path.join(run_dir, "tokenizer"))
