"""Collate functions: a list of samples -> a batch of tensors.

Both also return ``num_tokens`` (tokens that are not padding) and ``num_target_tokens`` (next-token
labels that carry a loss) as Python ints, counted here while the labels are still on the CPU, so the
training step never reads a count back from the GPU.

``padded_collate``: unpacked samples padded on the right to the longest one (tokens with ``pad_id``,
labels with -100). The model's default causal mask is correct for right padding.

``packed_collate``: packs (all exactly ``max_seq_len`` long) stacked, plus ``input_pos`` and a
block-causal ``mask`` so documents of a pack never attend to each other: a bool tensor [b, s, s]
(True = may attend) for SDPA, or a flex_attention ``BlockMask`` on CUDA. Its ``num_tokens`` counts
the packs' documents only (each pack's ``num_tokens``), not the padding that fills a pack.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label of a position not trained on (cross-entropy's ignore_index); the one definition


def count_target_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Positions of ``labels`` [b, s] (aligned with the tokens) whose next-token target carries a loss."""
    return int((labels[:, 1:] != ignore_index).sum())


def padded_collate(batch: list[dict], pad_id: int = 0, ignore_index: int = IGNORE_INDEX, pad_to_multiple_of: int = 1) -> dict:
    """Stack ``{"tokens", "labels"}`` samples into ``tokens`` / ``labels`` long tensors [b, s] (plus the counts)."""
    if not batch:
        raise ValueError("padded_collate got an empty batch")
    longest = max(len(sample["tokens"]) for sample in batch)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), ignore_index, dtype=torch.long)
    for row, sample in enumerate(batch):
        n = len(sample["tokens"])
        if len(sample["labels"]) != n:
            raise ValueError(f"sample {row}: {n} tokens but {len(sample['labels'])} labels")
        tokens[row, :n] = torch.as_tensor(sample["tokens"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(sample["labels"], dtype=torch.long)
    return {"tokens": tokens, "labels": labels, "num_tokens": sum(len(sample["tokens"]) for sample in batch),
            "num_target_tokens": count_target_tokens(labels, ignore_index)}


def block_causal_mask(document_ids: torch.Tensor, device=None, mask_type: str = "auto"):
    """Mask letting position q attend to position kv only when kv <= q and both are in one document.

    Args:
        document_ids: [b, s] document index of every position.
        device: where the mask is used; ``mask_type="auto"`` picks a flex_attention ``BlockMask`` on CUDA
            and a dense bool tensor [b, s, s] elsewhere.
        mask_type: ``"auto"``, ``"dense"`` or ``"flex"``.
    """
    device = torch.device(device) if device is not None else document_ids.device
    if mask_type == "auto":
        mask_type = "flex" if device.type == "cuda" else "dense"
    document_ids = document_ids.to(device)
    b, s = document_ids.shape
    if mask_type == "dense":
        same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # [b, s, s]
        causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
        return same_doc & causal
    if mask_type == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(batch, head, q_idx, kv_idx):
            return (document_ids[batch, q_idx] == document_ids[batch, kv_idx]) & (q_idx >= kv_idx)

        return create_block_mask(mask_mod, B=b, H=None, Q_LEN=s, KV_LEN=s, device=device)
    raise ValueError(f"mask_type must be 'auto', 'dense' or 'flex', got {mask_type!r}")


def packed_collate(batch: list[dict], device=None, mask_type: str = "auto") -> dict:
    """Stack packs into ``tokens``, ``labels``, ``input_pos`` [b, s], the block-causal ``mask`` and the counts.

    Build the mask on the training device (``device="cuda"`` gives a ``BlockMask``); with DataLoader
    workers keep ``device=None`` and call :func:`block_causal_mask` on ``batch["document_ids"]`` after
    moving the batch.
    """
    if not batch:
        raise ValueError("packed_collate got an empty batch")
    lengths = {len(sample["tokens"]) for sample in batch}
    if len(lengths) != 1:
        raise ValueError(f"packed samples must all have the same length (max_seq_len), got lengths {sorted(lengths)}")
    out = {key: torch.stack([torch.as_tensor(s[key], dtype=torch.long) for s in batch]) for key in
           ("tokens", "labels", "input_pos", "document_ids")}
    # the packs' real tokens: the padding after a pack's last document is fed to the model but is no data
    out["num_tokens"] = sum(int(s["num_tokens"]) if "num_tokens" in s else len(s["tokens"]) for s in batch)
    out["num_target_tokens"] = count_target_tokens(out["labels"])
    out["mask"] = block_causal_mask(out["document_ids"], device=device if device is not None else "cpu", mask_type=mask_type)
    return out
