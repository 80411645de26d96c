"""Prompt rendering: the model's chat template when it has one, plain text otherwise."""

from __future__ import annotations


def render_prompt(tokenizer, text: str, chat: bool = True, answer_prefix: str = "") -> str:
    """The text to tokenize (without adding special tokens) for a user message.

    With a chat template, ``text`` becomes the user turn and ``answer_prefix`` starts the
    assistant turn; otherwise the tokenizer's BOS token (if any) is prepended.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return rendered + answer_prefix
    bos = tokenizer.bos_token or ""
    return f"{bos}{text}{answer_prefix}"
