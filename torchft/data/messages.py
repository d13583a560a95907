"""Chat messages: the unit every chat format and dataset speaks.

A conversation is a list of :class:`Message`. ``masked=True`` means "not trained on": its tokens get the
label -100. Datasets set it from ``train_on_input`` (prompts masked, answers trained on).
"""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "ipython")


@dataclass
class Message:
    """One turn of a conversation.

    Args:
        role: one of ``system``, ``user``, ``assistant``, ``ipython`` (tool output).
        content: the text of the turn.
        masked: True when the turn's tokens are not trained on (labels -100).
    """

    role: str
    content: str
    masked: bool = False

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"message role {self.role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise ValueError(f"message content must be a string, got {type(self.content).__name__}")


def as_messages(messages) -> list[Message]:
    """Accept Message objects or ``{"role", "content"[, "masked"]}`` dicts; returns Messages."""
    out = []
    for m in messages:
        if isinstance(m, Message):
            out.append(m)
        elif isinstance(m, dict):
            out.append(Message(m["role"], m["content"], bool(m.get("masked", False))))
        else:
            raise ValueError(f"expected a Message or a dict with role/content, got {type(m).__name__}")
    if not out:
        raise ValueError("a conversation needs at least one message")
    return out
