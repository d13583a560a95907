"""Packing: per-document positions, block-causal masks, and packed loss == unpacked loss on a real model."""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torchft.data import (
    block_causal_mask,
    build_dataloader,
    chat_dataset,
    pack_dataset,
    packed_collate,
    padded_collate,
    text_completion_dataset,
)

from .conftest import corpus


def _write_chats(folder):
    """30 two-turn chats in ``folder``/chat.jsonl."""
    lines = corpus(60, seed=3)
    rows = [{"messages": [{"role": "user", "content": lines[i]}, {"role": "assistant", "content": lines[i + 1]}]}
            for i in range(0, 60, 2)]
    path = folder / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory, llama3_tok):
    path = _write_chats(tmp_path_factory.mktemp("chat"))
    unpacked = chat_dataset(llama3_tok, "json", str(path), max_seq_len=96)
    packed = chat_dataset(llama3_tok, "json", str(path), max_seq_len=96, packed=True)
    return unpacked, packed


def test_pack_layout(chats, llama3_tok):
    unpacked, packed = chats
    assert packed.packed and len(packed) < len(unpacked)
    assert isinstance(packed.store._arrays["tokens"], np.memmap)  # tokens stay on disk
    seen = 0
    for i in range(len(packed)):
        pack = packed[i]
        first, last = packed.boundaries[i], packed.boundaries[i + 1]
        pos = 0
        for doc, j in enumerate(range(first, last)):
            sample = unpacked[j]
            n = len(sample["tokens"])
            assert pack["tokens"][pos : pos + n].tolist() == sample["tokens"]
            assert pack["input_pos"][pos : pos + n].tolist() == list(range(n))
            assert (pack["document_ids"][pos : pos + n] == doc).all()
            # The first label of each document is masked: nothing predicts across the boundary.
            assert pack["labels"][pos : pos + n].tolist() == [-100] + sample["labels"][1:]
            pos += n
        assert (pack["tokens"][pos:] == llama3_tok.pad_id).all() and (pack["labels"][pos:] == -100).all()
        seen += last - first
    assert seen == len(unpacked)  # every sample is in exactly one pack
    assert packed.stats["packs"] == len(packed) and 0 < packed.stats["pack_fill"] <= 1


def test_packed_batches_count_real_tokens_not_the_pack_padding(chats):
    unpacked, packed = chats
    batch = packed_collate([packed[i] for i in range(len(packed))])
    assert batch["num_tokens"] == sum(len(unpacked[j]["tokens"]) for j in range(len(unpacked)))
    assert batch["num_tokens"] < batch["tokens"].numel()  # the packs end in padding


def test_block_causal_mask_dense_and_flex_agree():
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1]])
    dense = block_causal_mask(document_ids, mask_type="dense")
    expected = torch.zeros(2, 8, 8, dtype=torch.bool)
    for b in range(2):
        for q in range(8):
            for kv in range(q + 1):
                expected[b, q, kv] = bool(document_ids[b, q] == document_ids[b, kv])
    assert torch.equal(dense, expected)
    # The flex_attention BlockMask (used on CUDA) gives the same attention as SDPA with the dense mask.
    from torch.nn.attention.flex_attention import flex_attention

    block = block_causal_mask(document_ids.repeat(1, 16), device="cpu", mask_type="flex")
    ids = document_ids.repeat(1, 16)
    q, k, v = torch.randn(3, 2, 2, 128, 16).unbind(0)
    out_flex = flex_attention(q, k, v, block_mask=block)
    out_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(ids, mask_type="dense")[:, None])
    torch.testing.assert_close(out_flex, out_sdpa, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mask_type must be 'auto', 'dense' or 'flex'"):
        block_causal_mask(document_ids, mask_type="sparse")


def _loss_sum(model, batch):
    logits = model(batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"))
    labels = batch["labels"][:, 1:]  # the recipe's shift: position i predicts label i + 1
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def test_packed_loss_equals_unpacked_loss(chats, llama3_tok):
    from torchft.models._llama import llama

    unpacked, packed = chats
    torch.manual_seed(0)
    model = llama(vocab_size=llama3_tok.vocab_size, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                  intermediate_dim=128, max_seq_len=128).eval()
    with torch.no_grad():
        # Unpacked: every document in its own row (right padding under the causal mask).
        unpacked_sum, unpacked_count = _loss_sum(model, padded_collate([unpacked[i] for i in range(len(unpacked))],
                                                                      pad_id=llama3_tok.pad_id))
        # ... which is the loss of running the documents one by one.
        first = [_loss_sum(model, padded_collate([unpacked[i]])) for i in range(3)]
        row_sums = _loss_sum(model, padded_collate([unpacked[i] for i in range(3)], pad_id=llama3_tok.pad_id))
        torch.testing.assert_close(sum(l for l, _ in first), row_sums[0], atol=1e-4, rtol=1e-6)
        # Packed: documents share rows, separated by the block-causal mask and per-document positions.
        packed_parts = [_loss_sum(model, batch) for batch in build_dataloader(packed, 8, shuffle=False, drop_last=False)]
        packed_sum = sum(l for l, _ in packed_parts)
        assert sum(n for _, n in packed_parts) == unpacked_count
        torch.testing.assert_close(packed_sum / unpacked_count, unpacked_sum / unpacked_count, atol=1e-5, rtol=0)


def test_text_completion_packs_and_pack_dataset(tmp_path, llama3_tok):
    (tmp_path / "c.txt").write_text("\n".join(corpus(40, seed=5)) + "\n")
    ds = text_completion_dataset(llama3_tok, "txt", str(tmp_path / "c.txt"), max_seq_len=64)
    packed = pack_dataset(ds, pad_id=llama3_tok.pad_id)
    direct = text_completion_dataset(llama3_tok, "txt", str(tmp_path / "c.txt"), max_seq_len=64, packed=True)
    assert len(packed) == len(direct) and all(torch.equal(packed[0][k], direct[0][k]) for k in packed[0])
    with pytest.raises(ValueError, match="packed=True needs max_seq_len"):
        text_completion_dataset(llama3_tok, "txt", str(tmp_path / "c.txt"), packed=True)


def test_collate_errors():
    with pytest.raises(ValueError, match="packed samples must all have the same length"):
        packed_collate([{k: torch.zeros(4, dtype=torch.long) for k in ("tokens", "labels", "input_pos", "document_ids")},
                        {k: torch.zeros(5, dtype=torch.long) for k in ("tokens", "labels", "input_pos", "document_ids")}])
    with pytest.raises(ValueError, match="sample 0: 2 tokens but 1 labels"):
        padded_collate([{"tokens": [1, 2], "labels": [1]}])


@pytest.mark.gpu
def test_packed_loss_with_flex_block_mask_on_cuda(tmp_path, llama3_tok, monkeypatch):
    from torch.nn.attention.flex_attention import BlockMask

    from torchft.models._llama import llama
    from torchft.modules import attention

    monkeypatch.setattr(attention, "_compiled_flex_attention", None)  # compiled afresh, whatever ran before

    # packs of 256 tokens: a query shorter than 128 takes flex's decoding kernel instead of the one
    # training uses
    path = str(_write_chats(tmp_path))
    unpacked, packed = (chat_dataset(llama3_tok, "json", path, max_seq_len=256, packed=p) for p in (False, True))
    torch.manual_seed(0)
    model = llama(vocab_size=llama3_tok.vocab_size, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                  intermediate_dim=128, max_seq_len=256).cuda().eval()
    to_cuda = lambda batch: {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad(), warnings.catch_warnings():  # the fused kernel itself, not the unfused fallback
        warnings.filterwarnings("error", message="flex_attention could not be compiled")
        ref_sum, count = _loss_sum(model, to_cuda(padded_collate([unpacked[i] for i in range(len(unpacked))],
                                                               pad_id=llama3_tok.pad_id)))
        parts = []
        for batch in build_dataloader(packed, 8, shuffle=False, drop_last=False, device="cuda"):
            assert isinstance(batch["mask"], BlockMask)
            parts.append(_loss_sum(model, to_cuda(batch)))
    assert sum(n for _, n in parts) == count
    torch.testing.assert_close(sum(l for l, _ in parts) / count, ref_sum / count, atol=2e-5, rtol=0)
