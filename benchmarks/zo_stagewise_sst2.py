"""DPZero vs stagewise DP-ZO (DP-ZOSO) vs stagewise + data-free pruning (DP-ZOPO) on SST-2 at ε = 8: dev accuracy,
step time and peak memory, with the same model, steps, data and seeds.

    python benchmarks/zo_stagewise_sst2.py                              # pretrained tiny model if present, 2 seeds
    python benchmarks/zo_stagewise_sst2.py --model roberta-base --steps 10000 --lr 1e-6 --clip 100   # a real checkpoint

Task: prompt-based SST-2 as in MeZO/DPZero's RoBERTa experiments: ``[CLS] <sentence> it was [MASK] . [SEP]``, the
masked-LM logits of the label words ``terrible`` / ``great`` at the mask are the class logits (no new head: ZO needs
the pretrained structure). Full fine-tuning: every parameter of the masked LM is trainable (word embeddings included,
tied with the output layer), or all but the word embeddings with ``--freeze-embeddings``.

Model: ``--model`` (any Hugging Face masked LM, name or path); default ``benchmarks/cache/pretrained/tiny-roberta``
when its ``DONE`` file exists (a RoBERTa-style MLM pretrained by ``benchmarks/pretrain_tiny.py`` on text that is not
SST-2), else a randomly initialized RoBERTa-style MLM from config, with a warning: from random weights zeroth-order
training stays at chance and the comparison says little.

Variants (each (variant, seed) in its own fresh child process, started with glibc returning freed memory at once so
that the RSS follows the live memory):

``dpzero``      ``DPZeroStrategy(eps=8, clip=C, zo_eps=λ)``, constant lr and λ.
``stagewise``   + ``StagewiseZO(stages=3, lr_decay=0.5, zo_eps_end=λ_end, prox=γ)``: stages of T0, 2T0, 4T0 steps
                filling the run, lr halved and λ decayed geometrically per stage, proximal pull to each stage start.
``pruned``      + ``ZOPruning(trainable_fraction=f, score="zo_hessian")``: only f of the coordinates (data-free
                ZO-Hessian score on the sign-linearized network with a one-token input) are perturbed and trained.
``pruned_magnitude``  (optional) the same with the magnitude baseline score (``score="magnitude"``).

Figures: dev accuracy on all 872 dev sentences after training (mean ± std over seeds), the training time per step
(Lightning's ``Timer`` over the training stage divided by the steps; Poisson batch assembly included, no validation
during training), the peak RSS growth above the memory held before ``fit`` (model, tokenized data and libraries
resident; kernel high-water mark), split at the start of training into the training loop's peak (persistent state
such as a proximal anchor or a mask included) and the setup's peak (e.g. the pruning score's transient copy of the
network), and ε as reported by the strategy. ``--lr-pruned`` sets a separate learning rate for the pruned variant (the ZO step norm scales with
the square root of the number of trained coordinates), default: the same ``--lr``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
DEFAULT_MODEL = os.path.join(REPO, "benchmarks", "cache", "pretrained", "tiny-roberta")
VARIANTS = ("dpzero", "stagewise", "pruned")
OPTIONAL_VARIANTS = ("pruned_magnitude",)  # --variants dpzero,stagewise,pruned,pruned_magnitude
LABEL_WORDS = ("terrible", "great")


def build_mlm(model: str | None, tokenizer, seed: int):
    import torch
    from transformers import AutoModelForMaskedLM, RobertaConfig, RobertaForMaskedLM

    if model:
        return AutoModelForMaskedLM.from_pretrained(model)
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=1024, max_position_embeddings=130, type_vocab_size=1,
                           pad_token_id=tokenizer.pad_token_id)
    return RobertaForMaskedLM(config)


def encode(rows, tokenizer, max_length: int):
    """Prompted inputs ``[CLS] sentence it was [MASK] . [SEP]`` (the sentence truncated so the prompt always fits),
    padded to ``max_length``; returns a dict of tensors with the mask position of each row."""
    import torch

    suffix = tokenizer("it was", add_special_tokens=False)["input_ids"]
    period = tokenizer(".", add_special_tokens=False)["input_ids"]
    room = max_length - len(suffix) - len(period) - 3
    sentences = tokenizer([s for s, _ in rows], add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
    ids = torch.full((len(rows), max_length), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), max_length), dtype=torch.long)
    mask_pos = torch.zeros(len(rows), dtype=torch.long)
    for i, sent in enumerate(sentences):
        seq = [tokenizer.cls_token_id, *sent, *suffix, tokenizer.mask_token_id, *period, tokenizer.sep_token_id]
        ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        mask_pos[i] = 1 + len(sent) + len(suffix)
    labels = torch.tensor([y for _, y in rows])
    return {"input_ids": ids, "attention_mask": attention, "mask_pos": mask_pos, "labels": labels}


def child(args) -> None:
    import lightning.pytorch as L
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import Timer
    from torch.utils.data import DataLoader, Dataset

    from _common import PeakMemory, _read_status_kib, _reset_hwm, emit_result
    from lightning_dp import DPZeroStrategy
    from lightning_dp.callbacks.pruning import ZOPruning
    from lightning_dp.callbacks.stagewise import StagewiseZO

    sys.path.insert(0, os.path.join(REPO, "examples"))
    from sst2_dpzero import load_tokenizer, read_sst2  # the examples' SST-2 reader and tokenizer

    torch.set_num_threads(args.threads)
    variant, seed = args.child, args.seed
    L.seed_everything(seed, verbose=False)
    train_rows, dev_rows = read_sst2(args.data_dir)
    if args.train_size:
        train_rows = train_rows[: args.train_size]
    tokenizer = load_tokenizer(args.model, args.data_dir)
    label_ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in LABEL_WORDS]
    if any(len(ids) != 1 for ids in label_ids):
        raise RuntimeError(f"label words {LABEL_WORDS} are not single tokens of this tokenizer: {label_ids}")
    label_ids = [ids[0] for ids in label_ids]

    class Encoded(Dataset):
        def __init__(self, rows):
            self.data = encode(rows, tokenizer, args.max_length)

        def __len__(self):
            return len(self.data["labels"])

        def __getitem__(self, i):
            return {k: v[i] for k, v in self.data.items()}

    def collate(samples):
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        width = int(batch["attention_mask"].sum(1).max())
        batch["input_ids"] = batch["input_ids"][:, :width]
        batch["attention_mask"] = batch["attention_mask"][:, :width]
        return batch

    class PromptClassifier(L.LightningModule):
        def __init__(self, mlm):
            super().__init__()
            self.mlm = mlm
            self.register_buffer("label_ids", torch.tensor(label_ids), persistent=False)

        def class_logits(self, batch):
            hidden = self.mlm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
            at_mask = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["mask_pos"]]
            head = getattr(self.mlm, "lm_head", None)  # RoBERTa-style; BERT-style masked LMs call it `cls`
            head = head if head is not None else self.mlm.cls
            return head(at_mask)[:, self.label_ids].float()

        def training_step(self, batch, batch_idx):
            per_example = F.cross_entropy(self.class_logits(batch), batch["labels"], reduction="none")
            return {"loss": per_example.mean(), "per_sample_loss": per_example}

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self._lr)

    module = PromptClassifier(build_mlm(args.model, tokenizer, seed))
    if args.freeze_embeddings:  # the word embeddings (tied with the output layer): 70% of the tiny model
        module.mlm.get_input_embeddings().weight.requires_grad_(False)
    pruned = variant.startswith("pruned")
    module._lr = args.lr_pruned if (pruned and args.lr_pruned) else args.lr
    train = DataLoader(Encoded(train_rows), batch_size=args.batch_size, collate_fn=collate)
    dev = DataLoader(Encoded(dev_rows), batch_size=128, collate_fn=collate)

    def dev_accuracy() -> float:
        module.eval()
        correct = total = 0
        with torch.no_grad():
            for batch in dev:
                correct += int((module.class_logits(batch).argmax(-1) == batch["labels"]).sum())
                total += len(batch["labels"])
        return correct / total

    initial_acc = dev_accuracy() if args.initial_accuracy else None
    strategy = DPZeroStrategy(eps=args.eps, clip=args.clip, zo_eps=args.zo_eps, seed=seed)
    timer = Timer()

    class SetupPeak(L.Callback):
        """Splits the fit's peak at the start of training: the setup's (pruning score included) and the loop's."""

        setup_kib = None

        def on_train_start(self, trainer, pl_module):
            self.setup_kib = _read_status_kib("VmHWM")
            _reset_hwm()

    setup_peak = SetupPeak()
    callbacks = [timer, setup_peak]
    if pruned:
        score = "magnitude" if variant == "pruned_magnitude" else args.score
        callbacks.append(ZOPruning(trainable_fraction=args.fraction, score=score))
    if variant in ("stagewise", "pruned", "pruned_magnitude"):
        callbacks.append(StagewiseZO(stages=args.stages, lr_decay=0.5, zo_eps_end=args.zo_eps_end, prox=args.prox))
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=args.steps, callbacks=callbacks,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    memory = PeakMemory(torch.device("cpu"))
    memory.start()
    trainer.fit(module, train)
    baseline, loop_peak, method = memory.stop()  # the high-water mark was reset at the start of training
    report = strategy.privacy_report()
    emit_result({
        "variant": variant, "seed": seed, "dev_acc": dev_accuracy(), "initial_dev_acc": initial_acc,
        "s_per_step": timer.time_elapsed("train") / args.steps, "peak_mib": loop_peak / 2**20, "memory_method": method,
        "setup_peak_mib": (setup_peak.setup_kib or 0) * 1024 / 2**20 - baseline / 2**20,
        "baseline_mib": baseline / 2**20, "epsilon": report["epsilon"], "delta": report["delta"],
        "sigma": report["noise_multiplier"], "steps": report["steps"], "zo_eps_final": report["zo_eps"],
        "trainable": report["trainable_coordinates"], "parameters": sum(p.numel() for p in module.parameters()),
        "schedule": strategy.schedule, "passes": strategy.directions.passes,
    })


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA if os.path.isdir(DEFAULT_DATA) else None)
    p.add_argument("--model", default=None, help="Hugging Face masked LM (name or path); default: the tiny pretrained one")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-size", type=int, default=0, help="first N training sentences (0: all 67,349)")
    p.add_argument("--eps", type=float, default=8.0)
    p.add_argument("--clip", type=float, default=20.0)
    p.add_argument("--zo-eps", type=float, default=1e-3)
    p.add_argument("--zo-eps-end", type=float, default=1e-4)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--lr-pruned", type=float, default=None)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--prox", type=float, default=5e-4)
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--score", default="zo_hessian", choices=["zo_hessian", "magnitude"])
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="train every parameter but the word embeddings (tied with the MLM output layer)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--initial-accuracy", action="store_true", help="also report the dev accuracy before training")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.data_dir is None:
        p.error("--data-dir is needed (glue/SST-2 and tokenizers/bert-base-uncased)")
    if args.model is None and os.path.isfile(os.path.join(DEFAULT_MODEL, "DONE")):
        args.model = DEFAULT_MODEL
    unknown = set(args.variants.split(",")) - set(VARIANTS) - set(OPTIONAL_VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS + OPTIONAL_VARIANTS}")
    if args.child:
        child(args)
        return

    from _common import EXACT_MALLOC_ENV, run_child

    if args.model is None:
        print("WARNING: no pretrained model (benchmarks/cache/pretrained/tiny-roberta/DONE is missing): a randomly "
              "initialized MLM is used, and zeroth-order training from random weights stays at chance: the accuracy "
              "column says little.", flush=True)
    forwarded = []
    for key, value in vars(args).items():
        if key in ("seeds", "child", "seed", "variants") or value is None or value is False:
            continue
        forwarded.append(f"--{key.replace('_', '-')}" + ("" if value is True else f"={value}"))
    results = []
    start = time.time()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for variant in args.variants.split(","):
            res = run_child(os.path.abspath(__file__), [*forwarded, f"--child={variant}", f"--seed={seed}"],
                            env={**EXACT_MALLOC_ENV, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
            results.append(res)
            print(f"[{time.time() - start:6.0f} s] {variant} seed {seed}: dev acc {res['dev_acc']:.4f}"
                  + (f" (before: {res['initial_dev_acc']:.4f})" if res["initial_dev_acc"] is not None else "")
                  + f", {res['s_per_step'] * 1e3:.0f} ms/step, peak +{res['peak_mib']:.1f} MiB "
                  f"(setup +{res['setup_peak_mib']:.1f} MiB), "
                  f"ε = {res['epsilon']:.3f}, {res['trainable']} trained coordinates", flush=True)

    def stat(values, fmt):
        if len(values) == 1:
            return format(values[0], fmt)
        return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"

    first = results[0]
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = math.nan
    print(f"\nmodel: {args.model or 'random-init RoBERTa-style MLM'} ({first['parameters'] / 1e6:.2f}M parameters); "
          f"{args.steps} steps, B = {args.batch_size}, ε = {args.eps} at δ = {first['delta']:.2e} "
          f"(σ = {first['sigma']:.3f}), C = {args.clip}, λ = {args.zo_eps} (stagewise: -> {args.zo_eps_end}), "
          f"lr = {args.lr}, {first['trainable']:,} trainable of {first['parameters']:,}; seeds {args.seeds}; "
          f"ZO schedule {first['schedule']}; "
          f"1-min load at the end {load:.1f}; memory: {first['memory_method']}")
    print("\n| variant | trained coordinates | dev accuracy | s / step | peak RSS growth, training (MiB) "
          "| peak RSS growth, setup (MiB) | ε |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant in args.variants.split(","):
        rows = [r for r in results if r["variant"] == variant]
        name = {"dpzero": "DPZero", "stagewise": f"stagewise ({args.stages} stages, γ = {args.prox})",
                "pruned": f"stagewise + pruning ({args.fraction:.0%}, {args.score})",
                "pruned_magnitude": f"stagewise + pruning ({args.fraction:.0%}, magnitude)"}[variant]
        print(f"| {name} | {rows[0]['trainable']:,} | {stat([r['dev_acc'] for r in rows], '.4f')} | "
              f"{stat([r['s_per_step'] for r in rows], '.3f')} | {stat([r['peak_mib'] for r in rows], '.1f')} | "
              f"{stat([r['setup_peak_mib'] for r in rows], '.1f')} | "
              f"{max(r['epsilon'] for r in rows):.3f} |")


if __name__ == "__main__":
    main()
