"""CPU distillation study: does a student distilled from a larger lmlab model beat the same student trained on CE alone?

Three runs on the shared mixture (../shared/data: web, books, papers, code,
reference at the weights of experiments/data/shared_mix.yaml, read as raw
files with a 2048-token byte-level BPE):

1. teacher: a larger PretrainModule, trained for ``--teacher_steps``;
2. student (CE): a small PretrainModule, ``--student_steps`` steps;
3. student (KD): the same student (same init, same batches, same schedule)
   as a DistillModule with the teacher of run 1.

Validation bits per byte of all three are written to ``--json`` and their
curves to ``--png``. Run from the repository root:

    python docs/study/distill_cpu.py --data ../shared/data --out runs/distill_study
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lmlab.atomic import atomic_path, atomic_write_json
from lmlab.data import PretrainDataModule, SourceConfig, TokenizerTrainConfig
from lmlab.models import TransformerConfig
from lmlab.models.counting import count_params
from lmlab.modules import DistillModule, OptimizerConfig, PretrainModule, ScheduleConfig, TrainingSettings

HERE = Path(__file__).resolve().parent


class Curves(pl.Callback):
    """Per-step training loss (and CE, for the distilled run) of one run."""

    def __init__(self):
        self.train: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        row = {"step": int(trainer.global_step), "loss": float(outputs["loss"])}
        for key in ("train/ce", "train/divergence", "train/bpb"):
            if key in m:
                row[key.split("/")[1]] = float(m[key])
        self.train.append(row)


def sources(data: Path) -> list[SourceConfig]:
    return [
        SourceConfig("web", 0.65, path=str(data / "web" / "*.jsonl")),
        SourceConfig("books", 0.18, path=str(data / "books" / "*.txt")),
        SourceConfig("papers", 0.07, path=str(data / "papers" / "arxiv_latex_sample_llmfoundry.jsonl")),
        SourceConfig("code", 0.06, path=str(data / "code" / "codexglue_cosqa_dev_python.json"), text_field="code"),
        SourceConfig("reference", 0.04, path=str(data / "reference" / "wikitext2_*.txt")),
    ]


def datamodule(args) -> PretrainDataModule:
    return PretrainDataModule(
        sources=sources(Path(args.data)), tokenizer=str(Path(args.out) / "tokenizer"),
        tokenizer_train=TokenizerTrainConfig(vocab_size=args.vocab, sample_chars=2_000_000),
        seq_len=args.seq_len, batch_size=args.batch_size, val_fraction=0.02, val_max_windows=args.val_windows,
        seed=1337, cache_dir=str(Path(args.out) / "cache"),
    )


def settings(lr: float, warmup: int) -> TrainingSettings:
    return TrainingSettings(optimizer=OptimizerConfig(lr=lr, weight_decay=0.1),
                            schedule=ScheduleConfig(name="cosine", warmup_steps=warmup))


def run(name: str, module: pl.LightningModule, steps: int, args, ckpt: Path | None = None) -> dict:
    curves = Curves()
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, val_check_interval=args.val_every, check_val_every_n_epoch=None,
                         callbacks=[curves], default_root_dir=str(Path(args.out) / name))
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule(args))
    wall = time.perf_counter() - t0
    if ckpt is not None:
        trainer.save_checkpoint(ckpt)
    final = module.val_history[-1]
    print(f"{name}: val/bpb {final['val/bpb']:.4f} after {steps} steps, {wall:.0f} s", flush=True)
    return {"steps": steps, "wall_s": round(wall, 1), "params": count_params(module.config).total,
            "non_embedding_params": count_params(module.config).non_embedding,
            "final": {k: v for k, v in final.items()}, "val_history": module.val_history, "train": curves.train}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results["runs"].items():
        steps = [row["step"] for row in r["train"]]
        ce = [row.get("ce", row["loss"]) for row in r["train"]]
        k = 10  # running mean: single steps are noisy
        smooth = [sum(ce[max(0, i - k + 1): i + 1]) / len(ce[max(0, i - k + 1): i + 1]) for i in range(len(ce))]
        a.plot(steps, smooth, label=name)
        b.plot([h["step"] for h in r["val_history"]], [h["val/bpb"] for h in r["val_history"]], marker="o", label=name)
    a.set(xlabel="step", ylabel="train cross-entropy (nats/token, 10-step mean)", title="training CE")
    b.set(xlabel="step", ylabel="validation bits per byte", title="validation bpb (shared mixture)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", default="runs/distill_study")
    p.add_argument("--json", default=str(HERE / "distill_cpu.json"))
    p.add_argument("--png", default=str(HERE / "distill_cpu.png"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--val_windows", type=int, default=24)
    p.add_argument("--val_every", type=int, default=100)
    p.add_argument("--teacher_steps", type=int, default=600)
    p.add_argument("--student_steps", type=int, default=300)
    p.add_argument("--teacher_width", type=int, default=192)
    p.add_argument("--teacher_layers", type=int, default=4)
    p.add_argument("--student_width", type=int, default=64)
    p.add_argument("--student_layers", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--top_k", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def shape(width: int, layers: int) -> TransformerConfig:
        return TransformerConfig(vocab_size=args.vocab, d_model=width, n_layers=layers, n_heads=max(2, width // 32),
                                 max_seq_len=args.seq_len, tie_embeddings=True)

    teacher_ckpt = out / "teacher.ckpt"
    runs = {}
    pl.seed_everything(1337)
    runs["teacher"] = run("teacher", PretrainModule(shape(args.teacher_width, args.teacher_layers), settings(2e-3, 50)),
                          args.teacher_steps, args, teacher_ckpt)
    student = shape(args.student_width, args.student_layers)
    pl.seed_everything(7)
    runs["student_ce"] = run("student_ce", PretrainModule(student, settings(3e-3, 30)), args.student_steps, args)
    pl.seed_everything(7)  # the same initial weights and batches as the CE student
    kd = DistillModule(student, settings(3e-3, 30), teacher=str(teacher_ckpt), alpha=args.alpha,
                       temperature=args.temperature, divergence=args.divergence, top_k=args.top_k)
    runs["student_kd"] = run("student_kd", kd, args.student_steps, args)

    results = {
        "command": "python docs/study/distill_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "hardware": f"{args.threads} CPU threads (torch), 2 CPU cores",
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "png", "out", "data")},
        "summary": {name: {"val_bpb": r["final"]["val/bpb"], "val_loss": r["final"]["val/loss"], "steps": r["steps"],
                           "params": r["params"], "wall_s": r["wall_s"]} for name, r in runs.items()},
        "runs": runs,
    }
    ce, kd_bpb = results["summary"]["student_ce"]["val_bpb"], results["summary"]["student_kd"]["val_bpb"]
    results["summary"]["kd_minus_ce_bpb"] = kd_bpb - ce
    atomic_write_json(args.json, results)
    plot(results, Path(args.png))
    print(json.dumps(results["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
