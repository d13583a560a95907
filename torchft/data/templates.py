"""Instruct templates: how an (instruction, input) row becomes the text of the user turn."""
from __future__ import annotations

# The Alpaca prompt, with and without an input; the answer follows "### Response:\n".
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_instruct(template: str | None, instruction: str, input: str | None) -> str:
    """The user turn for one instruct row.

    ``template`` is None (instruction, then a blank line and the input if any), ``"alpaca"``, or a format
    string using ``{instruction}`` and ``{input}``.
    """
    has_input = bool(input and input.strip())
    if template is None:
        return f"{instruction}\n\n{input}" if has_input else instruction
    if template == "alpaca":
        return (ALPACA_WITH_INPUT if has_input else ALPACA_NO_INPUT).format(instruction=instruction, input=input)
    try:
        return template.format(instruction=instruction, input=input or "")
    except (KeyError, IndexError) as e:
        raise ValueError(f"instruct template {template!r} uses an unknown field {e}; use {{instruction}} and {{input}}") from None
