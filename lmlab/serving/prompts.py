"""Loading a checkpoint for generation, and turning chats and completions into prompt tokens."""

from __future__ import annotations

import os
from typing import Any, Literal, Optional, Sequence

import torch

from lmlab.errors import ConfigError

Mode = Literal["auto", "chat", "complete"]


class Prompter:
    """Prompt tokens and stop tokens for one tokenizer.

    Chats are rendered with the tokenizer's chat template. With lmlab's own
    template, each segment is tokenized as SFT tokenized it
    (:func:`lmlab.data.posttrain.chat.tokenize_chat`), so a reply starts on the same token
    boundary the model was trained on; any other template goes through
    ``apply_chat_template``. ``chat`` is False for base models (a ``pretrain``
    checkpoint or a tokenizer without a template): they continue plain text.
    """

    def __init__(self, tokenizer: Any, stage: Optional[str] = None, mode: Mode = "auto"):
        from lmlab.data.posttrain.chat import CHAT_TEMPLATE

        self.tokenizer = tokenizer
        self.template = getattr(tokenizer, "chat_template", None)
        if mode == "chat" and not self.template:
            raise ConfigError("--mode", "the tokenizer has no chat template", "use --mode complete")
        self.chat = bool(self.template) and (mode == "chat" or (mode == "auto" and stage != "pretrain"))
        self.lmlab_template = self.template == CHAT_TEMPLATE

    @property
    def can_chat(self) -> bool:
        return bool(self.template)

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        """Tokens of ``messages`` followed by the assistant's generation prompt."""
        if self.lmlab_template:
            from lmlab.data.posttrain.chat import tokenize_chat

            return tokenize_chat(self.tokenizer, messages, target_start=None, add_generation_prompt=True)[0]
        return list(self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True))

    def completion_ids(self, text: str) -> list[int]:
        """Tokens of a plain-text prompt, with the special tokens the tokenizer itself adds (as transformers
        does, so greedy completions agree with ``transformers serve`` on an HF export)."""
        return list(self.tokenizer(text)["input_ids"])

    def stop_ids(self, chat: bool) -> list[int]:
        """Chat replies end at the end-of-turn token (and EOS); completions at EOS, and at lmlab's end-of-turn
        token where the vocabulary has one: an HF export lists both as ``eos_token_id`` in its
        ``generation_config.json``, so transformers stops there too."""
        if chat and self.lmlab_template:
            from lmlab.data.posttrain.chat import stop_token_ids

            return stop_token_ids(self.tokenizer)
        from lmlab.data.posttrain.chat import END

        eos = self.tokenizer.eos_token_id
        end = self.tokenizer.convert_tokens_to_ids(END) if END in self.tokenizer.get_vocab() else None
        return [int(i) for i in dict.fromkeys((eos, end)) if i is not None]


def load_model(ckpt: str, tokenizer: Optional[str] = None, device: Optional[str] = None,
               quantize: Optional[str] = None):
    """``(model, tokenizer, checkpoint)`` for generation from any checkpoint ``open_checkpoint`` reads."""
    from lmlab.models.checkpoint import open_checkpoint

    source = open_checkpoint(os.path.expanduser(ckpt), "--ckpt")
    tok = source.tokenizer(tokenizer)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = source.causal_lm(device=dev).eval()
    if quantize == "int8":
        from lmlab.serving.quantize import quantize_int8

        if dev.type != "cpu":
            raise ConfigError("--quantize", "int8 dynamic quantization runs on the CPU", "add --device cpu")
        model = quantize_int8(model)
    elif quantize is not None:
        raise ConfigError("--quantize", f"unknown scheme {quantize!r}", "use int8")
    return model, tok, source
