"""13-gram decontamination against evaluation sets, with planted overlaps."""

from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile

import pytest

from lmlab.data.prepare.decontaminate import (
    ContaminationIndex,
    Decontaminator,
    decontaminate,
    report_table,
)
from lmlab.data.prepare.eval_sets import (
    EvalItem,
    iter_eval_dir,
    read_gsm8k,
    read_humaneval,
    read_icl_jsonl,
    read_mmlu_tar,
)
from lmlab.errors import ConfigError

QUESTION = (
    "A baker makes 24 loaves of bread every morning and sells two thirds of them before noon. "
    "How many loaves are left for the afternoon customers?"
)
FILLER = "Yesterday I walked to the shop and bought some milk for the week ahead. "


@pytest.fixture()
def index() -> ContaminationIndex:
    items = [
        EvalItem("gsm8k", "0", QUESTION + "\nThe baker sells 16 loaves, so 8 are left.\n#### 8"),
        EvalItem("arc", "0", "Question: Which gas do plants absorb from the air during photosynthesis? carbon dioxide"),
        EvalItem("tiny", "0", "one two three four five six seven eight nine"),  # 9 tokens: matched whole
        EvalItem("tiny", "1", "too short to index"),  # 4 tokens: skipped
    ]
    return ContaminationIndex.from_items(items)


def test_verbatim_question_is_flagged(index):
    found = index.lookup(FILLER + QUESTION + " " + FILLER)
    assert set(found) == {"gsm8k"}
    assert found["gsm8k"]["example_item"] == "0"
    assert found["gsm8k"]["ngrams"] == len(QUESTION.split()) - 13 + 1


def test_twelve_shared_words_are_not_flagged_but_thirteen_are(index):
    words = QUESTION.split()
    assert index.lookup(FILLER + " ".join(words[5:17]) + " " + FILLER) == {}
    assert set(index.lookup(FILLER + " ".join(words[5:18]) + " " + FILLER)) == {"gsm8k"}


def test_case_and_punctuation_do_not_hide_overlap(index):
    noisy = QUESTION.upper().replace(" ", "  ").replace(",", "").replace("?", "!!")
    assert set(index.lookup(noisy)) == {"gsm8k"}


def test_short_items(index):
    assert index.skipped_short == {"tiny": 1}
    assert set(index.lookup("count: one, two, three, four, five, six, seven, eight, nine!")) == {"tiny"}
    assert index.lookup("one two three four five six seven eight") == {}


def test_report_per_source_and_task_and_drop_option(index):
    docs = [
        {"id": 1, "source": "web", "text": FILLER * 3},
        {"id": 2, "source": "web", "text": FILLER + QUESTION},
        {
            "id": 3,
            "source": "books",
            "text": "Question: Which gas do plants absorb from the air during photosynthesis? Carbon dioxide, of course.",
        },
        {
            "id": 4,
            "source": "books",
            "text": FILLER
            + QUESTION
            + " question which gas do plants absorb from the air during photosynthesis carbon dioxide",
        },
        # 12 of the ARC item's 13 tokens: not contaminated
        {
            "id": 5,
            "source": "books",
            "text": "which gas do plants absorb from the air during photosynthesis carbon dioxide of course",
        },
    ]
    kept, report = decontaminate([dict(d) for d in docs], index)
    assert [d["id"] for d in kept] == [1, 5]
    assert report.n_contaminated == 3
    assert report.contaminated_by_source == {"web": 1, "books": 2}
    assert report.contaminated_by_task == {"gsm8k": 2, "arc": 2}
    assert {f["id"] for f in report.flagged} == {2, 3, 4}
    table = report_table(report)
    assert "books" in table and "gsm8k" in table

    kept_all, report2 = decontaminate([dict(d) for d in docs], index, drop=False)
    assert len(kept_all) == 5 and report2.n_contaminated == 3
    assert set(kept_all[1]["metadata"]["contamination"]) == {"gsm8k"}
    assert Decontaminator(index)(dict(docs[1])) == (False, "contaminated:gsm8k")


def test_index_errors():
    with pytest.raises(ConfigError, match="min_item_tokens"):
        ContaminationIndex(n=13, min_item_tokens=20)
    idx = ContaminationIndex()
    idx.add(EvalItem("t", "0", QUESTION))
    with pytest.raises(ConfigError, match="build"):
        idx.lookup(QUESTION)


def test_readers_on_small_files(tmp_path):
    (tmp_path / "gsm8k_test.jsonl").write_text(json.dumps({"question": "Q one?", "answer": "A one.\n#### 1"}) + "\n")
    icl = [
        {"query": "Question: Which is heavier?", "choices": ["a feather", "a brick"], "gold": 1},
        {"context": "It was a dark and stormy", "continuation": "night"},
        {
            "context_options": ["Sam gave Jo the book because Sam", "Sam gave Jo the book because Jo"],
            "continuation": "asked for it.",
            "gold": 1,
        },
    ]
    (tmp_path / "mixed_icl.jsonl").write_text("\n".join(json.dumps(r) for r in icl) + "\n")
    with gzip.open(tmp_path / "HumanEval.jsonl.gz", "wt") as f:
        f.write(
            json.dumps({"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n"})
            + "\n"
        )
    buf = io.StringIO()
    csv.writer(buf).writerow(["What is 2+2?", "3", "4", "5", "6", "B"])
    data = buf.getvalue().encode()
    with tarfile.open(tmp_path / "mmlu_data.tar.gz", "w:gz") as tar:
        for name in ("data/test/arith_test.csv", "data/dev/arith_dev.csv"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "notes.txt").write_text("ignored")

    items = list(iter_eval_dir(tmp_path))
    by_task = {}
    for it in items:
        by_task.setdefault(it.task, []).append(it)
    assert set(by_task) == {"gsm8k", "mixed", "humaneval", "mmlu"}
    assert by_task["gsm8k"][0].text == "Q one?\nA one.\n#### 1"
    assert [i.text for i in by_task["mixed"]] == [
        "Question: Which is heavier? a brick",
        "It was a dark and stormy night",
        "Sam gave Jo the book because Jo asked for it.",
    ]
    assert by_task["humaneval"][0].item_id == "HumanEval/0"
    assert by_task["humaneval"][0].text == "def f():\n    return 1\n"
    assert [(i.item_id, i.text) for i in by_task["mmlu"]] == [("arith/test/0", "What is 2+2? 3 4 5 6")]
    assert list(read_mmlu_tar(tmp_path / "mmlu_data.tar.gz", splits=("dev",)))[0].item_id == "arith/dev/0"
    bad = tmp_path / "bad_icl.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ConfigError, match="line 1"):
        list(read_icl_jsonl(bad))
    with pytest.raises(ConfigError, match="eval_dir"):
        list(iter_eval_dir(tmp_path / "missing"))


@pytest.mark.shared_data
def test_real_eval_sets(shared_data):
    eval_dir = shared_data / "eval"
    gsm = list(read_gsm8k(eval_dir / "gsm8k_test.jsonl"))
    assert len(gsm) == 1319
    assert len(list(read_humaneval(eval_dir / "HumanEval.jsonl.gz"))) == 164
    assert len(list(read_icl_jsonl(eval_dir / "winogrande_icl.jsonl"))) == 1267
    index = ContaminationIndex.from_items(gsm + list(read_icl_jsonl(eval_dir / "arc_easy_test_icl.jsonl")))
    question = gsm[123].text.split("\n")[0]
    words = question.split()
    assert len(words) >= 14
    found = index.lookup("Homework help forum.\n" + question + "\nThanks in advance!")
    assert "gsm8k" in found and found["gsm8k"]["example_item"] == "123"
    assert index.lookup("Homework help forum. " + " ".join(words[:12]) + " Thanks in advance!") == {}
    # clean web text is not flagged
    rows = [
        json.loads(line) for line in open(shared_data / "web" / "dclm_quality_majority_data.jsonl", encoding="utf-8")
    ][:100]
    _, report = decontaminate([{"id": i, "source": "dclm", "text": r["text"]} for i, r in enumerate(rows)], index)
    assert report.n_docs == 100 and report.n_contaminated == 0


def test_decontamination_reads_the_eval_data_setting(tmp_path, monkeypatch):
    from lmlab.data.prepare.config import DecontamSettings

    monkeypatch.delenv("LMLAB_EVAL_DATA", raising=False)
    assert DecontamSettings().eval_path().as_posix() == "data/eval"  # the documented default, as for lmlab eval
    monkeypatch.setenv("LMLAB_EVAL_DATA", str(tmp_path / "evals"))
    assert DecontamSettings().eval_path() == tmp_path / "evals"
    assert DecontamSettings(eval_dir=str(tmp_path / "mine")).eval_path() == tmp_path / "mine"  # an explicit folder wins
