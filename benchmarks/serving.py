"""Serving throughput: ``lmlab serve`` vs ``transformers serve --continuous-batching``, and 16 clients vs 1.

Both servers load the same transformers export (a random Llama-shaped model
with a BPE tokenizer unless ``--ckpt`` names one) and answer the same greedy
``/v1/completions`` requests, streamed, so time to first token (TTFT) is the
arrival of the first text chunk; output tokens are the servers' own usage
counts. Both servers run at once as their own processes on 127.0.0.1, with the
same pinned thread counts (``harness.pin_threads``), and the load runs
alternate between them round by round, so both see the same machine load.

    python benchmarks/serving.py                          # 32 prompts, 16 clients, 128 new tokens, 2 rounds
    python benchmarks/serving.py --no-continuous_batching # transformers serve without continuous batching
    python benchmarks/serving.py --no-transformers        # lmlab only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORDS = ("the cat sat on a mat while the dog ran in the park and a bird sang over the old tree near quiet water "
         "where fish swim slowly under bright morning light").split()


def make_model(out: Path, d_model: int, n_layers: int, vocab: int, seq: int) -> Path:
    import torch

    from lmlab.data.tokenizer import train_bpe
    from lmlab.models import CausalLM, TransformerConfig
    from lmlab.models.hf import save_hf

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(2000)]
    tok = train_bpe(texts, vocab, out / "tok")
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=max(1, d_model // 64),
                            max_seq_len=seq, tie_embeddings=False)
    model = CausalLM(cfg)
    save_hf(model, out / "hf", tokenizer=tok)
    return out / "hf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def run_load(url: str, model: str, prompts: list[str], clients: int, max_tokens: int, tokenizer) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    todo = list(enumerate(prompts))
    lock = threading.Lock()
    ttfts, tokens, texts, failures = [], [], {}, []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i, prompt = todo.pop(0)
            t0 = time.perf_counter()
            first, parts, used = None, [], None
            try:
                for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}):
                    if chunk.choices and chunk.choices[0].text:
                        first = first or time.perf_counter()
                        parts.append(chunk.choices[0].text)
                    if getattr(chunk, "usage", None):
                        used = chunk.usage.completion_tokens
            except Exception as e:
                failures.append(repr(e))
                continue
            text = "".join(parts)
            with lock:
                ttfts.append((first or time.perf_counter()) - t0)
                # the server's own count; retokenizing the text would miscount tokens that decode to nothing
                tokens.append(used if used is not None else len(tokenizer(text, add_special_tokens=False)["input_ids"]))
                texts[i] = text

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(prompts)} requests failed, e.g. {failures[0][:300]}")
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) > 1 else ttfts * 19
    return {"clients": clients, "requests": len(ttfts), "tokens": sum(tokens), "tok_s": sum(tokens) / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p95": q[18], "wall": wall, "texts": texts}


def start(cmd: list[str], url: str, env: dict, log: Path) -> subprocess.Popen:
    # a file, not a pipe: a server that logs more than a pipe holds would block on its next write
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=err, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(url, proc)
    except Exception:
        proc.terminate()
        proc.wait(timeout=30)
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {log.read_text()[-2000:]}") from None
    return proc


def cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU time so far of a process and its live descendants (Linux; None elsewhere):
    ``transformers serve`` generates in a child process."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    if pid not in stats:
        return None
    tree, grew = {pid}, True
    while grew:
        new = {p for p, (ppid, _) in stats.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return sum(stats[p][1] for p in tree) / os.sysconf("SC_CLK_TCK")


def compare_texts(ours: dict, theirs: dict, n: int) -> tuple[int, int]:
    """(identical, identical once a trailing incomplete UTF-8 character is dropped) of ``n`` outputs.

    transformers' streaming detokenizer holds back text that ends in U+FFFD (an
    incomplete UTF-8 sequence) and never sends it when the stream ends; lmlab
    sends the full decode of the generated tokens, so a greedy output that ends
    in such bytes differs only by those trailing replacement characters.
    """
    exact = sum(ours.get(i) is not None and ours.get(i) == theirs.get(i) for i in range(n))
    loose = sum(ours.get(i) is not None and theirs.get(i) is not None
                and ours[i].rstrip("\ufffd") == theirs[i].rstrip("\ufffd") for i in range(n))
    return exact, loose


def check_with_generate(model_dir: Path, prompts: list[str], texts: dict, max_tokens: int) -> str:
    """Whether transformers' own greedy ``generate`` (one prompt at a time, in this process) gives lmlab's texts;
    for a prompt where it does not, the top-2 logit margin at the first token where the two differ."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    same, margins = 0, []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        stops = model.generation_config.eos_token_id
        stops = set(stops if isinstance(stops, list) else [stops])
        cut = next((j for j, t in enumerate(new) if t in stops), len(new))
        text = tok.decode(new[:cut], skip_special_tokens=True)
        if text == texts.get(i):
            same += 1
            continue
        ours = tok(texts.get(i) or "", add_special_tokens=False)["input_ids"]
        j = next((j for j, (a, b) in enumerate(zip(ours, new)) if a != b), min(len(ours), len(new)))
        with torch.no_grad():
            top = model(torch.tensor([ids[0].tolist() + new[:j]])).logits[0, -1].float().topk(2).values
        margins.append(f"prompt {i}: token {j}, margin {float(top[0] - top[1]):.2e}")
    return (f"transformers generate (no server) vs lmlab serve: {same}/{len(prompts)} identical greedy outputs"
            + (f"; first differences at {'; '.join(margins)}" if margins else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="a transformers export directory (default: a random model built here)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max_tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="alternating load rounds; the median round is reported")
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--n_layers", type=int, default=4)
    ap.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--continuous_batching", action=argparse.BooleanOptionalAction, default=True,
                    help="run transformers serve with --continuous-batching (default)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads of each server process (torch, BLAS, OpenMP), the same for both; the "
                         "client threads of the load run on the same cores")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="run lmlab serve with --compile (its decode step through torch.compile, warmed up before "
                         "it listens)")
    ap.add_argument("--check_generate", action="store_true",
                    help="also compare lmlab's outputs with transformers' generate on each prompt (no server)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    from harness import Side, alternate, pin_threads, report_ratio

    # set before the servers start: they inherit the thread variables through the environment
    threads = pin_threads(args.threads)
    from lmlab.data.tokenizer import load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="lmlab-serving-bench-"))
    model_dir = Path(args.ckpt) if args.ckpt else make_model(tmp, args.d_model, args.n_layers, 1024, 512)
    tok = load_tokenizer(str(model_dir))
    rng = random.Random(1)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(args.prompts)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    hf_name = "transformers serve" + (" --continuous-batching" if args.continuous_batching else "")
    # transformers sizes its paged KV cache from the memory it finds free (on the CPU, the host's); the same
    # capacity as lmlab's cache (clients x 512 tokens) keeps it from taking gigabytes, and a prefill budget of
    # 2048 tokens per step covers every prompt of a wave
    cb_cache = ["--cb-block-size", "32", "--cb-num-blocks", str(args.clients * 512 // 32), "--cb-max-batch-tokens", "2048"]
    procs, notes = [], []
    results: dict[str, list[dict]] = {"lmlab 1": [], "lmlab many": [], "hf many": []}

    def load(key: str, url: str, model: str, clients: int, proc: subprocess.Popen):
        def step():
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            cpu0 = cpu_seconds(proc.pid)
            r = run_load(url, model, prompts, clients, args.max_tokens, tok)
            cpu1 = cpu_seconds(proc.pid)
            # CPU time the server spent per output token: less sensitive to other load than tokens/s
            r["cpu_ms_tok"] = None if cpu0 is None or cpu1 is None else 1000 * (cpu1 - cpu0) / max(r["tokens"], 1)
            results[key].append(r)
        return step

    try:
        port = free_port()
        lm_url = f"http://127.0.0.1:{port}"
        procs.append(start([sys.executable, "-m", "lmlab.cli", "serve", "--ckpt", str(model_dir), "--port", str(port),
                            "--model_name", "bench", "--max_batch", str(args.clients), "--device", "cpu"]
                           + (["--compile", "true"] if args.compile else []), lm_url, env,
                           tmp / "lmlab-serve.log"))
        lm_proc = procs[-1]
        run_load(lm_url, "bench", prompts[:2], 1, 8, tok)  # warm-up
        sides = [Side("lmlab serve, many clients", load("lmlab many", lm_url, "bench", args.clients, lm_proc))]
        if args.transformers:
            port = free_port()
            hf_url = f"http://127.0.0.1:{port}"
            try:
                procs.append(start([str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir), "--host",
                                    "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning"]
                                   + (["--continuous-batching"] + cb_cache if args.continuous_batching else []), hf_url, env,
                                   tmp / "transformers-serve.log"))
                run_load(hf_url, str(model_dir), prompts[:2], 1, 8, tok)
                sides.append(Side(hf_name, load("hf many", hf_url, str(model_dir), args.clients, procs[-1])))
            except Exception as e:
                notes.append(f"transformers serve did not run: {str(e).strip().splitlines()[-1]}")
        sides.append(Side("lmlab serve, 1 client", load("lmlab 1", lm_url, "bench", 1, lm_proc)))
        alternate(sides, steps=args.rounds, warmup=0)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)

    def median_run(key: str) -> Optional[dict]:
        runs = sorted(results[key], key=lambda r: r["tok_s"])
        return runs[len(runs) // 2] if runs else None

    one, many, hf = median_run("lmlab 1"), median_run("lmlab many"), median_run("hf many")
    failed = {s.name: s.error for s in sides if s.error}
    for name, error in failed.items():
        notes.append(f"{name} failed: {error}")
    rows = [(n, r) for n, r in (("lmlab serve", one), ("lmlab serve", many), (hf_name, hf)) if r is not None]
    print(f"{len(prompts)} prompts, {args.max_tokens} new tokens, greedy, streamed; {os.cpu_count()} CPU cores, "
          f"{threads} intra-op thread(s) per server; median of {args.rounds} alternating rounds")
    print("| server | clients | requests ok | output tok/s | TTFT p50 (s) | TTFT p95 (s) | server CPU ms / token |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        cpu = "n/a" if r.get("cpu_ms_tok") is None else f"{r['cpu_ms_tok']:.2f}"
        print(f"| {name} | {r['clients']} | {r['requests']}/{len(prompts)} | {r['tok_s']:.1f} | {r['ttft_p50']:.3f} | "
              f"{r['ttft_p95']:.3f} | {cpu} |")
    if one and many:
        exact, _ = compare_texts(one["texts"], many["texts"], len(prompts))
        notes.append(f"lmlab 1 vs {args.clients} clients: {exact}/{len(prompts)} identical greedy outputs")
    if many and hf:
        exact, loose = compare_texts(many["texts"], hf["texts"], len(prompts))
        notes.append(f"lmlab vs transformers: {exact}/{len(prompts)} identical greedy outputs, {loose}/{len(prompts)} "
                     f"identical up to a trailing incomplete UTF-8 character (which transformers' stream never sends)")
    if many and args.check_generate:
        notes.append(check_with_generate(model_dir, prompts, many["texts"], args.max_tokens))
    report_ratio(f"lmlab {args.clients} clients / 1 client throughput", many and many["tok_s"], one and one["tok_s"],
                 "same server, same requests; 1 client sends them one at a time")
    if args.transformers:
        report_ratio(f"lmlab / {hf_name} throughput at {args.clients} clients", many and many["tok_s"], hf and hf["tok_s"],
                     "same export, requests, client and thread pinning; lmlab: FastAPI + uvicorn and its "
                     "continuous-batching engine over one KV cache" + (", decode step compiled" if args.compile else "")
                     + "; transformers: its own server and generation loop",
                     failed=failed.get(hf_name))
    if many and hf and many.get("cpu_ms_tok") and hf.get("cpu_ms_tok"):
        report_ratio(f"lmlab / {hf_name} CPU time per output token at {args.clients} clients", many["cpu_ms_tok"],
                     hf["cpu_ms_tok"], higher_is_better=False)
    for key, name in (("lmlab many", f"lmlab serve, {args.clients} clients"), ("hf many", hf_name),
                      ("lmlab 1", "lmlab serve, 1 client")):
        if results[key]:
            notes.append(f"{name}, output tok/s per round: " + ", ".join(f"{r['tok_s']:.1f}" for r in results[key]))
    for note in notes:
        print(note)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": [(n, {k: v for k, v in r.items() if k != "texts"}) for n, r in rows],
                                              "notes": notes, "threads": threads, "rounds": args.rounds}, indent=2))


if __name__ == "__main__":
    main()
