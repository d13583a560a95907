"""Training precision: the names a config may use and the checks that go with them."""
import torch

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """Turn a config's ``dtype`` (``bf16`` or ``fp32``) into a torch dtype usable on ``device``.

    fp16 is refused on purpose: it needs loss scaling, which bf16 does not, and every GPU that
    fine-tunes Llama models well supports bf16.
    """
    key = str(name).lower()
    if key not in _DTYPES:
        raise ValueError(f"dtype ({name}) must be one of bf16, fp32")
    dtype = _DTYPES[key]
    device = torch.device(device)
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"dtype (bf16) is not supported by this GPU ({torch.cuda.get_device_name(device)}): use dtype=fp32"
        )
    return dtype


def _auto_device() -> torch.device:
    """CUDA when this machine has a GPU, else the CPU; one log line says which and why."""
    import logging

    if torch.cuda.is_available():
        device, why = torch.device("cuda"), "a CUDA device is available"
    else:
        device, why = torch.device("cpu"), "no CUDA device found"
    logging.getLogger("torchft").info("device: auto -> %s (%s)", device.type, why)
    return device


def resolve_device(name: str) -> torch.device:
    """``auto`` / ``cuda`` / ``cuda:N`` / ``cpu``, with a clear error when CUDA is asked for and missing.

    ``auto`` picks CUDA when there is a GPU, else the CPU, and logs its choice;
    an explicit ``cuda`` stays strict."""
    if str(name) == "auto":
        device = _auto_device()
        if device.type != "cuda":
            return device
        name = "cuda"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device ({name}) is not available: no CUDA device found; use device=cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"device ({name}) must be auto, cpu, cuda or cuda:N")
    return device
