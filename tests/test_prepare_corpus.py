"""A small synthetic mixture for the ``lmlab data prepare`` tests (no tests here, only builders).

The prose is generated from templates over a few hundred words, so it passes
the Gopher/C4/FineWeb filters; planted documents exercise the other stages:
junk pages (filters), two pages of scrambled words (lowest quality score), an exact and a near duplicate within ``web``, a copy of
a ``web`` page in ``news`` (cross-source dedup) and a page quoting an
evaluation question (decontamination).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NOUNS = """river garden window teacher village engine harbor letter mountain kitchen doctor forest market
station bridge painter student library ocean farmer island castle valley journey lantern meadow basket
carpenter orchard candle theater museum soldier captain merchant traveler blanket compass ladder mirror
monastery pilgrim scholar shepherd sailor weaver baker blacksmith chapel fountain granary hillside""".split()
VERBS = """watched carried opened followed remembered painted visited crossed repaired described
gathered noticed examined collected admired measured discovered explained mended guarded""".split()
ADJS = """quiet ancient narrow bright heavy gentle distant hidden curious patient golden silent
crowded wooden broken careful restless humble proud weary""".split()
ADVS = "slowly carefully quietly eagerly rarely often suddenly gladly".split()
TEMPLATES = [
    "The {a} {n} {v} the {n2} near the {n3}.",
    "After the {n} {v} a {a} {n2}, the {n3} {v2} it {adv}.",
    "In the {a} {n}, a {n2} {v} the {a2} {n3} and {v2} the {n4}.",
    "Nobody {v} the {n} until the {a} {n2} {v2} it {adv}.",
    "Because the {n} was {a}, the {n2} {v} every {n3} with {a2} care.",
    "When the {n} {v} the {n2}, the {n3} became {a} and {a2}.",
    "It is said that the {n} {v} a {a} {n2} for the {n3} of the {n4}.",
]
EVAL_QUESTIONS = [
    "A baker makes twelve loaves of bread every morning and sells nine of them before noon how many loaves are left for the evening customers",
    "Tom has three red marbles and five blue marbles and his sister gives him four more blue marbles how many marbles does Tom have now",
    "A train leaves the station at noon and travels sixty miles every hour for three hours how far from the station is the train at three",
]
JUNK = [
    # too few words, but long enough for the repetition rules (which, as in datatrove, count an n-gram seen once)
    "Click here to subscribe to our newsletter. Buy now and get free shipping on every order over fifty dollars. "
    "Limited time offer, while stocks last. Sign up today for exclusive member deals.",
    "### $$$ @@@ ### $$$ @@@ ### $$$ @@@ %%% ^^^ &&& *** ### $$$ @@@ ### $$$ @@@ ### $$$ @@@ %%% ^^^ &&& ***",
    "home | about | contact | login | register | cart | search | menu | help | faq | terms",
]


def sentence(rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(
        n=rng.choice(NOUNS), n2=rng.choice(NOUNS), n3=rng.choice(NOUNS), n4=rng.choice(NOUNS),
        v=rng.choice(VERBS), v2=rng.choice(VERBS), a=rng.choice(ADJS), a2=rng.choice(ADJS), adv=rng.choice(ADVS),
    )


def prose(rng: random.Random, paragraphs: int = 3, sentences: tuple[int, int] = (3, 5)) -> str:
    return "\n\n".join(" ".join(sentence(rng) for _ in range(rng.randint(*sentences))) for _ in range(paragraphs))


def scrambled(rng: random.Random, text: str) -> str:
    """Content words with shuffled letters: still word-like, but unlike any reference text."""
    content = set(NOUNS) | set(VERBS) | set(ADJS) | set(ADVS)

    def mix(w: str) -> str:
        core = w.rstrip(".,")
        if core.lower() not in content:
            return w
        letters = list(core)
        rng.shuffle(letters)
        return "".join(letters) + w[len(core):]

    return "\n\n".join(" ".join(mix(w) for w in para.split(" ")) for para in text.split("\n\n"))


def _upper_first_paragraph(text: str) -> str:
    first, sep, rest = text.partition("\n\n")
    return first.upper() + sep + rest


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_mixture(root: Path, seed: int = 0, n_web: int = 48) -> dict[str, Path]:
    """Write web/books/code/news sources and an eval folder under ``root``; returns their paths."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    web = [{"id": f"w{i}", "text": prose(rng)} for i in range(n_web)]
    planted = [
        # same after normalisation (case, spaces); only the first paragraph is upper-cased because the
        # Gopher stop-word rule, as in datatrove, needs lower-case "the", "and", ... somewhere
        {"id": "w-exact", "text": "  " + _upper_first_paragraph(web[3]["text"]).replace(" ", "   ") + "  "},
        {"id": "w-near", "text": web[5]["text"] + " " + sentence(rng)},
        {"id": "w-gibberish-0", "text": scrambled(rng, prose(rng))},
        {"id": "w-gibberish-1", "text": scrambled(rng, prose(rng))},
        {"id": "w-leak", "text": prose(rng, 1) + "\n\n" + EVAL_QUESTIONS[1] + ".\n\n" + prose(rng, 1)},
    ] + [{"id": f"junk{i}", "text": t} for i, t in enumerate(JUNK)]
    _jsonl(root / "web.jsonl", web[:20] + planted + web[20:])
    books = root / "books"
    books.mkdir(exist_ok=True)
    for b in range(3):
        (books / f"book{b}.txt").write_text(prose(rng, paragraphs=40, sentences=(4, 7)))
    code = []
    for i in range(30):
        body = "\n".join(f"    total = total + values[{j}] * {i + j}" for j in range(rng.randint(2, 6)))
        code.append({"text": f"def weighted_sum_{i}(values):\n    \"\"\"Sum of weighted values.\"\"\"\n    total = 0\n{body}\n    return total\n"})
    _jsonl(root / "code.jsonl", code)
    news = [{"id": f"n{i}", "text": prose(rng)} for i in range(12)] + [{"id": "n-copy", "text": web[7]["text"]}]
    _jsonl(root / "news.jsonl", news)
    ev = root / "eval"
    ev.mkdir(exist_ok=True)
    _jsonl(ev / "gsm8k_test.jsonl", [{"question": q, "answer": "The answer is 7.\n#### 7"} for q in EVAL_QUESTIONS])
    return {"web": root / "web.jsonl", "books": books, "code": root / "code.jsonl", "news": root / "news.jsonl", "eval": ev}


def mixture_config(paths: dict[str, Path], tokenizer: str, sources=("web", "books", "code"), **overrides) -> dict:
    """A prepare config (as a dict) over the synthetic mixture."""
    weights = {"web": 0.6, "books": 0.25, "code": 0.15, "news": 0.1}
    cfg = {
        "seed": 11,
        "shard_docs": 16,
        "val_fraction": 0.1,
        "train_tokens": 200_000,
        "tokenizer": tokenizer,
        "num_proc": 1,
        "sources": [
            {"name": n, "weight": weights[n], "path": str(paths[n]), "kind": "code" if n == "code" else "prose"}
            for n in sources
        ],
        "filters": {"prose": ["gopher_repetition", "gopher_quality", "c4", "fineweb"]},
        "quality": {"keep_fraction": 0.97, "apply_to": ["web"], "reference_sources": ["books"]},
        "decontaminate": {"eval_dir": str(paths["eval"])},
        "report": {"wandb": False},
    }
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def all_texts(paths: dict[str, Path]) -> list[str]:
    out = []
    for name in ("web", "code", "news"):
        out += [json.loads(line)["text"] for line in paths[name].read_text().splitlines()]
    out += [p.read_text() for p in sorted(paths["books"].iterdir())]
    return out
