"""Statistics, judges and reports of ``lmlab eval compare`` (no server, no browser)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lmlab.errors import ConfigError
from lmlab.eval.compare.ratings import (
    DEFAULT_PRIOR,
    Outcome,
    bootstrap,
    bradley_terry,
    pairwise_win_rates,
    rate,
    sequential_elo,
    win_records,
)

ELO = 400.0 / math.log(10.0)  # Elo points per unit of natural-log strength


def games(a: str, b: str, wins: int = 0, losses: int = 0, ties: int = 0) -> list[Outcome]:
    return [Outcome(a, b, 1.0)] * wins + [Outcome(a, b, 0.0)] * losses + [Outcome(a, b, 0.5)] * ties


# --------------------------------------------------------------------------- Bradley-Terry


def test_two_models_three_wins_one_loss_gives_strength_ratio_three():
    fit = bradley_terry(games("x", "y", wins=3, losses=1))
    assert fit.prior == 0.0
    t = dict(zip(fit.models, fit.theta))
    assert math.exp(t["x"] - t["y"]) == pytest.approx(3.0, rel=1e-9)
    r = fit.ratings(anchor=1000.0)
    assert r["x"] - r["y"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert (r["x"] + r["y"]) / 2 == pytest.approx(1000.0, abs=1e-9)  # the mean sits at the anchor


def test_ties_count_as_half_wins():
    # 2 wins + 2 ties is 3 points of 4, the same evidence as 3 wins and 1 loss
    fit = bradley_terry(games("x", "y", wins=2, ties=2))
    t = dict(zip(fit.models, fit.theta))
    assert math.exp(t["x"] - t["y"]) == pytest.approx(3.0, rel=1e-9)
    rec = win_records(games("x", "y", wins=2, ties=2) + games("y", "x", wins=1))
    assert (rec["x"].wins, rec["x"].losses, rec["x"].ties) == (2, 1, 2)
    assert rec["x"].win_rate == pytest.approx(3 / 5)
    assert rec["y"].win_rate == pytest.approx(2 / 5)
    # all ties: equal strengths
    even = bradley_terry(games("x", "y", ties=5))
    assert even.theta[0] == pytest.approx(even.theta[1], abs=1e-12)


def three_model_outcomes() -> list[Outcome]:
    return (
        games("a", "b", wins=5, losses=2, ties=1)
        + games("b", "c", wins=4, losses=3)
        + games("c", "a", wins=1, losses=2, ties=3)
        + games("b", "a", wins=1)
    )


def test_three_models_satisfy_score_equations():
    outcomes = three_model_outcomes()
    fit = bradley_terry(outcomes)
    assert fit.prior == 0.0
    theta = dict(zip(fit.models, fit.theta))
    observed = {m: 0.0 for m in theta}
    expected = {m: 0.0 for m in theta}
    for o in outcomes:
        p = 1.0 / (1.0 + math.exp(theta[o.model_b] - theta[o.model_a]))
        observed[o.model_a] += o.score
        observed[o.model_b] += 1.0 - o.score
        expected[o.model_a] += p
        expected[o.model_b] += 1.0 - p
    for m in theta:
        assert expected[m] == pytest.approx(observed[m], abs=1e-8)
    # and the spread is real: a scored 9/15, b 7.5/16, c 5.5/13
    assert theta["a"] > theta["b"] > theta["c"]


def test_bradley_terry_matches_direct_likelihood_maximisation():
    from scipy.optimize import minimize

    outcomes = three_model_outcomes()
    fit = bradley_terry(outcomes)
    idx = {m: i for i, m in enumerate(fit.models)}

    def nll(free: np.ndarray) -> float:
        t = np.concatenate([[0.0], free])
        total = 0.0
        for o in outcomes:
            d = t[idx[o.model_a]] - t[idx[o.model_b]]
            total -= o.score * -np.logaddexp(0, -d) + (1 - o.score) * -np.logaddexp(0, d)
        return total

    res = minimize(nll, np.zeros(len(idx) - 1), method="BFGS", options={"gtol": 1e-10})
    t_ref = np.concatenate([[0.0], res.x])
    t_ref -= t_ref.mean()
    np.testing.assert_allclose(fit.theta, t_ref, atol=1e-5)


def test_infinite_mle_gets_virtual_ties():
    outcomes = games("x", "y", wins=4)
    fit = bradley_terry(outcomes)
    assert fit.prior == DEFAULT_PRIOR
    # one virtual tie: x scores 4.5 of 5 -> strength ratio 9
    r = fit.ratings()
    assert r["x"] - r["y"] == pytest.approx(400 * math.log10((4 + 0.5 * DEFAULT_PRIOR) / (0.5 * DEFAULT_PRIOR)), abs=1e-6)
    with pytest.raises(ConfigError, match="does not exist"):
        bradley_terry(outcomes, prior=0.0)


def test_anchor_model_is_pinned():
    fit = bradley_terry(three_model_outcomes())
    r = fit.ratings(anchor=1500.0, anchor_model="b")
    assert r["b"] == pytest.approx(1500.0)
    mean = fit.ratings(anchor=1500.0)
    assert r["a"] - r["c"] == pytest.approx(mean["a"] - mean["c"])
    with pytest.raises(ConfigError, match="anchor_model"):
        fit.ratings(anchor_model="nope")


def test_pairwise_win_rates_are_complementary():
    rates = pairwise_win_rates(three_model_outcomes())
    assert rates["a"]["b"] == pytest.approx((5 + 0.5 + 0) / 9)  # 5 wins, 1 tie of 8, plus 1 loss as b->a
    for x in rates:
        for y in rates[x]:
            assert rates[x][y] + rates[y][x] == pytest.approx(1.0)


# --------------------------------------------------------------------------- Elo


def test_sequential_elo_by_hand():
    outcomes = [Outcome("x", "y", 1.0), Outcome("x", "y", 0.0), Outcome("y", "x", 0.5)]
    r = sequential_elo(outcomes, k=32, initial=1000)
    x, y = 1016.0, 984.0  # first game: expected 0.5 each, winner +16
    e_x = 1 / (1 + 10 ** ((y - x) / 400))
    x, y = x - 32 * e_x, y + 32 * e_x  # second game: x loses
    e_y = 1 / (1 + 10 ** ((x - y) / 400))
    y, x = y + 32 * (0.5 - e_y), x - 32 * (0.5 - e_y)  # a tie, y listed first
    assert r["x"] == pytest.approx(x, abs=1e-9)
    assert r["y"] == pytest.approx(y, abs=1e-9)
    assert r["x"] + r["y"] == pytest.approx(2000.0)  # zero-sum
    with pytest.raises(ConfigError, match="k_factor"):
        sequential_elo(outcomes, k=0)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_contains_estimate_narrows_and_is_seeded():
    small = games("x", "y", wins=6, losses=3, ties=1) + games("y", "z", wins=5, losses=4, ties=1) + games("z", "x", wins=3, losses=6, ties=1)
    large = small * 8
    rep_small = rate(small, n_bootstrap=400, seed=1)
    rep_large = rate(large, n_bootstrap=400, seed=1)
    width = {}
    for name, rep in (("small", rep_small), ("large", rep_large)):
        for m in rep.models:
            assert m.bt_ci[0] <= m.bt_rating <= m.bt_ci[1]
            assert m.win_rate_ci[0] <= m.win_rate <= m.win_rate_ci[1]
        width[name] = {m.model: m.bt_ci[1] - m.bt_ci[0] for m in rep.models}
    for model in width["small"]:
        assert width["large"][model] < 0.6 * width["small"][model]  # 8x data: about 1/sqrt(8) as wide
    again = bootstrap(small, n=50, seed=7)
    same = bootstrap(small, n=50, seed=7)
    other = bootstrap(small, n=50, seed=8)
    np.testing.assert_array_equal(again["bt"]["samples"], same["bt"]["samples"])
    assert not np.array_equal(again["bt"]["samples"], other["bt"]["samples"])


def test_rate_report_orders_and_serialises():
    rep = rate(three_model_outcomes(), n_bootstrap=50)
    assert [m.model for m in rep.models] == ["a", "b", "c"]
    d = rep.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["n_judgments"] == len(three_model_outcomes())
    a = d["models"][0]
    assert (a["wins"], a["losses"], a["ties"]) == (7, 4, 4)
    # a model that never played: rated at the anchor side of the prior, win rate undefined
    lonely = rate(games("x", "y", wins=2, losses=1), models=["x", "y", "z"], n_bootstrap=20).to_dict()
    z = next(m for m in lonely["models"] if m["model"] == "z")
    assert z["games"] == 0 and z["win_rate"] is None


def test_outcome_validation():
    with pytest.raises(ConfigError):
        Outcome("x", "x", 1.0)
    with pytest.raises(ConfigError):
        Outcome("x", "y", 0.7)


# --------------------------------------------------------------------------- judges and report


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_jsonl_judgments(tmp_path):
    from lmlab.eval.compare.judges import read_jsonl_judgments
    from lmlab.eval.compare.pairs import pair_id, parse_prompt

    path = write_jsonl(tmp_path / "j.jsonl", [
        {"prompt": "hi", "model_a": "x", "model_b": "y", "overall": "a", "helpfulness": "tie"},
        {"pair_id": "p1", "model_a": "y", "model_b": "x", "overall": "b", "annotator": "ann", "reason": "ignored"},
        "",
    ])
    js = read_jsonl_judgments(path)
    assert [j.overall for j in js] == ["a", "b"]
    assert js[0].helpfulness == "tie" and js[0].honesty is None
    assert js[0].pair_id == pair_id(parse_prompt("hi", "t").id, "y", "x")
    assert js[1].annotator == "ann" and js[1].source == "jsonl"

    bad_rows = [
        ({"prompt": "hi", "model_a": "x", "model_b": "y", "overall": "A"}, "j.jsonl:2.overall"),
        ({"prompt": "hi", "model_a": "x", "overall": "a"}, "j.jsonl:2.model_b"),
        ({"model_a": "x", "model_b": "y", "overall": "a"}, "needs 'pair_id' or 'prompt'"),
        ({"prompt": "hi", "model_a": "x", "model_b": "x", "overall": "a"}, "same model"),
        ({"prompt": "hi", "model_a": "x", "model_b": "w", "overall": "a"}, "unknown model"),
        ({"prompt": "hi", "model_a": "x", "model_b": "y", "overall": "a", "honesty": "yes"}, "honesty"),
        ("{not json", "not valid JSON"),
    ]
    good = {"prompt": "ok", "model_a": "x", "model_b": "y", "overall": "tie"}
    for row, message in bad_rows:
        path = write_jsonl(tmp_path / "j.jsonl", [good, row])
        with pytest.raises(ConfigError, match=message):
            read_jsonl_judgments(path, models=["x", "y"])

    # pair ids are checked against the database's pairs when those are known
    from lmlab.eval.compare.pairs import Pair

    known = {"p1": Pair("p1", "q", "hi", "y", "x", "ry", "rx", 0)}
    path = write_jsonl(tmp_path / "j.jsonl", [{"pair_id": "p1", "model_a": "x", "model_b": "y", "overall": "a"}])
    assert read_jsonl_judgments(path, pairs=known)[0].model_a == "x"  # sides as listed in the file
    for row, message in [({"pair_id": "p2", "model_a": "x", "model_b": "y", "overall": "a"}, "unknown pair"),
                         ({"pair_id": "p1", "model_a": "x", "model_b": "z", "overall": "a"}, "compares y and x")]:
        path = write_jsonl(tmp_path / "j.jsonl", [row])
        with pytest.raises(ConfigError, match=message):
            read_jsonl_judgments(path, pairs=known)


def test_reward_model_judge_with_any_scorer(tmp_path):
    from lmlab.eval.compare.judges import judge_with_scorer
    from lmlab.eval.compare.pairs import parse_prompt
    from lmlab.eval.compare.session import prepare_pairs
    from lmlab.eval.compare.store import JudgmentStore

    prompts = [parse_prompt(f"question {i}", "t") for i in range(4)]
    gens = {
        "long": lambda ps: [p + " is answered at length here" for p in ps],
        "short": lambda ps: [p[:3] for p in ps],
        "short2": lambda ps: [p[-3:] for p in ps],
    }
    calls = []

    def score(prompt: str, response: str) -> float:
        calls.append((prompt, response))
        return float(len(response))

    with JudgmentStore(tmp_path / "db.sqlite") as store:
        pairs = prepare_pairs(store, gens, prompts, seed=3)
        assert judge_with_scorer(store, pairs, score, tie_margin=0.5) == len(pairs) == 12
        assert judge_with_scorer(store, pairs, score) == 0  # already judged: resumable, no rescoring
        assert len(calls) == 2 * len(pairs)
        judgments = store.judgments("reward-model")
    by_pair = {p.pair_id: p for p in pairs}
    for j in judgments:
        p = by_pair[j.pair_id]
        winner = {"a": p.model_a, "b": p.model_b}.get(j.overall)
        if {p.model_a, p.model_b} == {"short", "short2"}:
            assert j.overall == "tie"  # equal lengths fall inside the margin
        else:
            assert winner == "long"
        assert j.helpfulness is None


def test_report_files_and_table(tmp_path):
    from lmlab.eval.compare.report import build_report, format_table, write_results
    from lmlab.eval.compare.schema import Judgment

    js = [Judgment(f"p{i}", "x", "y", "a" if i % 3 else "b", helpfulness="a", source="jsonl") for i in range(9)]
    report = build_report(js, n_bootstrap=100, judge="jsonl")
    assert report["criteria"]["honesty"] is None and report["criteria"]["harmlessness"] is None
    overall = {m["model"]: m for m in report["criteria"]["overall"]["models"]}
    assert overall["x"]["win_rate"] == pytest.approx(6 / 9)
    assert report["choice_counts"]["overall"] == {"a": 6, "b": 3, "tie": 0}
    table = format_table(report)
    assert "overall (9 judgments" in table and "helpfulness" in table and "honesty" not in table
    paths = write_results(report, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["criteria"]["overall"]["n_judgments"] == 9
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_cli_jsonl_mode(tmp_path, capsys):
    from lmlab.eval.compare_cli import main

    rows = [{"prompt": f"q{i}", "model_a": "sft", "model_b": "base", "overall": "a" if i < 6 else "tie"} for i in range(8)]
    path = write_jsonl(tmp_path / "judgments.jsonl", rows)
    out = tmp_path / "res"
    rc = main(["--judge", "jsonl", "--judgments", str(path), "--out", str(out), "--bootstrap", "50", "--db", str(tmp_path / "none.sqlite")])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    rows_by_model = {m["model"]: m for m in res["criteria"]["overall"]["models"]}
    assert rows_by_model["sft"]["win_rate"] == pytest.approx(7 / 8)
    assert rows_by_model["sft"]["bt_rating"] - rows_by_model["base"]["bt_rating"] == pytest.approx(400 * math.log10(7), abs=1e-6)
    assert (out / "ratings.png").stat().st_size > 0
    assert not (tmp_path / "none.sqlite").exists()  # a JSONL run does not create a database
    assert "sft" in capsys.readouterr().out

    assert main(["--judge", "jsonl"]) == 2
    assert main(["--judge", "jsonl", "--judgments", str(path), "--a", "x", "--b", "y", "--out", str(out)]) == 2  # unknown model names
    assert main(["--a", "only.ckpt", "--prompts", "p.txt"]) == 2
    assert main(["--judge", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("lmlab eval compare: ") for line in err)
    assert "--judgments" in err[0] and "unknown model" in err[1] and "--a" in err[2]


def test_reward_scorer_from_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from lmlab.data.posttrain.verifiable import build_char_tokenizer
    from lmlab.eval.compare.judges import load_reward_scorer
    from lmlab.models import ScalarModel, TransformerConfig

    tok = build_char_tokenizer()
    cfg = TransformerConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    model = ScalarModel(cfg)
    ckpt = tmp_path / "rm.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "lmlab": {"model_config": cfg.to_dict()}}, ckpt)
    score = load_reward_scorer(ckpt, tok, device="cpu")
    s1, s2 = score("1+1", "2"), score("1+1", "3")
    assert math.isfinite(s1) and s1 != s2
    assert score("1+1", "2") == pytest.approx(s1)
    # no reward head: refused
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith("score")}, "lmlab": {"model_config": cfg.to_dict()}}, ckpt)
    with pytest.raises(ConfigError, match="reward head"):
        load_reward_scorer(ckpt, tok, device="cpu")
