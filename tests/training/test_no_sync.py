"""A training step never waits for the device: no op in it reads a value back to the host.

On a GPU, an op whose result the host needs (a Python number, or an output whose shape depends on
the data) stalls the CPU until every queued kernel has run. Counted here on the CPU, with a
``TorchDispatchMode`` that sees every aten op of a real step of a tiny model.
"""
import functools
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchft.data.collate import padded_collate
from torchft.models import llama
from torchft.modules.loss import ChunkedCrossEntropy
from torchft.modules.peft import get_adapter_params, set_trainable_params
from torchft.training.loop import TrainingLoop
from torchft.training.lr_schedule import build_lr_scheduler
from torchft.training.metric_logging import MetricLogger
from torchft.training.optim import OptimizerInBackward, build_adamw
from torchft.training.steps import optimizer_step

aten = torch.ops.aten
# ops whose output is a host value or has a data-dependent shape
SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.nonzero.default,
            aten.masked_select.default, aten.equal.default, aten.unique_consecutive.default,
            aten._unique2.default, aten.repeat_interleave.Tensor}
TINY = dict(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
            max_seq_len=64)


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype is torch.bool for i in indices or ())


class CountSyncs(TorchDispatchMode):
    """Records each sync-forcing op with the innermost torchft line that issued it (for the message)."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        syncs = func in SYNC_OPS or (func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default)
                                     and _bool_index(args))
        if syncs:
            where = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if "/torchft/" in f.filename]
            self.found.append((str(func), where[-1] if where else "?"))
        return func(*args, **(kwargs or {}))


def micro_batches(count: int) -> list[dict]:
    """Collated like the recipes' batches: two samples of different lengths, prompt tokens masked."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        samples = []
        for n in (12, 9):
            tokens = torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist()
            samples.append({"tokens": tokens, "labels": [-100] * 3 + tokens[3:]})
        out.append(padded_collate(samples, pad_id=0))
    return out


class StaticShapeCrossEntropy:
    """The chunked loss's interface with a single static-shape cross-entropy (ignore_index handled inside
    ``F.cross_entropy``): isolates the rest of the step from the loss's own ops."""

    ignore_index = -100

    def __call__(self, hidden, targets, output_fn, params=()):
        logits = output_fn(hidden).float()  # [b, s, v]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum",
                                                 ignore_index=self.ignore_index)
        return loss, (targets != self.ignore_index).sum()


def setup(kind: str, loss_fn=None):
    torch.manual_seed(0)
    if kind.startswith("lora"):
        model = llama(**TINY, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4,
                      lora_alpha=8.0)
        set_trainable_params(model, get_adapter_params(model))
    else:
        model = llama(**TINY)
    if "bf16" in kind:
        model = model.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = OptimizerInBackward(params, lr=1e-3) if "in_backward" in kind else build_adamw(params, lr=1e-3)
    scheduler = build_lr_scheduler(optimizer, "cosine", num_warmup_steps=1, num_training_steps=10)
    clip = None if "in_backward" in kind else 1.0
    step = functools.partial(optimizer_step, model, loss_fn=loss_fn or StaticShapeCrossEntropy(), optimizer=optimizer,
                             lr_scheduler=scheduler, max_grad_norm=clip)
    return model, step


KINDS = ["lora", "full", "full_bf16", "full_bf16_in_backward"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_does_not_sync(kind):
    _, step = setup(kind)
    step(micro_batches(2))  # the first step also allocates the optimizer state
    batches = micro_batches(2)  # collated on the CPU, before the step (as the loader does)
    with CountSyncs() as counted:
        result = step(batches)
    assert counted.found == []
    assert result.found_inf is not None and result.grad_norm is not None  # the check still has its inputs


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_a_step_with_the_chunked_loss_does_not_sync(kind):
    _, step = setup(kind, ChunkedCrossEntropy(num_chunks=2))
    step(micro_batches(2))
    batches = micro_batches(2)
    with CountSyncs() as counted:
        step(batches)
    assert counted.found == []


@pytest.fixture
def one_rank_process_group():
    """A gloo process group of this process alone: the distributed code paths, in process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_stop_decision_across_ranks_reads_nothing_back(one_rank_process_group):
    from torchft.training.distributed import any_rank

    with CountSyncs() as counted:
        decisions = [any_rank(False), any_rank(True)]
    assert decisions == [False, True]
    assert counted.found == []  # a flag in host memory, reduced by gloo: no device to wait for


@pytest.mark.parametrize("ranks", ["one", "distributed"])
def test_the_loop_reads_nothing_back_between_logging_steps(ranks, request):
    _, step = setup("lora")
    seen = []

    def train_step(batches, n):
        seen.append(list(counted.found))  # what the loop and the earlier steps synced so far
        return step(batches)

    any_rank = None
    if ranks == "distributed":  # every step decides "stop?" on every rank, as the distributed recipes do
        from torchft.training.distributed import any_rank

        request.getfixturevalue("one_rank_process_group")
    batches = iter(micro_batches(8))
    loop = TrainingLoop(4, lambda n: f"step_{n}", MetricLogger(), torch.device("cpu"), gradient_accumulation_steps=2,
                        log_every_n_steps=None, progress_bar=False, any_rank=any_rank)
    with CountSyncs() as counted:
        loop.run(batches, train_step, lr=lambda: 0.0)
    assert seen == [[], [], [], []]  # steps 1-3 and the loop around them: nothing
    assert [op for op, _ in counted.found] == ["aten._local_scalar_dense.default"] * 3  # step 4: the check before its save
