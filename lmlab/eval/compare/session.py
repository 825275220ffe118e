"""Generate the responses of every model (cached in the store) and build the pairs to judge."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from lmlab.errors import ConfigError
from lmlab.eval.compare.pairs import Generator, Pair, Prompt, build_pairs, check_model_name
from lmlab.eval.compare.store import JudgmentStore

log = logging.getLogger(__name__)

__all__ = ["prepare_pairs"]


def prepare_pairs(
    store: JudgmentStore,
    generators: Mapping[str, Generator],
    prompts: Sequence[Prompt],
    seed: int = 0,
    sources: Mapping[str, str] | None = None,
    render: Callable[[Prompt], str] | None = None,
    chunk_size: int = 64,
) -> list[Pair]:
    """Responses of each model to each prompt, then all pairs, stored in ``store``; returns the pairs in judging order.

    A generator is called only for prompts whose response is not cached, in
    chunks of ``chunk_size`` that are stored as they finish, so a crash during
    generation keeps what was done. ``sources`` records what each name was
    generated from (a checkpoint path); ``render`` turns a prompt into the
    generator's input (default: its text). A generator with a ``close()``
    method is closed once its responses are stored.
    """
    if len(generators) < 2:
        raise ConfigError("--model", f"need at least two models to compare, got {len(generators)}", "give --a and --b (and more with --model)")
    if chunk_size < 1:
        raise ConfigError("chunk_size", f"must be >= 1, got {chunk_size}")
    render = render or (lambda p: p.text)
    responses: dict[str, dict[str, str]] = {}
    for name, generate in generators.items():
        check_model_name(name)
        store.register_model(name, (sources or {}).get(name, ""))
        cached = store.responses(name)
        todo = [p for p in prompts if p.id not in cached]
        if todo:
            log.info("generating %d responses with %s (%d cached)", len(todo), name, len(prompts) - len(todo))
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            texts = generate([render(p) for p in chunk])
            if not isinstance(texts, (list, tuple)) or len(texts) != len(chunk) or not all(isinstance(t, str) for t in texts):
                raise ConfigError("--model", f"{name} returned {type(texts).__name__} for {len(chunk)} prompts", "a generator must return one string per prompt")
            new = {p.id: t for p, t in zip(chunk, texts)}
            store.put_responses(name, new)
            cached.update(new)
        close = getattr(generate, "close", None)
        if callable(close):  # free one model's memory before loading the next
            close()
        responses[name] = {p.id: cached[p.id] for p in prompts}
    return store.sync_pairs(build_pairs(prompts, responses, seed))
