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


def resolve_device(name: str) -> torch.device:
    """``cuda`` / ``cuda:N`` / ``cpu``, with a clear error when CUDA is asked for and missing."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device ({name}) is not available: no CUDA device found; use device=cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"device ({name}) must be cpu, cuda or cuda:N")
    return device
