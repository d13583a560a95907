"""A tokenizer from a Hugging Face model folder: ``tokenizer.json`` + ``tokenizer_config.json``.

Text goes through the ``tokenizers`` package; chats through the folder's own Jinja chat template
(``chat_template`` in tokenizer_config.json, or a ``chat_template.jinja`` file).

BOS follows the tokenizer: ``encode`` puts ``bos_token`` first only when the tokenizer's own
post-processor does (``adds_bos``), as ``AutoTokenizer`` would. The template owns BOS in chats, so
rendered chats are tokenized without the post-processor (which would add a second BOS).

Typed text is never a control token: ``encode`` and the messages' contents are tokenized with the
special tokens split as ordinary text (``<|eot_id|>`` typed by a user is text); only the chat
template's own structure produces control tokens.
"""
from __future__ import annotations

import json
import os
from datetime import datetime

from tokenizers import Tokenizer

from torchft.data.tokenizers._base import BaseTokenizer


def _token_text(value):
    # tokenizer_config.json spells special tokens either as a string or as {"content": ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _compile_template(source: str):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = raise_exception
    # Llama 3.x templates write today's date with it (and a fixed date when it is missing), as transformers does.
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class HFTokenizer(BaseTokenizer):
    """Tokenizer of an HF model folder. Build it with :func:`hf_tokenizer`."""

    def __init__(self, model_dir: str, max_seq_len: int | None = None):
        tokenizer_file = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{model_dir}: no tokenizer.json in this folder")
        try:
            self.tokenizer = Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # the tokenizers package raises a bare Exception on bad files
            raise ValueError(f"{tokenizer_file}: not a tokenizers JSON file ({e}); replace it with the model's own "
                             "tokenizer.json (download or copy it again)") from None
        # The same tokenizer with special tokens split as ordinary text: what typed text goes through.
        self._text_tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        self._text_tokenizer.encode_special_tokens = True
        self._special_texts = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        config_file = os.path.join(model_dir, "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_file):
            with open(config_file) as f:
                config = json.load(f)
        self.path = model_dir
        self.max_seq_len = max_seq_len
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_id = self._token_id(self.bos_token, "bos_token")
        self.eos_id = self._token_id(self.eos_token, "eos_token")
        pad_token = _token_text(config.get("pad_token"))
        self.pad_id = self._token_id(pad_token, "pad_token") if pad_token else (self.eos_id or 0)
        self.adds_bos = self._post_processor_adds_bos()
        self.stop_tokens = [self.eos_id] if self.eos_id is not None else []
        gen_file = os.path.join(model_dir, "generation_config.json")
        if os.path.isfile(gen_file):
            with open(gen_file) as f:
                eos = json.load(f).get("eos_token_id")
            for i in eos if isinstance(eos, list) else [eos] if eos is not None else []:
                if i not in self.stop_tokens:
                    self.stop_tokens.append(i)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        template_file = os.path.join(model_dir, "chat_template.jinja")  # where newer folders keep it
        if template is None and os.path.isfile(template_file):
            with open(template_file) as f:
                template = f.read()
        self.chat_template = template
        self._template = _compile_template(template) if template else None

    def _token_id(self, text, field):
        if text is None:
            return None
        token_id = self.tokenizer.token_to_id(text)
        if token_id is None:
            raise ValueError(f"{self.path}: {field} {text!r} is not in the vocabulary of tokenizer.json")
        return token_id

    def _post_processor_adds_bos(self) -> bool:
        """True when the tokenizer itself puts ``bos_token`` in front of a text (its post-processor)."""
        if self.bos_id is None:
            return False
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        processed = self.tokenizer.encode("a", add_special_tokens=True).ids
        return self.bos_id in processed[: len(processed) - len(plain)]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Token ids of ``text`` (special-token strings in it stay text).

        BOS comes first when ``add_bos`` and the tokenizer adds one (``adds_bos``); EOS last when ``add_eos``.
        """
        return self._wrap(self._text_tokenizer.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

    def encode_batch(self, texts, add_bos: bool = True, add_eos: bool = True):
        batch = self._text_tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in batch]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        """The chat template applied to ``messages`` (a string, not yet tokenized)."""
        if self._template is None:
            raise ValueError(
                f"{self.path}: no chat template (neither chat_template in tokenizer_config.json nor "
                "chat_template.jinja); use plain-text prompts (chat=false) or a folder that has one"
            )
        dicts = [{"role": m.role, "content": m.content} for m in messages]
        return self._template.render(
            messages=dicts,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            add_generation_prompt=add_generation_prompt,
        )

    def _tokenize_messages(self, messages, add_eos, add_generation_prompt):
        text = self.render(messages, add_generation_prompt=add_generation_prompt)
        # Character span of each message: where the rendered text grows when it is added. Templates
        # that write a default block (a system header with a date) diverge from the shorter render
        # inside that block; the common prefix is then where the message starts.
        bounds = []
        for i in range(len(messages) + 1):
            try:
                prefix = self.render(messages[:i])
            except Exception:  # some templates refuse an empty conversation
                if i:
                    raise
                prefix = ""
            start = len(os.path.commonprefix([prefix, text]))
            bounds.append(max(start, bounds[-1]) if bounds else start)
        spans = [self._content_span(text, bounds[j], bounds[j + 1], m) for j, m in enumerate(messages)]
        if not add_eos and not add_generation_prompt and spans[-1] is not None:
            # Leave the last message open: cut what the template writes after its content.
            text = text[: spans[-1][1]]
        # Contents that spell a special token are tokenized as text, on their own; the rest of the
        # rendered text (the template's structure) in one piece, as transformers tokenizes it.
        literal = [span for span, m in zip(spans, messages)
                   if span is not None and any(t in m.content for t in self._special_texts)]
        ids, offsets, cursor = [], [], 0
        for start, end in literal + [(len(text), len(text))]:
            for piece, tokenizer, at in ((text[cursor:start], self.tokenizer, cursor),
                                         (text[start:end], self._text_tokenizer, start)):
                if piece:
                    encoding = tokenizer.encode(piece, add_special_tokens=False)
                    ids.extend(encoding.ids)
                    offsets.extend(at + begin for begin, _ in encoding.offsets)
            cursor = end
        mask = []
        for start in offsets:
            owner = next((j for j in range(len(messages)) if bounds[j] <= start < bounds[j + 1]), None)
            mask.append(True if owner is None else messages[owner].masked)
        return ids, mask

    @staticmethod
    def _content_span(text: str, start: int, end: int, message) -> tuple[int, int] | None:
        """Where ``message``'s (trimmed) content sits in ``text[start:end]``, or None when it is not there."""
        content = message.content.strip()
        if not content or end <= start:
            return None
        at = text.rfind(content, start, end)
        return (at, at + len(content)) if at >= 0 else None


def hf_tokenizer(model_dir: str, max_seq_len: int | None = None) -> HFTokenizer:
    """Load the tokenizer of an HF model folder (``tokenizer.json`` + ``tokenizer_config.json``)."""
    return HFTokenizer(model_dir, max_seq_len=max_seq_len)
