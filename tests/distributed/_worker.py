"""A small recipe script for the library checks that need real ranks (launched by tests via `tune run`).

mode=load: shard and stream-load a model, record per rank the bytes of weights it holds and the peak
growth of its anonymous memory while loading (memory-mapped file pages are not counted: they are
the page cache, shared and reclaimable), then rank ``die_rank`` kills itself in the middle of a
step-folder save while the others wait for it. mode=hang: rank 1 never joins a collective; the timeout must end the job.
mode=async: step folders whose DCP shards are written in the background, the background writes held
until the worker lets them go: step 1 is let go after a training step changed the weights, step 2
never (the test kills the job while it is held).
"""
import json
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from torchft.config import recipe_main


def anonymous_bytes() -> int:
    """RssAnon of this process (Linux): memory that is neither file-backed nor shared."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakTracking(Mapping):
    """A state dict that samples anonymous memory at every tensor read."""

    def __init__(self, state_dict):
        self.state_dict, self.baseline = state_dict, anonymous_bytes()
        self.peak = 0

    def sample(self):
        self.peak = max(self.peak, anonymous_bytes() - self.baseline)

    def __getitem__(self, key):
        self.sample()
        return self.state_dict[key]

    def __iter__(self):
        return iter(self.state_dict)

    def __len__(self):
        return len(self.state_dict)


def main(cfg):
    from torchft.training.distributed import init_distributed

    env = init_distributed("cpu", timeout_minutes=cfg.timeout_minutes)
    if cfg.mode == "hang":
        if env.rank == 1:
            time.sleep(300)  # never reaches the collective
        dist.all_reduce(torch.ones(1))
        return
    if cfg.mode == "async":
        background_saves(cfg, env)
        return

    from torchft.checkpoint import load_hf_checkpoint
    from torchft.models import from_hf_config
    from torchft.training.distributed import check_loaded, load_sharded_weights, local_bytes, shard_model

    with torch.device("meta"):
        model = from_hf_config(cfg.base)
    shard_model(model, env.mesh)
    state_dict = PeakTracking(load_hf_checkpoint(cfg.base))
    load_sharded_weights(model, state_dict, env.device, torch.float32)
    state_dict.sample()
    check_loaded(model)
    full = sum(t.numel() * t.element_size() for t in state_dict.state_dict.values())
    largest = max(t.numel() * t.element_size() for t in state_dict.state_dict.values())
    result = {"local_bytes": local_bytes(model), "full_bytes": full, "largest_tensor_bytes": largest,
              "peak_load_growth": state_dict.peak}
    (Path(cfg.output_dir) / f"rank_{env.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    from torchft.training.distributed_checkpoint import shared_atomic_directory

    # A save that a lost rank cuts short: the others wait for it before the rename, which never comes.
    with shared_atomic_directory(Path(cfg.output_dir) / "out" / "step_1", env.is_main_process) as tmp:
        (tmp / f"part_{env.rank}").write_text("written")
        if env.rank == cfg.die_rank:
            os.kill(os.getpid(), signal.SIGKILL)


def background_saves(cfg, env):
    """Two saves with ``async_save``'s :class:`BackgroundSaves`, each rank's background writes held on a gate.

    Step 1: while held, the folder must still be temporary; a training step then changes the weights
    and AdamW state; once let go and finished, the shards loaded back must be the state of step 1.
    Rank 0 records what it saw in ``async.json``. Step 2: held for good; each rank writes its pid
    into ``pending_<rank>`` and waits for the test to kill it.
    """
    import threading

    from torch.distributed.checkpoint import FileSystemWriter

    from torchft.checkpoint import HFCheckpointer
    from torchft.models import from_hf_config
    from torchft.training.distributed import load_sharded_weights, shard_model
    from torchft.training.distributed_checkpoint import (BackgroundSaves, DCP_DIR, _trainable_state,
                                                         load_trainable_state, save_sharded_step)

    gate, write_data = threading.Event(), FileSystemWriter.write_data

    def held_write_data(self, plan, planner):  # DCP's write, in the background thread only
        if threading.current_thread() is not threading.main_thread():
            gate.wait()
        return write_data(self, plan, planner)

    FileSystemWriter.write_data = held_write_data
    torch.manual_seed(0)
    with torch.device("meta"):
        model = from_hf_config(cfg.base)
    shard_model(model, env.mesh)
    checkpointer = HFCheckpointer(cfg.base, Path(cfg.output_dir) / "out")
    load_sharded_weights(model, checkpointer.load_model_state_dict(), env.device, torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, model.args.vocab_size, (2, 16))

    def train_step():
        logits = model(tokens)  # [2, 16, vocab]
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()

    def local_state() -> list[torch.Tensor]:  # this rank's shards of the weights and AdamW state, copied
        state, _ = _trainable_state(model, optimizer, adapters_only=False)
        flat = [v for v in state["model"].values()]
        flat += [v for entry in state["optimizer"]["state"].values() for v in entry.values()]
        return [(t.to_local() if hasattr(t, "to_local") else t).detach().clone() for t in flat]

    def same(a, b) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    out, is_main = checkpointer.output_dir, env.is_main_process
    saves = BackgroundSaves(env.timeout)
    train_step()
    saved = local_state()
    save_sharded_step(1, checkpointer, model, optimizer, {"step": 1}, adapters_only=False, is_main=is_main,
                      background=saves)
    seen = {"held_step_1_in_place": (out / "step_1").exists(),
            "held_folders": sorted(p.name for p in out.iterdir())}
    train_step()  # the next step changes what is being written
    seen["step_changed_the_state"] = not same(local_state(), saved)
    gate.set()
    seen["finished"] = str(saves.finish())
    dist.barrier()  # the other ranks do not wait for rank 0's rename
    load_trainable_state(model, optimizer, out / "step_1" / DCP_DIR, adapters_only=False)
    seen["loaded_equals_step_1"] = same(local_state(), saved)
    if is_main:
        (Path(cfg.output_dir) / "async.json").write_text(json.dumps(seen))
    gate.clear()
    train_step()
    save_sharded_step(2, checkpointer, model, optimizer, {"step": 2}, adapters_only=False, is_main=is_main,
                      background=saves)
    marker = Path(cfg.output_dir) / f"pending_{env.rank}"
    marker.with_suffix(".tmp").write_text(str(os.getpid()))
    os.replace(marker.with_suffix(".tmp"), marker)  # the test reads a whole pid
    time.sleep(600)  # training would go on here; the test kills the job first


if __name__ == "__main__":
    recipe_main(main)
