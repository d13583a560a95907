"""Speed and memory per step: tokens/s, peak memory, an MFU estimate, and the progress bar.

MFU (model FLOPs utilisation) = achieved model FLOP/s / the device's peak dense bf16 FLOP/s, per
device (a data-parallel job's FLOP/s over its device count times one device's peak), with model
FLOPs per trained token (Chinchilla / PaLM convention, recompute not counted):

    full fine-tuning:         6 * N + 12 * L * d * s
    adapters (frozen base):   4 * N + 12 * L * d * s

N counts the parameters of every matrix multiply (attention and MLP projections of all layers and
the output projection; not the embedding lookup), L the layers, d the attention width
(num_heads * head_dim) and s the sequence length. Forward costs 2N; backward costs 2N for the input
gradients plus 2N for the weight gradients, which a frozen base skips (the adapters' own FLOPs are
negligible). The attention score and value products cost 4 * d * s per token and layer in forward
and twice that in backward.
"""
import resource
import sys
import time

import torch

# Dense bf16 peak FLOP/s by device name (tensor cores, no sparsity). Unknown devices get no MFU.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def llama_matmul_params(num_layers: int, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int,
                        intermediate_dim: int, vocab_size: int) -> int:
    """N of the MFU formula for a Llama architecture (LoRA adapters not counted)."""
    attn = embed_dim * head_dim * (2 * num_heads + 2 * num_kv_heads)  # q, o + k, v
    mlp = 3 * embed_dim * intermediate_dim  # gate, up, down
    return num_layers * (attn + mlp) + embed_dim * vocab_size


def flops_per_token(matmul_params: int, num_layers: int, attn_dim: int, seq_len: int, full_finetune: bool) -> float:
    """Model FLOPs per trained token (see the module docstring for the formula)."""
    return (6 if full_finetune else 4) * matmul_params + 12 * num_layers * attn_dim * seq_len


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None when unknown (CPU, unlisted GPU)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def reset_peak_memory(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB: allocated and reserved on CUDA; the process's peak RSS on CPU."""
    if torch.device(device).type == "cuda":
        return {
            "peak_memory_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30}


class StepTimer:
    """Time of one optimizer step without stalling the device.

    On CUDA, ``start``/``stop`` record events in the stream and ``seconds`` waits for the stop event
    only (call it when the metrics are read back anyway); on the CPU it is wall time.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self._start = self._stop = 0.0

    def start(self) -> None:
        if self._cuda:
            self._events[0].record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self._cuda:
            self._events[1].record()
        else:
            self._stop = time.perf_counter()

    def seconds(self) -> float:
        """Seconds between the last ``start`` and ``stop`` (on CUDA: waits until the stop event is reached)."""
        if self._cuda:
            self._events[1].synchronize()
            return self._events[0].elapsed_time(self._events[1]) / 1e3
        return self._stop - self._start


def step_metrics(num_tokens: int, seconds: float, flops_per_tok: float, device: torch.device,
                 world_size: int = 1) -> dict[str, float]:
    """tokens/s, memory and (on a known GPU) MFU of a step that trained ``num_tokens`` tokens.

    ``num_tokens`` are those of all ``world_size`` devices together (``tokens_per_s`` is the job's);
    MFU is per device: the job's FLOP/s over ``world_size`` times one device's peak.
    """
    tokens_per_s = num_tokens / max(seconds, 1e-9)
    metrics = {"tokens_per_s": tokens_per_s, **memory_stats(device)}
    peak = peak_flops(device)
    if peak is not None:
        metrics["mfu"] = tokens_per_s * flops_per_tok / (world_size * peak)
    return metrics


class ProgressBar:
    """A tqdm bar over optimizer steps showing loss, lr, tokens/s and peak memory."""

    def __init__(self, total: int, initial: int = 0, disable: bool = False):
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=initial, disable=disable, dynamic_ncols=True, unit="step")

    def update(self, metrics: dict | None = None) -> None:
        """Advance one step; ``metrics`` (a logged step's, already read back) refresh the shown values."""
        if metrics is not None:
            postfix = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
                       "tok/s": f"{metrics['tokens_per_s']:,.0f}"}
            peak = metrics.get("peak_memory_alloc_gib", metrics.get("peak_rss_gib"))
            if peak is not None:
                postfix["mem"] = f"{peak:.2f}GiB"
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        self._bar.write(message)

    def close(self) -> None:
        self._bar.close()


def model_flops_per_token(args, seq_len: int, full_finetune: bool) -> float:
    """:func:`flops_per_token` for a model's ``LlamaArgs``."""
    n = llama_matmul_params(args.num_layers, args.embed_dim, args.num_heads, args.num_kv_heads, args.head_dim,
                            args.intermediate_dim, args.vocab_size)
    return flops_per_token(n, args.num_layers, args.num_heads * args.head_dim, seq_len, full_finetune)
