"""What all torchft tokenizers share: the BOS/EOS rules and truncation to ``max_seq_len``."""
from __future__ import annotations

from torchft.data.messages import Message, as_messages


class BaseTokenizer:
    """Common behaviour; subclasses implement ``encode``, ``decode`` and ``_tokenize_messages``.

    ``tokenize_messages`` truncates to ``max_seq_len`` when ``truncate=True`` (the default); datasets pass
    ``truncate=False`` and truncate (or drop) themselves so every cut sample is counted.
    """

    bos_id: int
    eos_id: int
    pad_id: int
    stop_tokens: list[int]
    vocab_size: int
    max_seq_len: int | None = None
    # Whether plain text starts with BOS (``encode(add_bos=True)``): the policy of the model's own
    # tokenizer. Meta's Llama 2 and 3 tokenizers add it; an HF tokenizer says so by its post-processor.
    adds_bos: bool = True

    def tokenize_messages(
        self,
        messages: list[Message],
        add_eos: bool = True,
        *,
        add_generation_prompt: bool = False,
        truncate: bool = True,
    ) -> tuple[list[int], list[bool]]:
        """Tokens of a conversation in this tokenizer's chat format, and a mask (True = not trained on).

        ``add_eos=False`` leaves the last message open (no end-of-turn token); ``add_generation_prompt=True``
        closes the last message (whatever ``add_eos`` says) and appends the header that asks the model for
        an assistant turn (for generation), as the model's official chat template does.
        """
        tokens, mask = self._tokenize_messages(as_messages(messages), add_eos, add_generation_prompt)
        if truncate and self.max_seq_len is not None:
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        return tokens, mask

    def _tokenize_messages(self, messages, add_eos, add_generation_prompt):
        raise NotImplementedError

    def encode_batch(self, texts: list[str], add_bos: bool = True, add_eos: bool = True) -> list[list[int]]:
        """``encode`` over many texts; tokenizers with a parallel backend override it."""
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        # The single place where BOS/EOS are added to plain text: never twice.
        if add_bos and self.adds_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids
