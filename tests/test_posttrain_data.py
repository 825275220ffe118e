"""Chat format, SFT label masking, post-training readers/collators and the verifiable toy tasks."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lmlab.data.posttrain.chat import (
    CHAT_TEMPLATE,
    IGNORE_INDEX,
    build_sft_example,
    format_chat,
    stop_token_ids,
)
from lmlab.data.posttrain.records import (
    SkipReport,
    build_preference_example,
    collate_preferences,
    collate_prompts,
    collate_sft,
    detect_format,
    pack_sft,
    parse_hh_dialogue,
    read_preferences,
    read_prompts,
    read_sft,
    tokenize_prompts,
    tokenize_sft,
)
from lmlab.data.posttrain.verifiable import (
    AdditionTask,
    ReversalTask,
    answer_for,
    build_char_tokenizer,
    exact_match,
    reward,
)
from lmlab.errors import ConfigError

CONVERSATIONS = [
    [{"role": "user", "content": "12+345="}, {"role": "assistant", "content": "357"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "rev:abc="},
        {"role": "assistant", "content": "cba"},
    ],
    [{"role": "user", "content": "what is 2+2?"}],
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The character tokenizer, saved and reloaded through AutoTokenizer as users will load it."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("chartok")
    build_char_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- chat format


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_format_chat(tok, conv, gen):
    assert tok.chat_template == CHAT_TEMPLATE
    rendered = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert rendered == format_chat(conv, add_generation_prompt=gen)
    assert rendered.startswith("<|bos|><|")
    assert rendered.endswith("<|assistant|>\n" if gen else "<|end|>\n")


def test_format_chat_rejects_unknown_roles():
    with pytest.raises(ConfigError, match="role"):
        format_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ConfigError):
        format_chat([{"role": "user"}])


def test_sft_labels_cover_exactly_the_assistant_replies(tok):
    for conv in CONVERSATIONS[:2]:
        ex, reason = build_sft_example(tok, conv, max_length=256)
        assert reason is None
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels) == len(ex["attention_mask"])
        assert all(lab == IGNORE_INDEX or lab == i for lab, i in zip(labels, ids))
        assert tok.decode(ids) == format_chat(conv)
        target_text = tok.decode([lab for lab in labels if lab != IGNORE_INDEX])
        replies = "".join(m["content"] + "<|end|>" for m in conv if m["role"] == "assistant")
        assert target_text == replies
    last, _ = build_sft_example(tok, CONVERSATIONS[1], 256, train_on="last_assistant")
    assert tok.decode([lab for lab in last["labels"] if lab != IGNORE_INDEX]) == "cba<|end|>"
    assert tok.convert_tokens_to_ids("<|end|>") in stop_token_ids(tok)


def test_sft_truncation_is_reported_and_fully_masked_examples_skipped(tok):
    conv = CONVERSATIONS[0]
    full, _ = build_sft_example(tok, conv, 256)
    n = len(full["input_ids"])
    cut, reason = build_sft_example(tok, conv, n - 2)  # drops the closing "<|end|>" and "\n"
    assert reason is None and cut["truncated"] and cut["num_truncated"] == 2
    assert cut["num_targets"] == full["num_targets"] - 1
    none, reason = build_sft_example(tok, conv, 10)  # the prompt alone is longer
    assert none is None and reason == "no_target_after_truncation"
    none, reason = build_sft_example(tok, CONVERSATIONS[2], 256)
    assert none is None and reason == "no_assistant_turn"
    convs = [{"messages": conv}, {"messages": CONVERSATIONS[2]}]
    examples, report = tokenize_sft(tok, convs, 256)
    assert len(examples) == 1 and report.counts == {"no_assistant_turn": 1}


# --------------------------------------------------------------------------- readers


def test_detect_format_and_hh_parsing():
    assert detect_format(["prompt", "response"]) == "prompt_completion"
    assert detect_format(["chosen", "rejected", "prompt"]) == "preference"
    assert detect_format(["messages", "id"]) == "messages"
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["prompt"]) == "prompt"
    with pytest.raises(ConfigError, match="source"):
        detect_format(["text"])
    msgs = parse_hh_dialogue("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == "hi there" and msgs[-1]["content"] == ""


def test_sft_reader_normalises_formats_and_skips_bad_records(tmp_path, caplog, tok):
    pc = _write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "Say hi", "completion": "hi"},
        {"prompt": "Say nothing", "completion": "   "},
        {"prompt": "x" * 400, "completion": "long prompt"},
    ])
    with caplog.at_level(logging.WARNING, logger="lmlab.data.posttrain.records"):
        convs, report = read_sft(pc, tokenizer=tok, max_prompt_tokens=100)
    assert convs == [{"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}]
    assert report.counts == {"empty_response": 1, "prompt_too_long": 1}
    assert report.seen == 3 and report.kept == 1
    assert "empty_response=1" in caplog.text
    msgs = _write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
    ])
    convs, report = read_sft(msgs)
    assert len(convs) == 1 and report.counts == {"malformed": 1}
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": ""}])
    with pytest.raises(ConfigError, match="no usable"):
        read_sft(bad)
    with pytest.raises(ConfigError, match="prompts only"):
        read_sft(_write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p"}]))
    with pytest.raises(ConfigError, match="does not exist"):
        read_sft(tmp_path / "missing.jsonl")


def test_preference_reader_parses_hh_and_counts_bad_pairs(tmp_path):
    h = "\n\nHuman: How do I boil an egg?\n\nAssistant: "
    rows = [
        {"chosen": h + "Put it in boiling water for 8 minutes.", "rejected": h + "I don't know."},
        {"chosen": h + "Same answer.", "rejected": h + "Same answer."},
        {"chosen": h.rstrip(), "rejected": h + "Something."},
        {"chosen": "no convention here", "rejected": "nor here"},
    ]
    pairs, report = read_preferences(_write_jsonl(tmp_path / "hh.jsonl", rows))
    assert len(pairs) == 1
    assert pairs[0]["prompt"] == [{"role": "user", "content": "How do I boil an egg?"}]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "Put it in boiling water for 8 minutes."}]
    assert report.counts == {"identical_pair": 1, "empty_response": 1, "no_prompt": 1}
    msg_rows = [{
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
    }]
    pairs, _ = read_preferences(msg_rows)
    hh_prompt = [{"prompt": h, "chosen": " Boil it.", "rejected": "Fry it."}]
    assert read_preferences(hh_prompt)[0][0]["prompt"] == [{"role": "user", "content": "How do I boil an egg?"}]
    assert pairs[0]["prompt"] == [{"role": "user", "content": "q"}]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "bad"}]
    prompts, report = read_prompts(_write_jsonl(tmp_path / "hh2.jsonl", rows))
    assert report.kept == 3 and report.counts == {"no_prompt": 1}  # response quality is irrelevant for prompts
    assert prompts[0]["prompt"] == [{"role": "user", "content": "How do I boil an egg?"}]


def test_preference_examples_label_only_the_completion(tok):
    pair = {
        "prompt": [{"role": "user", "content": "1+1="}],
        "chosen": [{"role": "assistant", "content": "2"}],
        "rejected": [{"role": "assistant", "content": "11"}],
    }
    ex, reason = build_preference_example(tok, pair, 64)
    assert reason is None
    for side, text in (("chosen", "2<|end|>"), ("rejected", "11<|end|>")):
        ids, labels = ex[f"{side}_input_ids"], ex[f"{side}_labels"]
        assert all(lab == IGNORE_INDEX or lab == i for lab, i in zip(labels, ids))
        assert tok.decode([lab for lab in labels if lab != IGNORE_INDEX]) == text
    none, reason = build_preference_example(tok, pair, 8)
    assert none is None and reason == "no_target_after_truncation"
    batch = collate_preferences([ex, ex], tok.pad_token_id)
    T = batch["chosen_input_ids"].shape[1]
    assert all(v.shape == (2, T) for v in batch.values())
    assert T == max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"]))
    assert (batch["chosen_labels"][batch["chosen_attention_mask"] == 0] == IGNORE_INDEX).all()


# --------------------------------------------------------------------------- collators


def test_sft_collator_right_pads(tok):
    exs = [build_sft_example(tok, c, 256)[0] for c in CONVERSATIONS[:2]]
    batch = collate_sft(exs, tok.pad_token_id, pad_to_multiple_of=8)
    short = len(exs[0]["input_ids"])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["input_ids"][0, :short].tolist() == exs[0]["input_ids"]
    assert (batch["input_ids"][0, short:] == tok.pad_token_id).all()
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in exs]


def test_prompt_collator_left_pads_and_carries_metadata(tok):
    records = [{"prompt": [{"role": "user", "content": "1+2="}], "answer": "3"},
               {"prompt": [{"role": "user", "content": "100+200="}], "answer": "300"}]
    examples, _ = tokenize_prompts(tok, records, max_prompt_tokens=64)
    batch = collate_prompts(examples, tok.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[:, -1].all()  # every prompt ends in the last column
    assert mask[0, 0] == 0 and ids[0, 0] == tok.pad_token_id
    assert tok.decode(ids[0][mask[0].bool()].tolist()) == format_chat(records[0]["prompt"], add_generation_prompt=True)
    assert batch["answer"] == ["3", "300"]
    _, report = tokenize_prompts(tok, records + [{"prompt": [{"role": "user", "content": "9" * 80}]}], max_prompt_tokens=64)
    assert report.counts == {"prompt_too_long": 1}


def test_packing_keeps_documents_apart(tok):
    task = AdditionTask(seed=3)
    convs = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
             for r in task.sft_pairs(6)]
    exs = [build_sft_example(tok, c, 64)[0] for c in convs]
    packed = pack_sft(exs, max_length=64, pad_id=tok.pad_token_id)
    ids, docs, pos, labels = packed["input_ids"], packed["doc_ids"], packed["position_ids"], packed["labels"]
    assert ids.shape[0] < len(exs) and ids.shape[1] <= 64
    assert packed["attention_mask"].sum().item() == sum(len(e["input_ids"]) for e in exs)
    seen = []
    for r in range(ids.shape[0]):
        for d in docs[r].unique().tolist():
            if d < 0:
                continue
            sel = docs[r] == d
            assert pos[r][sel].tolist() == list(range(int(sel.sum())))
            assert labels[r][sel][0].item() == IGNORE_INDEX
            seen.append(ids[r][sel].tolist())
    assert sorted(seen) == sorted(e["input_ids"] for e in exs)
    with pytest.raises(ConfigError):
        pack_sft(exs, max_length=5, pad_id=0)


def test_skip_report_summary():
    rep = SkipReport("things")
    rep.keep()
    rep.skip("empty_response", 3)
    assert rep.skipped == 1 and rep.summary() == "things: kept 1/2; skipped empty_response=1"


# --------------------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_real_posttrain_files(shared_data, tok):
    root = shared_data / "posttrain"
    pairs, report = read_preferences(root / "hh_rlhf_harmless_base_test.jsonl.gz", limit=400)
    assert report.seen == 400 and len(pairs) == report.kept > 350
    assert all(p["chosen"] != p["rejected"] and p["chosen"][0]["content"] and p["rejected"][0]["content"] for p in pairs)
    assert all(p["prompt"][-1]["role"] == "user" for p in pairs)
    sft, report = read_sft(root / "dolly_hhrlhf_train_small.jsonl", limit=100)
    assert report.kept == len(sft) > 90
    assert all(c["messages"][-1]["role"] == "assistant" and c["messages"][-1]["content"] for c in sft)
    seed, _ = read_sft(root / "alpaca_seed_tasks.jsonl", limit=20)
    assert len(seed) >= 20  # a seed task can hold several instances
    examples, rep = tokenize_sft(tok, sft, max_length=512)
    assert rep.kept + rep.skipped == len(sft)
    assert all(e["num_targets"] > 0 for e in examples)


# --------------------------------------------------------------------------- verifiable tasks


@pytest.mark.parametrize("task_cls", [AdditionTask, ReversalTask])
def test_task_generators_are_deterministic_and_held_out_is_disjoint(task_cls):
    a, b = task_cls(seed=1), task_cls(seed=1)
    assert a.sft_pairs(50) == b.sft_pairs(50)
    assert a.preference_pairs(20) == b.preference_pairs(20)
    assert task_cls(seed=2).sft_pairs(50) != a.sft_pairs(50)
    train = {r["prompt"] for r in a.sft_pairs(300)} | {r["prompt"] for r in a.preference_pairs(300)}
    held_out = [r["prompt"] for r in a.prompt_records(40, split="eval")]
    assert len(set(held_out)) == 40
    assert not train & set(held_out)
    # the split is a property of the prompt, not of the seed that drew it
    assert not {r["prompt"] for r in task_cls(seed=9).sft_pairs(300)} & set(held_out)
    for pair in a.preference_pairs(100):
        assert pair["chosen"] == answer_for(pair["prompt"])
        assert pair["rejected"] != pair["chosen"] and pair["rejected"]
        assert reward(pair["prompt"], pair["rejected"]) == 0.0


def test_rewards_and_exact_match():
    assert answer_for("12+345=") == "357"
    assert reward("12+345=", "357") == 1.0
    assert reward("12+345=", " 357<|end|>\n") == 1.0
    assert reward("12+345=", "358") == 0.0
    partial = reward("12+345=", "358", partial_credit=True)
    assert partial == pytest.approx(0.5 * 2 / 3)
    assert reward("12+345=", "999", partial_credit=True) == 0.0
    assert exact_match(format_chat([{"role": "user", "content": "rev:abc="}], True), "cba")
    assert not exact_match("rev:abc=", "abc")
    with pytest.raises(ConfigError):
        reward("what is love?", "42")
    with pytest.raises(ConfigError, match="found only"):
        AdditionTask(max_digits=1).prompts(60, split="eval")


def test_char_tokenizer_round_trip(tok):
    assert (tok.pad_token_id, tok.bos_token, tok.eos_token) == (0, "<|bos|>", "<|eos|>")
    text = format_chat([{"role": "user", "content": "12+345="}, {"role": "assistant", "content": "357"}])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(ids[:3]) == ["<|bos|>", "<|user|>", "\n"]
    assert tok.decode(ids, skip_special_tokens=True) == "\n12+345=\n\n357\n"
    assert torch.tensor(ids).max().item() < len(tok)
