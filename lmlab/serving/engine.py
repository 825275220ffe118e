"""Continuous batching over one KV cache: the decoding engine behind ``lmlab chat`` and ``lmlab serve``.

Every active sequence owns one row of a preallocated :class:`KVCache`. All
rows share the cache's write column (as in :func:`~lmlab.models.generation.generate`,
prompts are right-aligned on it and left padding is masked out), while each
row keeps its own position ids, so a row's logits equal those of the same
prompt decoded alone.

Between decode steps the scheduler

* drops rows that finished (or whose client went away), moving the last row
  into the hole so active rows stay contiguous and a step computes only them;
* admits waiting requests: their prompts are prefilled together in a
  separate cache and copied into free rows, ending on the shared column.
  When a prompt is longer than the column, or the cache would overflow,
  the rows are first shifted left past the padding they all share.

Sampling is per request (temperature, top-k, top-p, seed), with the same
arithmetic as ``generate``, so greedy outputs match it token for token.

With ``compile=True`` the decode step runs through ``torch.compile`` (dynamic
shapes: the batch and the attended span change every step). Inductor fuses the
norms, rotary embedding and elementwise ops of the small per-token graph, which
eager mode runs op by op. The compile happens in the constructor, on dummy rows
(a warm-up no request waits for), and the step always runs at least two rows
(a spare free row when one is active) so a lone sequence does not trigger the
size-1 specialization and a second compile mid-serving. Compiled kernels sum
in another order than eager ones, so logits can differ in the last bits from
``generate``; greedy outputs agree unless two tokens tie that closely.

On the CPU (on a GPU the compiled step is the plain model) the compiled step
multiplies with Linear weights packed once for MKL (:mod:`lmlab.serving.packed`;
at serving batch sizes an unpacked GEMM spends about as long repacking the
weight on every call as multiplying), runs with inductor's freezing (weights
as graph constants, which the packed GEMM needs) and C++ wrapper (kernels
launched from C++, not from generated Python), and writes one-token attention
as reductions that inductor fuses (:mod:`lmlab.serving.decode_attention`);
these sum in other orders again, within the same last-bits tolerance.

Sliding-window models keep the full-length cache here and apply the window in
the attention mask (a row's tokens occupy contiguous columns, so column
distance is token distance); linear-attention models are refused.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.models.generation import filter_logits, left_pad
from lmlab.models.transformer import KVCache
from lmlab.serving.decode_attention import use_reduction_decode_attention
from lmlab.serving.packed import pack_linears, shared_copy

__all__ = ["SamplingParams", "GenerationRequest", "Engine", "QueueFull"]


class QueueFull(RuntimeError):
    """More requests are waiting than the engine accepts."""


@dataclass
class SamplingParams:
    """How one sequence is sampled. ``temperature=0`` is greedy decoding."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Sequence[str] = ()
    seed: Optional[int] = None


@dataclass
class GenerationRequest:
    """One sequence to generate; the engine calls ``on_event(request, delta_text)`` as text arrives
    and once more with ``delta_text=None`` when it has finished (``finish_reason`` set).

    Attributes:
        prompt_ids: Token ids of the prompt.
        params: Sampling settings.
        stop_ids: Token ids that end the sequence (not part of the text).
        token_ids: Generated token ids so far (a stop token included).
        text: The text sent so far.
        finish_reason: ``stop``, ``length`` or ``cancelled`` once finished.
    """

    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: Sequence[int] = ()
    on_event: Optional[Callable[["GenerationRequest", Optional[str]], None]] = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    # decoding state owned by the engine
    _generator: Optional[torch.Generator] = None
    _pos: int = 0
    _start: int = 0
    _last: int = 0
    # incremental detokenization: text of token_ids[:_read], and where the window decoded each step begins
    _decoded: str = ""
    _prefix: int = 0
    _read: int = 0

    def cancel(self) -> None:
        """Ask the engine to drop this sequence before its next step (e.g. the client disconnected)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _frozen(compiled: Callable) -> Callable:
    """Call ``compiled`` with inductor's freezing and C++ wrapper on. Freezing makes the weights graph
    constants, which inductor needs to call the packed GEMM of :mod:`lmlab.serving.packed` (Dynamo reads the
    flag when it traces, so it is set around every call, not given as a compile option). The C++ wrapper
    launches the step's ~40 kernels from C++ instead of generated Python (about a tenth less CPU per token
    at 16 rows on the CPU)."""
    import torch._inductor.config as inductor_config

    def call(*args, **kwargs):
        with inductor_config.patch(freezing=True, cpp_wrapper=True):
            return compiled(*args, **kwargs)

    return call


class Engine:
    """Continuous-batching decoder for one :class:`~lmlab.models.CausalLM` (see the module docstring).

    Args:
        model: The model (put in eval mode).
        tokenizer: Its tokenizer (decodes the generated text).
        max_batch: Sequences decoded together (rows of the KV cache).
        max_queue: Requests allowed to wait for a row; :meth:`submit` raises :class:`QueueFull` beyond it.
        on_step: Called with no arguments after every scheduler iteration (its events have all been sent
            through ``on_event``): a server hands the iteration's events to its event loop in one go.
        compile: Compile the decode step with ``torch.compile`` (see the module docstring); ignored when
            ``max_batch`` is 1, which has no spare row.
        pack: With ``compile`` on the CPU, decode through a copy of the model whose Linear weights are packed
            once for MKL for steps of ``max_batch`` rows (:mod:`lmlab.serving.packed`; float32 only).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_batch: int = 16, max_queue: int = 256,
                 compile: bool = False, pack: bool = True, on_step: Optional[Callable[[], None]] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        if self.config.attention == "linear":
            # rows are shifted and copied column by column; a recurrent state has no columns
            raise ConfigError("model.config.attention", "the serving engine cannot batch linear attention "
                              "(it keeps a recurrent state, not a per-position KV cache)",
                              "serve a full or sliding_window model, or decode with lmlab.models.generate")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.capacity = model.config.max_seq_len
        param = next(model.parameters())
        self.device = param.device
        dtype = param.dtype if param.is_floating_point() else torch.float32
        self.cache = KVCache.allocate(self.config, max_batch, self.capacity, self.device, dtype)
        self.mask = torch.zeros((max_batch, self.capacity), dtype=torch.long, device=self.device)
        self.length = 0  # the shared write column
        self.rows: list[GenerationRequest] = []
        self.waiting: deque[GenerationRequest] = deque()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # a tokenizer that cleans up spaces (" ." -> ".") can decode a window differently from the whole text
        self.incremental = not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._decode_ids = self._window_decoder(tokenizer)
        self._lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.steps = 0
        self.max_rows_seen = 0
        self.on_step = on_step
        self.finished: dict[str, int] = {}  # finish reason -> sequences
        self.compiled = compile and max_batch > 1
        # the model every step runs; self.model stays as given (generate() and callers use it unchanged)
        self._run_model = self._decode_model = self.model
        if self.compiled and self.device.type != "cpu":
            # the CPU measures below do not apply (no MKL packing; SDPA's GPU kernels are fused already)
            self._decode_model = torch.compile(self.model, dynamic=True)
            self._warm_up()
        elif self.compiled:
            # packed for full decode steps (max_batch rows); other row counts (prefill, fewer rows) multiply
            # unpacked, as eager does
            # the step's own module tree (every parameter shared): packing and the attention swap change only it
            self._run_model = shared_copy(self.model)
            if pack:
                pack_linears(self._run_model, max_batch)
            # only the one-token cached step changes; prefill (several tokens) stays the plain attention
            use_reduction_decode_attention(self._run_model)
            self._decode_model = _frozen(torch.compile(self._run_model, dynamic=True))
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile the decode step on dummy rows at a few shapes, then clear the cache they wrote."""
        started = time.perf_counter()
        with torch.inference_mode():
            for n, floor, length in ((2, 0, 2), (3, 1, 5), (2, 2, 9)):
                self.mask[:n, floor : length + 1] = 1
                self._decode(torch.zeros((n, 1), dtype=torch.long, device=self.device),
                             torch.zeros((n, 1), dtype=torch.long, device=self.device), n, floor, length)
            for t in self.cache.keys + self.cache.values:
                t.zero_()
            self.mask.zero_()
        self.warm_up_seconds = time.perf_counter() - started

    # -- submitting ----------------------------------------------------------------------------
    def check(self, prompt_len: int, max_tokens: int) -> Optional[str]:
        """Why a request of this size can never run (None if it can)."""
        if prompt_len < 1:
            return "the prompt is empty"
        if prompt_len + max_tokens > self.capacity:
            return (f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                    f"of {self.capacity} tokens")
        return None

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        """Queue ``request``; raises ``ValueError`` when it can never fit and :class:`QueueFull` when full."""
        problem = self.check(len(request.prompt_ids), request.params.max_tokens)
        if problem:
            raise ValueError(problem)
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(request)
            self._lock.notify()
        return request

    def run_until_done(self, request: GenerationRequest) -> GenerationRequest:
        """Submit and decode ``request`` in the calling thread (no scheduler thread; used by ``lmlab chat``)."""
        self.submit(request)
        while not request.done:
            self.step()
            if self.on_step is not None:
                self.on_step()
        return request

    # -- the scheduler thread ------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Run the scheduler in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="lmlab-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.waiting and not self.rows:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a failed step must not hang the clients
                for r in list(self.rows) + list(self.waiting):
                    r.finish_reason = "error"
                    r.text += f"[engine error: {e}]"
                    self._emit(r, None)
                self.rows, self.waiting, self.length = [], deque(), 0
                self.mask.zero_()
            if self.on_step is not None:
                self.on_step()

    # -- one scheduler iteration ---------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Drop finished rows, admit waiting requests, then decode one token for every row."""
        self._retire()
        self._admit()
        self._retire()  # a request can finish on its first token
        if not self.rows:
            return
        n, L = len(self.rows), self.length
        # columns left of the earliest row start are padding for every row: attention skips them
        floor = min(r._start for r in self.rows)
        last = [r._last for r in self.rows]
        pos = [r._pos for r in self.rows]
        if self.compiled and n == 1:
            # a spare free row (mask all zero; it sees only its own dummy token) keeps the compiled shapes
            last, pos = last + [self.pad_id], pos + [0]
        tokens = torch.tensor(last, device=self.device)[:, None]
        positions = torch.tensor(pos, device=self.device)[:, None]
        self.mask[:n, L] = 1
        logits = self._decode(tokens, positions, len(last), floor, L)[:n]
        self.length = L + 1
        self.steps += 1
        tokens = self._sample_rows(self.rows, logits)
        for r, token in zip(self.rows, tokens):
            r._pos += 1
            self._accept(r, token)

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, n: int, floor: int, length: int) -> torch.Tensor:
        """Last-position logits of rows ``:n``, whose cache holds columns ``floor:length``."""
        view = KVCache([k[:n, :, floor:] for k in self.cache.keys], [v[:n, :, floor:] for v in self.cache.values],
                       length - floor)
        mask = self.mask[:n, floor : length + 1]
        return self._decode_model(tokens, position_ids=positions, attention_mask=mask, cache=view)[:, -1]

    def _sample_rows(self, rows: list[GenerationRequest], logits: torch.Tensor) -> list[int]:
        """One token per row: greedy rows share one argmax over the batch, sampled rows draw on their own."""
        logits = logits.float()[:, : self.config.vocab_size]
        greedy = logits.argmax(-1).tolist()
        return [greedy[i] if r.params.temperature <= 0 else self._sample(r, logits[i]) for i, r in enumerate(rows)]

    def _sample(self, r: GenerationRequest, logits: torch.Tensor) -> int:
        p = r.params
        scaled = logits / p.temperature
        probs = F.softmax(filter_logits(scaled[None], p.top_k, p.top_p), -1)
        return int(torch.multinomial(probs, 1, generator=r._generator)[0, 0])

    def _accept(self, r: GenerationRequest, token: int) -> None:
        """Record a sampled token, send the new text, and finish on a stop token, stop string or length."""
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        r.token_ids.append(token)
        r._last = token
        if token in r.stop_ids:
            r.finish_reason = "stop"
        elif len(r.token_ids) >= r.params.max_tokens:
            r.finish_reason = "length"
        n = len(r.token_ids) - (r.finish_reason == "stop")
        if r.finish_reason is not None or not self.incremental:
            # the final text is the decode of all generated tokens, whatever the windows gave
            full = self.tokenizer.decode(r.token_ids[:n], skip_special_tokens=True)
        else:
            full = self._decode_window(r, n)
        for s in r.params.stop:
            cut = full.find(s, max(0, len(r.text) - len(s)))
            if s and cut >= 0:
                full, r.finish_reason = full[:cut], "stop"
        if r.finish_reason is None:
            # hold back an incomplete UTF-8 character and anything that may begin a stop string
            full = full.rstrip("\ufffd")
            hold = max((k for s in r.params.stop for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
            full = full[: len(full) - hold]
        if len(full) > len(r.text) and full.startswith(r.text):
            delta, r.text = full[len(r.text):], full
            self._emit(r, delta)
        if r.finish_reason is not None:
            self._emit(r, None)

    @staticmethod
    def _window_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
        """``ids -> text`` without special tokens. A transformers fast tokenizer that does not clean up spaces
        (and whose class keeps transformers' own decoding) decodes with its ``tokenizers`` backend alone;
        calling the backend directly skips a per-call conversion of the ids that costs several times the
        decode itself (it runs twice per token)."""
        try:
            from tokenizers import Tokenizer
            from transformers import PreTrainedTokenizerFast as Fast
        except ImportError:  # pragma: no cover - both are dependencies
            return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        backend = getattr(tokenizer, "_tokenizer", None)
        cls = type(tokenizer)
        plain = isinstance(tokenizer, Fast) and cls.decode is Fast.decode and cls._decode is Fast._decode
        if plain and isinstance(backend, Tokenizer) and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            return lambda ids: backend.decode(ids, skip_special_tokens=True)
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_window(self, r: GenerationRequest, n: int) -> str:
        """The text of ``r.token_ids[:n]`` decoded a few tokens at a time (a full decode every token costs
        time quadratic in the length); the window restarts on the last token boundary that ended on a whole
        character, and its first tokens are decoded twice so a tokenizer's leading-space rule cancels out."""
        ids = r.token_ids
        decode = self._decode_ids
        before = decode(ids[r._prefix : r._read]) if r._read > r._prefix else ""
        now = decode(ids[r._prefix : n])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            r._decoded += now[len(before):]
            r._prefix, r._read = r._read, n
        return r._decoded

    def _emit(self, r: GenerationRequest, delta: Optional[str]) -> None:
        if delta is None:
            self.finished[r.finish_reason] = self.finished.get(r.finish_reason, 0) + 1
        if r.on_event is not None:
            r.on_event(r, delta)

    def _retire(self) -> None:
        i = 0
        while i < len(self.rows):
            r = self.rows[i]
            if r.done or r.cancelled:
                if r.cancelled and not r.done:
                    r.finish_reason = "cancelled"
                    self._emit(r, None)
                last = len(self.rows) - 1
                if i != last:  # keep active rows contiguous: move the last one into the hole
                    for t in self.cache.keys + self.cache.values:
                        t[i] = t[last]
                    self.mask[i] = self.mask[last]
                    self.rows[i] = self.rows[last]
                self.mask[last] = 0
                self.rows.pop()
            else:
                i += 1
        if not self.rows:
            self.length = 0

    def _shift(self, delta: int) -> None:
        """Move every row's cache ``delta`` columns (left when negative). Only the columns some row uses move
        (the whole cache would be megabytes per layer); the mask of the columns they leave is cleared."""
        if delta == 0:
            return
        n, L = len(self.rows), self.length
        lo = min((r._start for r in self.rows), default=L)
        if n and lo < L:
            for t in self.cache.keys + self.cache.values:  # (rows, heads, columns, head_dim)
                t[:n, :, lo + delta : L + delta] = t[:n, :, lo:L].clone()
            self.mask[:n, lo + delta : L + delta] = self.mask[:n, lo:L].clone()
            if delta < 0:
                self.mask[:n, max(L + delta, lo) : L] = 0
            else:
                self.mask[:n, lo : min(lo + delta, L)] = 0
        for r in self.rows:
            r._start += delta
        self.length += delta

    def _admit(self) -> None:
        with self._lock:
            while self.waiting and self.waiting[0].cancelled:
                r = self.waiting.popleft()
                r.finish_reason = "cancelled"
                self._emit(r, None)
            if not self.waiting or len(self.rows) >= self.max_batch:
                return
            free = self.max_batch - len(self.rows)
            # compact first: the columns every row pads with are free to reuse
            floor = min((r._start for r in self.rows), default=self.length)
            base = self.length - floor
            need = max((r.params.max_tokens - len(r.token_ids) for r in self.rows), default=0)
            batch: list[GenerationRequest] = []
            width = 0
            for r in list(self.waiting)[:free]:
                w = max(width, base, len(r.prompt_ids))
                if w + max(need, r.params.max_tokens - 1) > self.capacity:
                    break
                batch.append(r)
                width, need = max(width, len(r.prompt_ids)), max(need, r.params.max_tokens - 1)
            for _ in batch:
                self.waiting.popleft()
        if not batch:
            return
        self._shift(-floor)
        self._shift(max(width - self.length, 0) if self.rows else 0)
        if not self.rows:
            self.length = width
        self._prefill(batch)

    def _prefill(self, batch: list[GenerationRequest]) -> None:
        ids, attn = left_pad([r.prompt_ids for r in batch], self.pad_id, self.device)
        k, P = ids.shape
        cache = KVCache.allocate(self.config, k, P, self.device, self.cache.keys[0].dtype)
        positions = (attn.cumsum(1) - 1).clamp(min=0)
        logits = self._run_model(ids, position_ids=positions, attention_mask=attn, cache=cache)[:, -1]
        n, L = len(self.rows), self.length
        for src, dst in zip(cache.keys + cache.values, self.cache.keys + self.cache.values):
            dst[n : n + k, :, L - P : L] = src
        self.mask[n : n + k] = 0
        self.mask[n : n + k, L - P : L] = attn
        for r in batch:
            r._start = L - len(r.prompt_ids)
            r._pos = len(r.prompt_ids)
            if r.params.seed is not None:
                r._generator = torch.Generator(device=self.device).manual_seed(int(r.params.seed))
            self.rows.append(r)
            self.max_rows_seen = max(self.max_rows_seen, len(self.rows))
        for r, token in zip(batch, self._sample_rows(batch, logits)):
            self._accept(r, token)
