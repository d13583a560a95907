"""The Llama 2 tokenizer: sentencepiece, with Meta's ``[INST]`` chat format.

Chat format, byte for byte as Meta's reference chat code builds it::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]

Each (user, answer) pair is its own ``<s> ... </s>`` block. Prompt and answer are encoded separately so the
mask can split them; sentencepiece's dummy prefix stands for the space after ``[/INST]``, so the ids equal
those of the whole block encoded at once.
"""
from __future__ import annotations

import os

import sentencepiece as spm

from torchft.data.tokenizers._base import BaseTokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class Llama2Tokenizer(BaseTokenizer):
    """Llama 2 tokenizer and chat format. Build it with :func:`llama2_tokenizer`."""

    def __init__(self, path: str, max_seq_len: int | None = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        with open(path, "rb") as f:
            head = f.read(64)
        try:
            self.sp_model = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            hint = ""
            if head[:1].isalnum() and b" " in head:
                hint = " (it looks like a Llama 3 tiktoken ranks file: load it with llama3_tokenizer)"
            raise ValueError(f"{path}: not a sentencepiece model{hint}") from e
        self.path = path
        self.max_seq_len = max_seq_len
        self.vocab_size = self.sp_model.vocab_size()
        self.bos_id = self.sp_model.bos_id()
        self.eos_id = self.sp_model.eos_id()
        # Llama 2 has no pad token; id 0 (<unk>) pads, and padded positions always carry label -100.
        self.pad_id = self.sp_model.pad_id() if self.sp_model.pad_id() >= 0 else 0
        self.stop_tokens = [self.eos_id]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Token ids of ``text``; BOS/EOS added here only (never twice)."""
        return self._wrap(self.sp_model.encode(text), add_bos, add_eos)

    def encode_batch(self, texts, add_bos: bool = True, add_eos: bool = True, num_threads: int = 8):
        batch = self.sp_model.encode(list(texts), num_threads=num_threads)
        return [self._wrap(ids, add_bos, add_eos) for ids in batch]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; with ``skip_special_tokens=False`` control tokens appear as ``<s>``/``</s>``."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.sp_model.decode(ids)
        # Decode runs of ordinary pieces; control pieces are written out as their text.
        out, run = [], []
        for i in ids:
            if self.sp_model.is_control(i):
                out.append(self.sp_model.decode(run))
                out.append(self.sp_model.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self.sp_model.decode(run))
        return "".join(out)

    def _tokenize_messages(self, messages, add_eos, add_generation_prompt):
        messages = list(messages)
        system = None
        if messages[0].role == "system":
            system, messages = messages[0], messages[1:]
        tokens: list[int] = []
        mask: list[bool] = []
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message.role != expected:
                raise ValueError(
                    f"Llama 2 chat format: message {i + (system is not None)} has role {message.role!r} "
                    f"where {expected!r} is expected (user/assistant turns alternate after an optional system)"
                )
            last = i == len(messages) - 1
            if expected == "user":
                content = message.content.strip()
                if i == 0 and system is not None:
                    content = B_SYS + system.content.strip() + E_SYS + content
                ids = [self.bos_id, *self.sp_model.encode(f"{B_INST} {content} {E_INST}")]
            else:
                # The dummy prefix encodes the space between [/INST] and the answer.
                ids = self.sp_model.encode(f"{message.content.strip()} ")
                if add_eos or add_generation_prompt or not last:
                    ids.append(self.eos_id)
            tokens.extend(ids)
            mask.extend([message.masked] * len(ids))
        if system is not None and not messages:
            raise ValueError("Llama 2 chat format: a system message needs a user message after it")
        return tokens, mask


def llama2_tokenizer(path: str, max_seq_len: int | None = None) -> Llama2Tokenizer:
    """Load a Llama 2 tokenizer from a sentencepiece ``tokenizer.model``."""
    return Llama2Tokenizer(path, max_seq_len=max_seq_len)
