"""A small recipe script for the library checks that need real ranks (launched by tests via `tune run`).

mode=load: shard and stream-load a model, record per rank the bytes of weights it holds and the peak
growth of its anonymous memory while loading (memory-mapped file pages are not counted: they are
the page cache, shared and reclaimable), then rank ``die_rank`` kills itself in the middle of a
step-folder save while the others wait for it. mode=hang: rank 1 never joins a collective; the timeout must end the job.
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


if __name__ == "__main__":
    recipe_main(main)
