"""``lmlab eval compare``: pairwise human (or reward-model) preference evaluation of checkpoints.

    lmlab eval compare --a CKPT_A --b CKPT_B [--model NAME=CKPT ...] --prompts FILE
        [--judge web|jsonl|reward-model] [--judgments FILE.jsonl] [--reward_model CKPT]
        [--db DIR/judgments.sqlite] [--out DIR] [--port 0] [--host 127.0.0.1]

Every model answers every prompt (responses cached in the database); all pairs
of models meet on every prompt, sides drawn per pair from ``--seed`` and
recorded. Judgments come from a local web page (``web``; resumable, the
command exits once every pair is judged or on Ctrl-C), a JSONL file
(``jsonl``; no generation needed) or a reward model (``reward-model``). The
command prints win rates, Bradley-Terry and Elo ratings with bootstrap
intervals per criterion and writes ``results.json`` and ``ratings.png`` to
``--out`` (default: the database's directory).

``--a``/``--b`` take ``CKPT`` (named ``a``/``b``) or ``NAME=CKPT``. Bad input
exits with status 2 and one line: ``lmlab eval compare: error: <field>: <problem> (<fix>)``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional

from lmlab.errors import ConfigError
from lmlab.verbs import run

PROG = "lmlab eval compare"
DEFAULT_DB = "runs/compare/judgments.sqlite"
#: Seconds the server keeps answering after the last pair is judged, so the page can fetch the results.
DONE_GRACE_S = 3.0


def compare(
    a: Optional[str] = None,
    b: Optional[str] = None,
    model: list[str] = [],  # noqa: B006 - jsonargparse reads the default; never mutated
    prompts: Optional[str] = None,
    tokenizer: Optional[str] = None,
    max_new_tokens: int = 256,
    chat_template: bool = True,
    seed: int = 0,
    device: Optional[str] = None,
    judge: Literal["web", "jsonl", "reward-model"] = "web",
    judgments: Optional[str] = None,
    reward_model: Optional[str] = None,
    tie_margin: float = 0.0,
    db: str = DEFAULT_DB,
    annotator: str = "",
    host: str = "127.0.0.1",
    port: int = 0,
    keep_serving: bool = False,
    out: Optional[str] = None,
    bootstrap: int = 1000,
    level: float = 0.95,
    k_factor: float = 32.0,
    anchor: float = 1000.0,
    anchor_model: Optional[str] = None,
) -> int:
    """Pairwise preference evaluation: generate paired responses, collect judgments, rate the models.

    Args:
        a: First model, [NAME=]CKPT (named 'a' unless NAME= is given).
        b: Second model, [NAME=]CKPT (named 'b' unless NAME= is given).
        model: Another model, NAME=CKPT; repeat --model for more.
        prompts: Prompts: .txt (one per line), .jsonl or .json.
        tokenizer: Tokenizer directory or tokenizer.json (default: the one found beside each checkpoint).
        max_new_tokens: Longest response.
        chat_template: Wrap prompts in the chat template (--no_chat_template: plain text, for base models).
        seed: Seed of the side assignment, pair order and bootstrap.
        device: Device for the reward model (default: cuda if available).
        judge: Who judges: the local web page, a JSONL file, or a reward model.
        judgments: Judgments file for --judge jsonl.
        reward_model: Reward checkpoint for --judge reward-model.
        tie_margin: Reward-model scores closer than this tie.
        db: SQLite database of responses and judgments.
        annotator: Judge's name; each annotator judges every pair once.
        host: Address the page listens on (default 127.0.0.1: this computer only).
        port: Port of the page (0: any free port).
        keep_serving: Keep the page up after the last pair (stop with Ctrl-C).
        out: Where results.json and ratings.png go (default: beside --db).
        bootstrap: Bootstrap resamples (0: no intervals).
        level: Confidence level of the intervals.
        k_factor: K of the sequential Elo view.
        anchor: Rating given to the models' mean, or to --anchor_model.
        anchor_model: Model pinned at --anchor instead of the mean.
    """
    args = argparse.Namespace(**locals())
    models = _models(args)
    _check_args(args, models)
    out_dir = Path(args.out).expanduser() if args.out else Path(args.db).expanduser().parent
    if args.judge == "jsonl":
        return _run_jsonl(args, models, out_dir)
    return _run_generating(args, models, out_dir)


def _parse_model(spec: str, default_name: str | None, field: str) -> tuple[str, str]:
    from lmlab.eval.compare.pairs import check_model_name

    name, sep, path = spec.partition("=")
    if not sep:
        if default_name is None:
            raise ConfigError(field, f"expected NAME=CKPT, got {spec!r}", "e.g. --model sft=runs/sft/last.ckpt")
        name, path = default_name, spec
    if not path:
        raise ConfigError(field, f"no checkpoint in {spec!r}", "write NAME=CKPT")
    return check_model_name(name, field), path


def _models(args: argparse.Namespace) -> dict[str, str]:
    specs = []
    if args.a:
        specs.append(_parse_model(args.a, "a", "--a"))
    if args.b:
        specs.append(_parse_model(args.b, "b", "--b"))
    specs += [_parse_model(s, None, "--model") for s in args.model]
    models: dict[str, str] = {}
    for name, path in specs:
        if name in models:
            raise ConfigError("--model", f"model name {name!r} given twice", "give each model a distinct NAME=")
        models[name] = path
    return models


def _check_args(args: argparse.Namespace, models: dict[str, str]) -> None:
    if args.bootstrap < 0:
        raise ConfigError("--bootstrap", f"must be >= 0, got {args.bootstrap}", "use e.g. 1000")
    if not 0 < args.level < 1:
        raise ConfigError("--level", f"must be in (0, 1), got {args.level}", "e.g. 0.95")
    if args.k_factor <= 0:
        raise ConfigError("--k_factor", f"must be > 0, got {args.k_factor}", "the usual range is 4-32")
    if not 0 <= args.port <= 65535:
        raise ConfigError("--port", f"must be in 0..65535, got {args.port}", "use 0 for any free port")
    if args.max_new_tokens < 1:
        raise ConfigError("--max_new_tokens", f"must be >= 1, got {args.max_new_tokens}")
    if len(args.annotator) > 64:
        raise ConfigError("--annotator", f"longer than 64 characters ({len(args.annotator)})", "use a short name")
    if args.anchor_model is not None and models and args.anchor_model not in models:
        raise ConfigError("--anchor_model", f"{args.anchor_model!r} is not one of the models {list(models)}", "name a compared model")
    if args.judge == "jsonl":
        if not args.judgments:
            raise ConfigError("--judgments", "required with --judge jsonl", "give the judgments .jsonl file")
        return
    if args.judgments:
        raise ConfigError("--judgments", f"only used with --judge jsonl, not {args.judge}", "add --judge jsonl or drop --judgments")
    if len(models) < 2:
        raise ConfigError("--a", f"need at least two models, got {len(models)}", "give --a CKPT and --b CKPT (and more with --model NAME=CKPT)")
    if not args.prompts:
        raise ConfigError("--prompts", "required to generate responses", "give a .txt, .jsonl or .json prompt file")
    if args.judge == "reward-model" and not args.reward_model:
        raise ConfigError("--reward_model", "required with --judge reward-model", "give a reward checkpoint")


class CheckpointGenerator:
    """``generate(prompts) -> responses`` from a checkpoint, loaded on first use and freed by :meth:`close`.

    ``stop`` strings go to the model; responses are also cut at any ``cut``
    string (chat markers, in case a tokenizer decodes them as text).
    """

    def __init__(self, path: str, tokenizer: str | None, max_new_tokens: int, stop: Sequence[str] = (), cut: Sequence[str] = ()):
        self.path = path
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.stop = list(stop)
        self.cut = [*stop, *cut]
        self._model: Any = None

    def _load(self) -> Any:
        try:
            from lmlab.eval.adapter import LmlabLM
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("lmlab"):
                raise ConfigError("--model", "generation needs lmlab.eval.adapter, which this installation lacks", "use --judge jsonl with existing judgments") from None
            raise
        return LmlabLM.from_checkpoint(self.path, self.tokenizer)

    def __call__(self, prompts: list[str]) -> list[str]:
        if self._model is None:
            self._model = self._load()
        outs = self._model.generate(prompts, self.max_new_tokens, self.stop)
        return [_cut(o, self.cut) for o in outs]

    def close(self) -> None:
        """Drop the model (and its accelerator memory)."""
        if self._model is not None:
            self._model = None
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:
                pass


def _cut(text: str, stop: Sequence[str]) -> str:
    """Cut at the first stop string (adapters may overshoot by a token) and trim whitespace."""
    for s in stop:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text.strip()


def _render_chat(prompt: Any) -> str:
    from lmlab.data.posttrain.chat import format_chat

    return format_chat(prompt.as_messages(), add_generation_prompt=True)


def _report_fn(args: argparse.Namespace, models: Sequence[str] | None):
    from lmlab.eval.compare.report import build_report

    return partial(
        build_report, models=models, n_bootstrap=args.bootstrap, seed=args.seed, level=args.level,
        k=args.k_factor, anchor=args.anchor, anchor_model=args.anchor_model,
    )


def _finish(report: dict[str, Any], out_dir: Path) -> int:
    from lmlab.eval.compare.report import format_table, write_results

    print(format_table(report))
    paths = write_results(report, out_dir)
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _run_jsonl(args: argparse.Namespace, models: dict[str, str], out_dir: Path) -> int:
    from lmlab.eval.compare.judges import read_jsonl_judgments

    pairs = None
    db = Path(args.db).expanduser()
    if db.exists():  # only to check pair_id references; a JSONL run never writes the database
        from lmlab.eval.compare.store import JudgmentStore

        with JudgmentStore(db) as store:
            pairs = store.pairs()
    names = list(models) or None
    judgments = read_jsonl_judgments(args.judgments, pairs=pairs, models=names)
    report = _report_fn(args, names)(judgments, judge="jsonl", judgments_file=str(args.judgments))
    return _finish(report, out_dir)


def _serve(args: argparse.Namespace, app: Any) -> None:
    from lmlab.eval.compare.server import CompareServer, _is_loopback

    try:
        server = CompareServer(app, args.host, args.port)
    except OSError as e:
        raise ConfigError("--port", f"cannot listen on {args.host}:{args.port}: {e.strerror or e}", "choose another --port or 0") from None
    if not _is_loopback(args.host):
        print(f"{PROG}: warning: listening on {args.host}; anyone who can reach it can read the responses and judge", file=sys.stderr)
    done = threading.Event()
    if not args.keep_serving:
        judge = app.judge

        def judge_and_check(payload: Any) -> dict[str, Any]:
            out = judge(payload)
            if out["progress"]["judged"] >= out["progress"]["total"] and not done.is_set():
                done.set()
                threading.Timer(DONE_GRACE_S, server.httpd.shutdown).start()
            return out

        app.judge = judge_and_check
    progress = app.progress()
    print(f"judge {progress['total'] - progress['judged']} of {progress['total']} pairs at {server.url}  (Ctrl-C to stop)", flush=True)
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if previous is not None:
        signal.signal(signal.SIGTERM, _raise_interrupt)  # a plain kill still writes the results
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped; judgments so far are saved", file=sys.stderr)
    finally:
        server.httpd.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _run_generating(args: argparse.Namespace, models: dict[str, str], out_dir: Path) -> int:
    from lmlab.eval.compare.pairs import load_prompts
    from lmlab.eval.compare.session import prepare_pairs
    from lmlab.eval.compare.store import JudgmentStore

    prompts = load_prompts(args.prompts)
    chat = args.chat_template
    # the model stops on its end-of-turn and EOS tokens itself; stop strings would only make it re-decode as it goes
    generators = {name: CheckpointGenerator(path, args.tokenizer, args.max_new_tokens, cut=["<|end|>", "<|eos|>"]) for name, path in models.items()}
    sources = {
        name: json.dumps({"checkpoint": str(Path(path).expanduser().resolve()), "max_new_tokens": args.max_new_tokens, "chat_template": chat}, sort_keys=True)
        for name, path in models.items()
    }
    report_fn = _report_fn(args, list(models))
    with JudgmentStore(args.db) as store:
        pairs = prepare_pairs(store, generators, prompts, seed=args.seed, sources=sources, render=_render_chat if chat else None)
        ids = {p.pair_id for p in pairs}
        if args.judge == "reward-model":
            from lmlab.eval.compare.judges import judge_with_scorer, load_reward_scorer

            done = store.judged_ids("reward-model", args.annotator)
            if not ids <= done:
                scorer = load_reward_scorer(args.reward_model, args.tokenizer, args.device)
                judge_with_scorer(store, pairs, scorer, args.tie_margin, args.annotator)
            judgments = store.judgments("reward-model", ids)
            report = report_fn(judgments, judge="reward-model", reward_model=str(args.reward_model), db=str(store.path))
        else:
            from lmlab.eval.compare.server import CompareApp

            app = CompareApp(store, pairs, args.annotator, report=report_fn)
            if app.progress()["judged"] < len(pairs):
                _serve(args, app)
            else:
                print(f"all {len(pairs)} pairs are already judged in {store.path}")
            judgments = app.judgments()
            report = report_fn(judgments, judge="web", progress=app.progress(), db=str(store.path))
    return _finish(report, out_dir)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lmlab eval compare``; returns the exit status (2 for bad input)."""
    return run(PROG, compare, argv)


if __name__ == "__main__":
    sys.exit(main())
