"""``lmlab chat``: talk to a checkpoint in the terminal."""

from __future__ import annotations

import sys
from typing import Literal, Optional

from lmlab.errors import ConfigError

HELP = "commands: /reset clears the conversation, /quit leaves (so does end of input)"


def fit_history(prompter, system: Optional[str], turns: list[dict], max_tokens: int, capacity: int):
    """``(prompt ids, dropped turn count)``: the newest turns whose prompt leaves room for ``max_tokens``."""
    dropped = 0
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + turns[dropped:]
        ids = prompter.chat_ids(messages)
        if len(ids) + max_tokens <= capacity or len(turns) - dropped <= 1:
            return ids, dropped
        dropped += 2  # a user turn and the reply to it


def chat(
    ckpt: str,
    tokenizer: Optional[str] = None,
    max_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 0,
    seed: Optional[int] = None,
    system: Optional[str] = None,
    mode: Literal["auto", "chat", "complete"] = "auto",
    device: Optional[str] = None,
    quantize: Optional[Literal["int8"]] = None,
) -> int:
    """Chat with a checkpoint in the terminal, streaming the reply as it is generated.

    Reads one message per line from stdin. Chat models keep the conversation
    (the oldest turns are dropped, with a notice, when it outgrows the context);
    base models (a pretrain checkpoint or a tokenizer without a chat template)
    continue each line as plain text. ``/reset`` clears the conversation,
    ``/quit`` (or end of input) leaves.

    Args:
        ckpt: Lightning .ckpt, lmlab export or HF export directory.
        tokenizer: Tokenizer directory (default: the one the checkpoint records or has beside it).
        max_tokens: Most tokens per reply.
        temperature: Sampling temperature (0: greedy).
        top_p: Nucleus sampling mass.
        top_k: Sample among the k likeliest tokens (0: all).
        seed: Seed of the sampler (default: random).
        system: A system message that starts every conversation.
        mode: chat, complete (plain text continuation) or auto (chat unless the model is a base model).
        device: cpu, cuda, ... (default: cuda when available).
        quantize: int8: dynamic int8 quantization of the Linear layers (CPU).
    """
    import torch

    from lmlab.serving.engine import Engine, GenerationRequest, SamplingParams
    from lmlab.serving.prompts import Prompter, load_model

    if max_tokens < 1:
        raise ConfigError("--max_tokens", f"must be at least 1, got {max_tokens}", "e.g. --max_tokens 256")
    model, tok, source = load_model(ckpt, tokenizer, device, quantize)
    prompter = Prompter(tok, source.stage, mode)
    capacity = model.config.max_seq_len
    if max_tokens >= capacity:
        raise ConfigError("--max_tokens", f"{max_tokens} leaves no room for a prompt in a context of {capacity}",
                          f"use at most {capacity // 2}")
    engine = Engine(model, tok, max_batch=1, max_queue=1)
    generator_seed = seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    out = sys.stdout
    kind = "chat" if prompter.chat else "completion (base model: each line is continued as plain text)"
    print(f"lmlab chat: {source.path} [{kind}]; {HELP}", file=out, flush=True)
    turns: list[dict] = []
    n = 0
    for line in sys.stdin:
        text = line.rstrip("\n")
        if text.strip() in ("/quit", "/exit"):
            break
        if text.strip() == "/reset":
            turns = []
            print("[conversation cleared]", file=out, flush=True)
            continue
        if not text.strip():
            continue
        if prompter.chat:
            turns.append({"role": "user", "content": text})
            ids, dropped = fit_history(prompter, system, turns, max_tokens, capacity)
            if dropped:
                turns = turns[dropped:]
                print(f"[dropped the {dropped} oldest messages to fit the context of {capacity} tokens]", file=out, flush=True)
            stop = prompter.stop_ids(True)
        else:
            ids, stop = prompter.completion_ids(text), prompter.stop_ids(False)
        budget = min(max_tokens, capacity - len(ids))
        if budget < 1:
            print(f"[message too long: {len(ids)} tokens; the context holds {capacity}]", file=out, flush=True)
            if prompter.chat:
                turns.pop()
            continue
        params = SamplingParams(max_tokens=budget, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=generator_seed + n)
        n += 1
        req = GenerationRequest(ids, params, stop_ids=stop,
                                on_event=lambda r, d: d is not None and (out.write(d), out.flush()))
        print("assistant> " if prompter.chat else f"{text}", end="", file=out, flush=True)
        engine.run_until_done(req)
        print(file=out, flush=True)
        if prompter.chat:
            turns.append({"role": "assistant", "content": req.text})
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``lmlab chat``."""
    from lmlab.verbs import run

    return run("lmlab chat", chat, argv)
