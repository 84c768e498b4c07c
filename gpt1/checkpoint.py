"""Run directories, DeepSpeed checkpoints that are complete or ignored, universal conversions, final weights.

RUN_DIR/
  config.json               the resolved model, run and DeepSpeed configs (and the data's metadata)
  metrics.jsonl             one JSON row per log interval and per evaluation
  tokenizer/                vocab.json + merges.txt of the data the run trained on
  checkpoints/stepNNNNNNNN/ engine.save_checkpoint's files, one rng_rankNNNNN.pt per rank, and
                            COMPLETE, written last: a checkpoint without it is never resumed from
  checkpoints/stepNNNNNNNN.universal/
                            the same checkpoint as a DeepSpeed universal checkpoint (per-parameter fp32
                            weights and Adam moments), made when a run resumes on another number of ranks
                            or another ZeRO stage, or by `gpt1 checkpoint convert`; CONVERTED, written
                            last, and the directory appears by one rename: it is whole or absent
  checkpoints/latest        the tag of the newest complete checkpoint (replaced atomically)
  model.pt                  the final fp32 weights, consolidated (what generate and export-hf read)
"""

import argparse
import contextlib
import glob
import io
import json
import os
import random
import shutil
import tempfile
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from .config import GPT1Config
from .errors import GPT1Error, reason
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


def holds_run(path):
    """What `path` holds: "pre-training" (a run's config.json, its weights or checkpoints), "fine-tuning" (a
    fine-tuned model's config.json), "Hugging Face" (an export's config.json), "other" (a config.json of none of
    those), or None (nothing of the kind)."""
    cfg_path = os.path.join(path, "config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return "other"
        if not isinstance(saved, dict):
            return "other"
        if "finetune" in saved:
            return "fine-tuning"
        if "run" in saved or "model" in saved:
            return "pre-training"
        return "Hugging Face" if "model_type" in saved else "other"
    if os.path.isfile(os.path.join(path, "model.pt")) or os.path.isdir(os.path.join(path, "checkpoints")):
        return "pre-training"
    return None


_HOLDS = {"pre-training": "a pre-training run", "fine-tuning": "a fine-tuning run",
          "Hugging Face": "a Hugging Face export", "other": "a config.json that is no run's nor an export's"}


def refuse_to_write_over(path, allowed, advice):
    """A GPT1Error naming what `path` holds (holds_run) unless it is nothing or one of the kinds in `allowed`; also
    where it is a file (makedirs would say only "File exists", save_pretrained would log it and write nothing)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise GPT1Error(f"{path} is a file, not a directory to write into; {advice}")
    kind = holds_run(path)
    if kind is not None and kind not in allowed:
        raise GPT1Error(f"{path} holds {_HOLDS[kind]}; {advice}")


def complete_tags(root):
    """Tags of the complete checkpoints under root, oldest first."""
    if not os.path.isdir(root):
        return []
    steps = {t: read_record(os.path.join(root, t, "COMPLETE"))["step"] for t in os.listdir(root)
             if os.path.isfile(os.path.join(root, t, "COMPLETE"))}
    return sorted(steps, key=steps.get)


def check_run_dir(run, cfg, ds, meta, rank):
    """Refuse a run directory made for another model, or one holding a run that --resume was not asked
    to continue; then (rank 0) write the resolved configs and the tokenizer into it."""
    cfg_path = os.path.join(run.out, "config.json")
    # another config.json is refused below, by what it lacks
    refuse_to_write_over(run.out, ("pre-training", "other"), "choose another --out")
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
    if run.resume:  # before anything in the run directory is rewritten
        record = verify(checkpoint_root(run), tags[-1], cfg)
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if needs_universal(os.path.join(checkpoint_root(run), tags[-1]), record, stage, dist.get_world_size()):
            path, made = convert_on_rank0(checkpoint_root(run), tags[-1], record, rank)
            if rank == 0:
                print(f"checkpoint {tags[-1]} was saved on {record['world_size']} rank(s) with ZeRO-"
                      f"{record['zero_stage']}, this run has {dist.get_world_size()} with ZeRO-{stage}: resuming "
                      f"from its universal checkpoint {path} ({'converted now' if made else 'converted before'})",
                      flush=True)
    dist.barrier()
    if rank == 0:
        os.makedirs(os.path.join(run.out, "tokenizer"), exist_ok=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(os.path.join(run.data, name), os.path.join(run.out, "tokenizer", name))
        write_json(cfg_path, {"model": cfg.to_dict(), "run": vars(run), "deepspeed": ds, "data": meta,
                              "world_size": dist.get_world_size()})
    dist.barrier()


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def universal_info():
    """What DeepSpeed's ds_to_universal needs in a checkpoint (Megatron-DeepSpeed fills the same key). Our
    model has no tensor or pipeline parallelism, so there are no patterns of split parameters to record."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}


def save(engine, run, cfg, rank, step, sampler):
    """A checkpoint of every rank's state; marked COMPLETE, pointed at by `latest`, old ones pruned."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    root, tag = checkpoint_root(run), f"step{step:08d}"
    setattr(engine.module, UNIVERSAL_CHECKPOINT_INFO, universal_info())  # DeepSpeed saves it with the module
    client = {"step": step, "sampler": sampler.state_dict()}
    engine.save_checkpoint(root, tag=tag, client_state=client, save_latest=False)
    path = os.path.join(root, tag, f"rng_rank{rank:05d}.pt")
    atomic_write(path, lambda tmp: torch.save(rng_state(), tmp))
    dist.barrier()
    if rank == 0:
        files = {f: os.path.getsize(os.path.join(root, tag, f)) for f in sorted(os.listdir(os.path.join(root, tag)))}
        write_json(os.path.join(root, tag, "COMPLETE"), {
            "step": step, "model": cfg.architecture(), "world_size": dist.get_world_size(),
            "zero_stage": engine.zero_optimization_stage(), "samples": sampler.samples, "files": files})
        atomic_write(os.path.join(root, "latest"), lambda tmp: open(tmp, "w").write(tag))
        prune(root, run.keep_checkpoints)
    dist.barrier()


def prune(root, keep):
    """Keep the newest `keep` complete checkpoints (and their universal conversions); drop the older ones,
    and any partial leftovers (a save or a conversion that never finished) older than the newest."""
    tags = complete_tags(root)
    kept, newest = set(tags[-keep:] if keep > 0 else tags), tags[-1]
    for t in os.listdir(root):
        base = t.split(".", 1)[0]  # stepNNNNNNNN of stepNNNNNNNN.universal and of its scratch directories
        if (os.path.isdir(os.path.join(root, t)) and base.startswith("step") and base not in kept
                and (base in tags or base < newest)):
            shutil.rmtree(os.path.join(root, t), ignore_errors=True)


def verify(root, tag, cfg=None):
    """Check a checkpoint against its COMPLETE record: model config (unless cfg is None), file sizes,
    archive integrity. Returns the record, with the ZeRO stage filled in for checkpoints saved before
    the record held it."""
    d = os.path.join(root, tag)
    record = read_record(os.path.join(d, "COMPLETE"))
    if cfg is not None and record["model"] != cfg.architecture():
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
    if "zero_stage" not in record:
        record["zero_stage"] = saved_zero_stage(d)
    return record


def read_record(path):
    try:
        with open(path) as f:
            record = json.load(f)
        for key in ("step", "model", "world_size", "files"):
            record[key]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GPT1Error(f"{path} is not a checkpoint record ({type(e).__name__}: {e})") from None
    return record


def saved_zero_stage(d):
    """The ZeRO stage a checkpoint directory was saved with, from DeepSpeed's own files."""
    if glob.glob(os.path.join(d, "zero_pp_rank_*_mp_rank_*_model_states.pt")):
        return 3
    path = os.path.join(d, "mp_rank_00_model_states.pt")
    if not os.path.isfile(path):
        raise GPT1Error(f"{d} holds no DeepSpeed model states (mp_rank_00_model_states.pt); "
                        "it is not a DeepSpeed checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(state.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))


def universal_path(root, tag):
    return os.path.join(root, f"{tag}.universal")


def converted(root, tag):
    """The CONVERTED record of tag's universal checkpoint if it is there and whole, else None."""
    d = universal_path(root, tag)
    try:
        with open(os.path.join(d, "CONVERTED")) as f:
            record = json.load(f)
        whole = all(os.path.isfile(os.path.join(d, n)) and os.path.getsize(os.path.join(d, n)) == size
                    for n, size in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return record if whole else None


def convert(root, tag, record, workers=1):
    """Write tag's universal checkpoint beside it, once: DeepSpeed's ds_to_universal into a scratch directory
    under root, made loadable into any ZeRO stage 1-3 (_for_every_stage), then renamed into place. The
    original is only read. Returns (path, False) when an earlier conversion is reused, (path, True) else."""
    from deepspeed.checkpoint import ds_to_universal

    src, dst = os.path.join(root, tag), universal_path(root, tag)
    if converted(root, tag) is not None:
        return dst, False
    if record["zero_stage"] == 0:
        raise GPT1Error(f"checkpoint {src} was saved with ZeRO-0, which keeps no ZeRO optimizer state for "
                        "DeepSpeed's universal checkpoint to convert; resume it with ZeRO-0 (on any number of ranks)")
    scratch = tempfile.mkdtemp(prefix=f"{tag}.universal.tmp-", dir=root)
    out = os.path.join(scratch, tag)  # ds_to_universal writes a latest_universal file beside its output
    log = io.StringIO()
    try:
        args = argparse.Namespace(input_folder=src, output_folder=out, num_extract_workers=workers,
                                  num_merge_workers=workers, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # checkpoints saved before save() recorded it
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
        _for_every_stage(out, record)
        files = {os.path.relpath(os.path.join(dp, f), out): os.path.getsize(os.path.join(dp, f))
                 for dp, _, fs in os.walk(out) for f in fs}
        write_json(os.path.join(out, "CONVERTED"), {
            "source": tag, "step": record["step"], "model": record["model"], "world_size": record["world_size"],
            "zero_stage": record["zero_stage"], "files": dict(sorted(files.items()))})
        if os.path.isdir(dst):  # a conversion whose files were altered since: the original is the truth
            shutil.rmtree(dst)
        os.rename(out, dst)
    except Exception as e:  # noqa: BLE001 - whatever the converter raised, the original is untouched
        why = reason(e)
        raise GPT1Error(f"converting checkpoint {src} to a universal checkpoint failed ({why}); the original is "
                        f"unchanged and still resumes on {record['world_size']} rank(s) with ZeRO-"
                        f"{record['zero_stage']}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dst, True


def _for_every_stage(out, record):
    """ds_to_universal writes what a load into the source's own ZeRO family expects: under ZeRO 1-2 dicts of
    shaped tensors with an Adam step per parameter, a global optimizer_state.pt and mp_rank_00_model_states.pt;
    under ZeRO-3 flat tensors, no per-parameter step, the step inside optimizer_state.pt and
    zero_pp_rank_0_mp_rank_00_model_states.pt. Write both forms, so that either family loads it."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM, PARAM_GROUPS, PARAM_SHAPES

    names = {"z12": os.path.join(out, "mp_rank_00_model_states.pt"),
             "z3": os.path.join(out, "zero_pp_rank_0_mp_rank_00_model_states.pt")}
    have = names["z3"] if os.path.isfile(names["z3"]) else names["z12"]
    model_states = torch.load(have, map_location="cpu", weights_only=False)
    for path in names.values():
        if not os.path.isfile(path):
            try:
                os.link(have, path)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(have, path)
    shapes = {n: s for group in model_states[PARAM_SHAPES] for n, s in group.items()}
    zero = os.path.join(out, "zero")
    opt = torch.load(os.path.join(zero, "optimizer_state.pt"), weights_only=False)
    if OPTIMIZER_STATE_DICT in opt:  # ZeRO-3's: keep the step, drop rank 0's partition of the moments
        step = opt[OPTIMIZER_STATE_DICT]["state"][0]["step"]
    else:
        step = torch.load(os.path.join(zero, next(iter(shapes)), "step.pt"), weights_only=False)
    opt.pop("fp32_flat_groups", None)
    opt.pop("clip_grad", None)  # gradient clipping is the resuming run's config's to decide
    opt.setdefault("ds_version", model_states["ds_version"])
    opt[OPTIMIZER_STATE_DICT] = {"state": {i: {"step": step} for i in range(len(opt[PARAM_GROUPS]))},
                                 PARAM_GROUPS: opt[PARAM_GROUPS]}
    torch.save(opt, os.path.join(zero, "optimizer_state.pt"))
    if record["zero_stage"] < 3:
        return
    for name, shape in shapes.items():
        d = os.path.join(zero, name)
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            t = torch.load(os.path.join(d, f"{key}.pt"), weights_only=False)
            t = t[PARAM] if isinstance(t, dict) else t
            torch.save({PARAM: t.view(shape), "cat_dim": 0}, os.path.join(d, f"{key}.pt"))
        torch.save(step, os.path.join(d, "step.pt"))


def needs_universal(src, record, stage, world):
    """Whether a checkpoint saved as `record` says resumes on `world` ranks with ZeRO-`stage` through its
    universal form; raises where neither way can load it. ZeRO-0 keeps the optimizer state whole in one file,
    which DeepSpeed loads on any number of ranks; ZeRO 1-3 partition it by rank."""
    if record["zero_stage"] == stage and (record["world_size"] == world or stage == 0):
        return False
    if record["zero_stage"] == 0:
        raise GPT1Error(f"checkpoint {src} was saved with ZeRO-0, which keeps no ZeRO optimizer state for "
                        "DeepSpeed's universal checkpoint to convert; resume it with ZeRO-0 (on any number of ranks)")
    if stage == 0:
        raise GPT1Error(f"checkpoint {src} was saved with ZeRO-{record['zero_stage']} on {record['world_size']} "
                        "rank(s); DeepSpeed's universal checkpoints load into ZeRO stages 1-3 only: resume it with "
                        "a ZeRO 1-3 config (on any number of ranks)")
    return True


def load(engine, run, cfg, rank, sampler):
    """Resume from the newest complete checkpoint: weights, optimizer, schedule, loss scaler, the sampler's
    position and, on as many ranks as saved it, every RNG. Returns the step.

    On another number of ranks or another ZeRO stage the checkpoint is loaded from its universal form
    (which check_run_dir has made, on rank 0, the first time)."""
    root, world, stage = checkpoint_root(run), dist.get_world_size(), engine.zero_optimization_stage()
    tag = complete_tags(root)[-1]
    record = verify(root, tag, cfg)
    src = os.path.join(root, tag)
    if needs_universal(src, record, stage, world):
        convert_on_rank0(root, tag, record, rank)  # at once where check_run_dir converted it
        client = _load_universal(engine, root, tag)
    else:
        client = _load(engine, root, tag)
    if "sampler" in client:
        same_order = sampler.load_state_dict(client["sampler"])
    else:  # saved before the sampler had a position: start the new order where this step's samples would be
        same_order = sampler.load_state_dict({"samples": client["step"] * engine.train_batch_size()})
    if rank == 0 and not same_order:
        print(f"note: the data order differs from the checkpoint's (another seed, --seq-len or data); "
              f"continuing at sample {sampler.samples} of this run's order", flush=True)
    rng_path = os.path.join(src, f"rng_rank{rank:05d}.pt")
    if record["world_size"] == world and os.path.isfile(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))
    else:  # other ranks: a fresh stream per rank, drawn from the step (dropout masks are not replayed)
        torch.manual_seed(run.seed + 1 + rank + client["step"])
    return client["step"]


def _load(engine, root, tag):
    try:
        path, client = engine.load_checkpoint(root, tag=tag)
    except Exception as e:  # noqa: BLE001 - whatever DeepSpeed raised, name the checkpoint
        raise GPT1Error(f"checkpoint {os.path.join(root, tag)} cannot be loaded: {reason(e)}") from None
    if path is None:
        raise GPT1Error(f"checkpoint {os.path.join(root, tag)} cannot be loaded")
    return client


def convert_on_rank0(root, tag, record, rank):
    """convert() on rank 0 while the others wait; its error, if any, raised on every rank."""
    result = [None, None]
    if rank == 0:
        try:
            result = [convert(root, tag, record), None]
        except GPT1Error as e:
            result = [None, str(e)]
    dist.broadcast_object_list(result, src=0)
    if result[1] is not None:
        raise GPT1Error(result[1])
    return result[0]


def _load_universal(engine, root, tag):
    """engine.load_checkpoint of tag's universal checkpoint. DeepSpeed reads `load_universal` from its config
    only inside load_checkpoint, so it is switched on for this one call: the run's config stays as written,
    and its later same-topology resumes load ordinary checkpoints."""
    from deepspeed.checkpoint.constants import PARAM_GROUPS

    utag = os.path.basename(universal_path(root, tag))
    engine._config.load_universal_checkpoint = True
    try:
        client = _load(engine, root, utag)
    finally:
        engine._config.load_universal_checkpoint = False
    # ZeRO-3's universal load gives every param group the first group's hyperparameters (the weight decay
    # of the no-decay group among them): set each group's own again
    saved = torch.load(os.path.join(root, utag, "zero", "optimizer_state.pt"), weights_only=False)[PARAM_GROUPS]
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if len(saved) != len(inner.param_groups):
        raise GPT1Error(f"checkpoint {os.path.join(root, tag)} has {len(saved)} optimizer param groups, this run "
                        f"{len(inner.param_groups)}")
    for group, saved_group in zip(inner.param_groups, saved):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    return client


def describe(run_dir):
    """What `gpt1 checkpoint info` prints: the run's checkpoints, complete or not, and their conversions."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        raise GPT1Error(f"{run_dir} is not a run directory (no checkpoints/ in it)")
    rows = []
    for t in sorted(os.listdir(root)):
        d = os.path.join(root, t)
        if not os.path.isdir(d) or not t.startswith("step") or "." in t:
            continue
        if not os.path.isfile(os.path.join(d, "COMPLETE")):
            rows.append({"tag": t, "complete": False})
            continue
        record = read_record(os.path.join(d, "COMPLETE"))
        if "zero_stage" not in record:
            record["zero_stage"] = saved_zero_stage(d)
        universal = converted(root, t)
        rows.append({"tag": t, "complete": True, **record, "bytes": sum(record["files"].values()),
                     "universal": universal_path(root, t) if universal else None})
    return rows


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
    try:
        with open(cfg_path) as f:
            cfg = GPT1Config.from_dict(json.load(f)["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise GPT1Error(f"{cfg_path} is not a run config ({type(e).__name__}: {e})") from None
    model = GPT1(cfg)
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (RuntimeError, zipfile.BadZipFile) as e:
        raise GPT1Error(f"{weights} cannot be loaded: {reason(e)}") from None
    return model.to(device).eval(), GPT1Tokenizer.from_dir(os.path.join(run_dir, "tokenizer"))
