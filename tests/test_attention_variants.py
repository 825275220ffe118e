"""Sliding-window and linear attention: the masks, the two linear forms, caches, counts, training paths."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from helpers import LossRecorder, make_trainer
from lmlab.errors import ConfigError
from lmlab.models import CausalLM, TransformerConfig, generate
from lmlab.models.attention import (
    LinearStateCache,
    RingKVCache,
    allocate_cache,
    linear_attention_chunked,
    linear_attention_recurrent,
    local_attention,
)
from lmlab.models.counting import attention_span, count_params, flops_per_token
from lmlab.models.generation import left_pad

pytestmark = pytest.mark.usefixtures("single_thread")

SLIDING = dict(attention="sliding_window", sliding_window=5)
LINEAR = dict(attention="linear", linear_chunk_size=4)


def make(seed=0, **kw) -> CausalLM:
    torch.manual_seed(seed)
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=96)
    model = CausalLM(TransformerConfig(**{**base, **kw})).eval()
    with torch.no_grad():  # large weights: a wrong mask or state changes the logits visibly
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


# -- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, field, text", [
    (dict(attention="sliding_window"), "sliding_window", "positive"),
    (dict(attention="sliding_window", sliding_window=0), "sliding_window", "positive"),
    (dict(sliding_window=8), "sliding_window", "attention: sliding_window"),
    (dict(attention="flash"), "attention", "full, sliding_window or linear"),
    (dict(attention="linear", linear_chunk_size=0), "linear_chunk_size", "positive"),
])
def test_bad_attention_settings_are_one_line_errors(kw, field, text):
    with pytest.raises(ConfigError) as e:
        TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, **kw)
    msg = str(e.value)
    assert f"model.config.{field}" in msg and text in msg and "\n" not in msg


# -- sliding window ----------------------------------------------------------------------------------
def _reference_window_attention(q, k, v, W, doc_ids=None, key_padding=None):
    """Materialised scores with Mistral's mask: key j visible to query i iff i - W < j <= i."""
    T = q.shape[2]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = ((j <= i) & (j > i - W))[None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    if key_padding is not None:
        allowed = allowed & key_padding.bool()[:, None, :]
    allowed = allowed | (i == j)[None]
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("W", [1, 3, 8, 40])
def test_block_local_attention_equals_the_materialised_window_mask(W):
    g = torch.Generator().manual_seed(W)
    q, k, v = (torch.randn(2, 3, 37, 8, generator=g, dtype=torch.float64) for _ in range(3))
    docs = torch.tensor([[0] * 12 + [1] * 25, [0] * 3 + [1] * 30 + [2] * 4])
    pad = torch.ones(2, 37, dtype=torch.long)
    pad[1, :6] = 0
    for d, p in ((None, None), (docs, None), (docs, pad)):
        ours = local_attention(q, k, v, W, d, p)
        ref = _reference_window_attention(q, k, v, W, d, p)
        assert torch.allclose(ours, ref, atol=1e-12), (W, (ours - ref).abs().max())


def test_a_window_as_long_as_the_sequence_is_full_attention_and_a_short_one_limits_the_reach():
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(0))
    full = make(n_kv_heads=2)
    wide = make(n_kv_heads=2, attention="sliding_window", sliding_window=30)
    narrow = make(n_kv_heads=2, attention="sliding_window", sliding_window=12)
    with torch.no_grad():
        assert torch.allclose(wide(ids), full(ids), atol=1e-5)
        a, b = narrow(ids), full(ids)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5)  # inside the first window nothing differs
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-2
    # each layer reaches W - 1 tokens back, so with two layers token 0 reaches position 22 and no further
    other = ids.clone()
    other[:, 0] = (ids[:, 0] + 1) % 64
    with torch.no_grad():
        c = narrow(other)
    assert torch.allclose(c[:, 23:], a[:, 23:], atol=1e-6) and (c[:, 22] - a[:, 22]).abs().max() > 1e-4


@pytest.mark.parametrize("kw", [dict(SLIDING, n_kv_heads=2), dict(LINEAR), dict(LINEAR, n_kv_heads=1, qk_norm=True)])
def test_generation_past_the_window_equals_the_forward_without_cache(kw):
    model = make(**kw)
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13]]
    ids, mask = left_pad(prompts, 0)
    out = generate(model, ids, mask, max_new_tokens=30, temperature=0)
    assert out.responses.shape[1] == 30
    for i, p in enumerate(prompts):  # each row alone, no cache, no padding
        seq = torch.tensor([p + out.responses[i].tolist()])
        with torch.no_grad():
            lp = torch.log_softmax(model(seq)[0, :, :64].float(), -1)[len(p) - 1 : -1]
        assert torch.equal(lp.argmax(-1), seq[0, len(p):])
        assert torch.allclose(lp.gather(1, seq[0, len(p):, None]).squeeze(1), out.logprobs[i], atol=1e-5)


def test_generation_memory_is_constant_in_the_generated_length():
    for kw, cls in ((SLIDING, RingKVCache), (LINEAR, LinearStateCache)):
        cfg = make(**kw).config
        short, long = (allocate_cache(cfg, 2, n, "cpu", torch.float32) for n in (16, 90))
        assert isinstance(long, cls)
        tensors = lambda c: c.keys + c.values if cls is RingKVCache else c.states  # noqa: E731
        assert [t.shape for t in tensors(short)] == [t.shape for t in tensors(long)]
    assert RingKVCache.allocate(make(**SLIDING).config, 1, 90, "cpu", torch.float32).capacity == 5


def test_serving_engine_decodes_sliding_window_like_generate_and_refuses_linear():
    from lmlab.serving.engine import Engine, GenerationRequest, SamplingParams

    class Tok:
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    model = make(**SLIDING)
    engine = Engine(model, Tok(), max_batch=4)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
    reqs = [engine.submit(GenerationRequest(p, SamplingParams(max_tokens=20, temperature=0))) for p in prompts]
    while not all(r.done for r in reqs):
        engine.step()
    for p, r in zip(prompts, reqs):
        ref = generate(model, torch.tensor([p]), max_new_tokens=20, temperature=0)
        assert r.token_ids == ref.responses[0].tolist()
    with pytest.raises(ConfigError, match="linear attention"):
        Engine(make(**LINEAR), Tok())


# -- linear attention --------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_linear_attention_equals_the_recurrence(chunk):
    g = torch.Generator().manual_seed(chunk)
    q, k, v = (torch.randn(2, 3, 45, 8, generator=g) for _ in range(3))
    log_g = F.logsigmoid(torch.randn(2, 3, 45, generator=g) + 2)
    s0 = torch.randn(2, 3, 8, 8, generator=g)
    for state in (None, s0):
        o1, s1 = linear_attention_recurrent(q, k, v, log_g, state)
        o2, s2 = linear_attention_chunked(q, k, v, log_g, chunk, state)
        assert torch.allclose(o1, o2, atol=1e-5, rtol=1e-5), (o1 - o2).abs().max()
        assert torch.allclose(s1, s2, atol=1e-5, rtol=1e-5)
    # segments (documents) restart the state: equal to running each segment alone
    seg = torch.tensor([[0] * 10 + [1] * 30 + [2] * 5, [0] * 45])
    o3, _ = linear_attention_chunked(q, k, v, log_g, chunk, segments=seg)
    alone = torch.cat([linear_attention_recurrent(q[:1, :, a:b], k[:1, :, a:b], v[:1, :, a:b], log_g[:1, :, a:b])[0]
                       for a, b in ((0, 10), (10, 40), (40, 45))], dim=2)
    assert torch.allclose(o3[:1], alone, atol=1e-5) and torch.allclose(o3[1:], o1[1:] if s0 is None else o3[1:])
    assert torch.allclose(o3[1:], linear_attention_recurrent(q[1:], k[1:], v[1:], log_g[1:])[0], atol=1e-5)


# -- documents, packing, checkpointing -----------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(SLIDING, n_kv_heads=2), LINEAR])
def test_packed_documents_equal_each_document_alone(kw):
    model = make(**kw)
    lengths = [7, 19, 4, 10]
    ids = torch.randint(0, 64, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids)
        alone = torch.cat([model(part) for part in ids.split(lengths, dim=1)], dim=1)
    assert torch.allclose(packed, alone, atol=1e-5), (packed - alone).abs().max()


@pytest.mark.parametrize("kw", [dict(SLIDING, n_kv_heads=2), LINEAR])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(kw):
    tokens = torch.randint(0, 64, (3, 41), generator=torch.Generator().manual_seed(4))
    grads = []
    for ac in (False, True):
        model = make(**kw, activation_checkpointing=ac).train()
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == grads[1][0]
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-6)


# -- counting and planning ---------------------------------------------------------------------------
def test_parameter_and_flop_counts_follow_the_variant():
    for kw in ({}, SLIDING, LINEAR, dict(LINEAR, n_kv_heads=2, bias=True, qk_norm=True)):
        model = make(**kw)
        assert count_params(model.config).total == sum(p.numel() for p in model.parameters()), kw
    full, window, linear = (make(**kw).config for kw in ({}, SLIDING, LINEAR))
    d_attn, L = 32, 2
    assert attention_span(full, 80) == 80 and attention_span(window, 80) == 5 and attention_span(window, 3) == 3
    assert attention_span(linear, 80) == 4 + 8  # chunk + head_dim
    base = flops_per_token(full, 80, "6n")
    assert flops_per_token(full, 80) - base == 12 * L * 80 * d_attn
    assert flops_per_token(window, 80) - flops_per_token(window, 80, "6n") == 12 * L * 5 * d_attn
    assert flops_per_token(linear, 80) - flops_per_token(linear, 80, "6n") == 12 * L * 12 * d_attn
    # the window's attention FLOPs stop growing with the sequence; full attention's keep growing
    assert flops_per_token(window, 4000) == flops_per_token(window, 80)
    assert flops_per_token(full, 4000) > flops_per_token(full, 80)


@pytest.mark.parametrize("kw, tol", [(dict(attention="sliding_window", sliding_window=8), 0.02),
                                     (dict(attention="sliding_window", sliding_window=10, n_kv_heads=2), 0.02),
                                     (dict(attention="sliding_window", sliding_window=64), 0.02),
                                     (dict(attention="linear", linear_chunk_size=8), 0.12),
                                     (dict(attention="linear", linear_chunk_size=12, n_kv_heads=2), 0.12)])
def test_planned_activation_bytes_match_what_autograd_saves(kw, tol):
    """Sliding window: every saved tensor accounted for (exact on torch 2.13 CPU); linear: within 12%."""
    from test_planner import _saved_bytes, tiny

    from lmlab.distributed.memory import act_dtypes, activations, param_split

    cfg = tiny(**kw)
    model = CausalLM(cfg).train()
    tokens = torch.randint(0, 200, (3, 33))
    full = activations(tiny(), 3, 32, act_dtypes("32-true"), device="cpu").saved
    for precision, autocast in (("32-true", False), ("bf16-mixed", True)):
        measured = _saved_bytes(model, tokens, autocast)
        if autocast:
            measured -= 2 * param_split(cfg).matmul_weights
        predicted = activations(cfg, 3, 32, act_dtypes(precision), device="cpu").saved
        assert predicted == pytest.approx(measured, rel=tol), (kw, precision, predicted, measured)
    if kw["attention"] == "linear":  # the chunk-state terms are there: linear saves more than full at T=32
        assert activations(cfg, 3, 32, act_dtypes("32-true"), device="cpu").saved > full


def test_planned_memory_grows_linearly_for_the_variants_and_quadratically_never():
    from lmlab.distributed.memory import activations

    for kw in (dict(attention="sliding_window", sliding_window=256), dict(attention="linear")):
        cfg = TransformerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, max_seq_len=8192, **kw)
        a, b = (activations(cfg, 1, s).saved for s in (2048, 8192))
        assert b / a == pytest.approx(4.0, rel=0.01), kw


# -- training through Lightning: exact resume, SFT ---------------------------------------------------------
@pytest.mark.parametrize("kw", [SLIDING, LINEAR])
def test_resume_reproduces_the_uninterrupted_losses(kw, tmp_path):
    from test_pretrain import make_module

    from helpers import small_pretrain_dm, write_corpus

    workdir = tmp_path / "w"
    write_corpus(workdir / "corpus")
    cfg = dict(kw, activation_checkpointing=True)  # recomputation on, as in long-context runs
    steps, cut = 6, 3
    pl.seed_everything(1)
    full = LossRecorder()
    make_trainer(tmp_path / "a", steps, [full]).fit(make_module(config=cfg), datamodule=small_pretrain_dm(workdir))
    pl.seed_everything(1)
    first = LossRecorder(stop_at=cut)
    t1 = make_trainer(tmp_path / "b", steps, [first])
    t1.fit(make_module(config=cfg), datamodule=small_pretrain_dm(workdir))
    ckpt = tmp_path / "cut.ckpt"
    t1.save_checkpoint(ckpt)
    pl.seed_everything(999)
    second = LossRecorder()
    make_trainer(tmp_path / "c", steps, [second]).fit(make_module(config=cfg), datamodule=small_pretrain_dm(workdir),
                                                     ckpt_path=str(ckpt))
    assert sorted(second.losses) == list(range(cut, steps))
    for s in range(cut, steps):
        assert second.losses[s] == full.losses[s], (s, second.losses[s], full.losses[s])


@pytest.mark.parametrize("kw", [dict(attention="sliding_window", sliding_window=8), LINEAR])
def test_sft_on_the_variant_backbones(kw, tmp_path):
    from test_sft import tiny_config, verifiable_dm

    from lmlab.data.posttrain.datamodules import load_posttrain_tokenizer
    from lmlab.data.posttrain.records import collate_sft, pack_sft
    from lmlab.modules.optim import OptimizerConfig, ScheduleConfig, TrainingSettings
    from lmlab.modules.sft import SFTModule

    tok = load_posttrain_tokenizer("char")
    dm = verifiable_dm()
    dm.setup()
    torch.manual_seed(1)
    module = SFTModule(tiny_config(tok, **kw)).eval()
    # packing (document masks / state resets) and padding (key masks) give the same loss
    examples = dm.train_examples[:12]
    with torch.no_grad():
        a = module.batch_loss(collate_sft(examples, dm.pad_id))
        b = module.batch_loss(pack_sft(examples, max_length=64, pad_id=dm.pad_id))
    assert int(a[2]) == int(b[2]) and abs(float(a[0]) - float(b[0])) < 1e-4 * float(a[0])

    pl.seed_everything(0)
    module = SFTModule(tiny_config(tok, **kw), settings=TrainingSettings(
        optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.0), schedule=ScheduleConfig(name="constant", warmup_steps=5)))
    trainer = make_trainer(tmp_path, 30, limit_val_batches=None, val_check_interval=30, check_val_every_n_epoch=None)
    dm = verifiable_dm(packing=True, max_length=64)
    trainer.validate(module, datamodule=dm, verbose=False)
    trainer.fit(module, datamodule=dm)
    first, last = module.val_history[0], module.val_history[-1]
    assert last["val/loss"] < first["val/loss"] - 1.0, module.val_history


def test_the_cli_reports_a_missing_window_in_one_line(tmp_path):
    from test_cli import run_cli, tiny_config

    from helpers import write_corpus

    cfg = tiny_config(tmp_path, write_corpus(tmp_path / "corpus"))
    r = run_cli("fit", "--config", str(cfg), "--model.init_args.config.attention=sliding_window")
    lines = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith("lmlab fit: error: model.config.sliding_window: must be a positive int"), lines
    r = run_cli("fit", "--config", str(cfg), "--model.init_args.config.attention=linear", "--print_config")
    assert r.returncode == 0 and "attention: linear" in r.stdout, r.stderr[-2000:]
