"""Pretrain a small language model of our own on public text, so that the DP fine-tuning benchmarks start from a
pretrained model (no pretrained weights can be downloaded here, and fine-tuning from random initialization says
little about DP fine-tuning).

    python benchmarks/pretrain_tiny.py --arch roberta --out benchmarks/cache/pretrained/tiny-roberta --max-minutes 25
    python benchmarks/pretrain_tiny.py --arch gpt2    --out benchmarks/cache/pretrained/tiny-gpt2    --max-minutes 12

* ``--arch roberta``: a RoBERTa-style masked LM (``RobertaForMaskedLM``; default hidden 256, 4 layers, 4 heads,
  intermediate 1024, 128-token sequences) with the BERT uncased WordPiece vocabulary
  (``tokenizers/bert-base-uncased`` of ``--data-dir``). Masking: 15% of the non-special tokens, of which 80% become
  ``[MASK]``, 10% a random token, 10% stay (BERT's rule), drawn from a private ``torch.Generator``.
* ``--arch gpt2``: a GPT-2-style causal LM (``GPT2LMHeadModel``, same sizes) with the GPT-2 byte-level BPE
  (``tokenizers/gpt2``).

Text (never SST-2, the classification fine-tuning task): the text of the MNLI and QNLI training subsets
(``text_a``/``text_b``), RTE train/dev sentences, QNLI dev questions/sentences, tiny-shakespeare (split into
speeches) and, for ``roberta`` only, the E2E references (``gpt2`` leaves E2E out by default, because E2E is the
table-to-text fine-tuning task of a GPT-2-style model; see ``--sources``). Documents are packed into fixed-length
sequences (RoBERTa's "full sentences" scheme: ``[CLS] doc [SEP] doc [SEP] ...``; GPT-2: ``doc <|endoftext|> doc``).
The held-out set is the text of ``glue/MNLI/train_heldout_1000.json`` (disjoint from the MNLI training subset); its
loss is evaluated at the start and at the end with a fixed masking.

Optimization: AdamW (betas 0.9/0.98, weight decay 0.01 except biases and LayerNorms), linear warmup over
``--warmup-steps`` steps, then a linear decay to 0 at the end of the budget. The budget is wall-clock time
(``--max-minutes``; the decay follows the elapsed fraction of it, so the run always ends with a decayed learning rate
however fast the machine is) and optionally a step count (``--max-steps``; the decay then follows whichever fraction
is larger). A time budget makes the number of steps, and so the final weights, depend on the machine's speed; the
data order and masking are fixed by ``--seed``.

``--init-from DIR`` continues from the weights of an earlier run (for example a longer budget on an idle machine);
the optimizer and the schedule start afresh and ``pretrain_info.json`` also counts the earlier steps and tokens.

Output (``--out``): ``save_pretrained`` weights and config, the tokenizer, ``pretrain_info.json`` (arch, config,
steps, tokens seen, training-loss curve, held-out loss and perplexity before/after, minutes) and finally an empty
``DONE`` file. The classification benchmarks load it with
``AutoModelForSequenceClassification.from_pretrained(out, num_labels=2)`` (a new, randomly initialized head).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
ALL_SOURCES = ("mnli", "qnli", "rte", "qnli_dev", "shakespeare", "e2e")
EVAL_BATCH = 16  # fixed, so that the seeded held-out masking does not depend on the training batch size
DEFAULT_SOURCES = {"roberta": ALL_SOURCES, "gpt2": ("mnli", "qnli", "rte", "qnli_dev", "shakespeare")}


# ---------------------------------------------------------------------------------------------------------- data
def _read_tsv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        return [dict(zip(header, row)) for row in reader if len(row) == len(header)]


def _read_pairs_json(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    out = []
    for row in rows.values():
        out.extend(t for t in (row.get("text_a"), row.get("text_b")) if t)
    return out


def read_corpus(data_dir: str, sources) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents) from ``data_dir``; every source must exist (a clear error if not)."""
    docs: list[str] = []
    for src in sources:
        if src == "mnli":
            docs += _read_pairs_json(os.path.join(data_dir, "glue", "MNLI", "train_subset_8999.json"))
        elif src == "qnli":
            docs += _read_pairs_json(os.path.join(data_dir, "glue", "QNLI", "train_subset_8999.json"))
        elif src == "rte":
            for split in ("train", "dev"):
                for row in _read_tsv(os.path.join(data_dir, "glue", "RTE", f"{split}.tsv")):
                    docs += [row["sentence1"].strip(), row["sentence2"].strip()]
        elif src == "qnli_dev":
            for row in _read_tsv(os.path.join(data_dir, "glue", "QNLI", "dev.tsv")):
                docs += [row["question"].strip(), row["sentence"].strip()]
        elif src == "shakespeare":
            with open(os.path.join(data_dir, "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
                docs += [p.strip() for p in f.read().split("\n\n") if p.strip()]
        elif src == "e2e":
            for name in ("devset.csv", "testset_w_refs.csv"):
                with open(os.path.join(data_dir, "e2e", name), newline="", encoding="utf-8") as f:
                    docs += [row["ref"].strip() for row in csv.DictReader(f)]
        else:
            raise ValueError(f"unknown source {src!r}; choose from {ALL_SOURCES}")
    held_out = _read_pairs_json(os.path.join(data_dir, "glue", "MNLI", "train_heldout_1000.json"))
    return [d for d in docs if d], held_out


def pack(docs: list[str], tokenizer, arch: str, seq_len: int, seed: int) -> torch.Tensor:
    """Token ids ``[N, seq_len]``: documents in a seeded random order, concatenated with separators and cut into
    sequences (RoBERTa: each sequence is ``[CLS]`` + ``seq_len - 1`` tokens; GPT-2: ``seq_len`` tokens)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    ids = tokenizer([docs[i] for i in order], add_special_tokens=False)["input_ids"]
    sep = tokenizer.sep_token_id if arch == "roberta" else tokenizer.eos_token_id
    stream: list[int] = []
    for x in ids:
        stream.extend(x)
        stream.append(sep)
    body = seq_len - 1 if arch == "roberta" else seq_len
    n = len(stream) // body
    out = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    if arch == "roberta":
        out = torch.cat([torch.full((n, 1), tokenizer.cls_token_id, dtype=torch.long), out], dim=1)
    return out


def mask_tokens(input_ids: torch.Tensor, tokenizer, generator: torch.Generator, p: float = 0.15):
    """BERT masking (private generator): returns (masked inputs, labels with -100 on unmasked positions)."""
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for t in tokenizer.all_special_ids:
        special |= input_ids == t
    chosen = (torch.rand(input_ids.shape, generator=generator) < p) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    u = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[chosen & (u < 0.8)] = tokenizer.mask_token_id
    rand_pos = chosen & (u >= 0.8) & (u < 0.9)
    inputs[rand_pos] = torch.randint(len(tokenizer), (int(rand_pos.sum()),), generator=generator)
    return inputs, labels


# --------------------------------------------------------------------------------------------------------- model
def load_tokenizer(arch: str, data_dir: str):
    if arch == "roberta":
        from transformers import BertTokenizerFast

        tok = BertTokenizerFast.from_pretrained(os.path.join(data_dir, "tokenizers", "bert-base-uncased"))
    else:
        from transformers import GPT2TokenizerFast

        tok = GPT2TokenizerFast.from_pretrained(os.path.join(data_dir, "tokenizers", "gpt2"))
    if len(tok) < 1000:
        raise RuntimeError(f"the {arch} tokenizer has only {len(tok)} tokens: vocabulary not loaded")
    return tok


def build_model(args, tokenizer):
    if args.init_from:
        from transformers import GPT2LMHeadModel, RobertaForMaskedLM

        cls = RobertaForMaskedLM if args.arch == "roberta" else GPT2LMHeadModel
        model = cls.from_pretrained(args.init_from)
        if model.config.vocab_size != len(tokenizer):
            raise ValueError(
                f"{args.init_from} has a vocabulary of {model.config.vocab_size}, the tokenizer {len(tokenizer)}"
            )
        return model
    if args.arch == "roberta":
        from transformers import RobertaConfig, RobertaForMaskedLM

        config = RobertaConfig(
            vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, intermediate_size=args.intermediate,
            max_position_embeddings=args.seq_len + 2, type_vocab_size=1,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
        )
        return RobertaForMaskedLM(config)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=args.gpt2_positions, n_embd=args.hidden, n_layer=args.layers,
        n_head=args.heads, n_inner=args.intermediate,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config)


def lm_loss(model, arch: str, batch: torch.Tensor, tokenizer, generator: torch.Generator | None):
    """Mean token loss and the number of predicted tokens. For the MLM the vocabulary projection runs on the masked
    positions only (the same loss as ``RobertaForMaskedLM(labels=...)``, ~3x cheaper on CPU)."""
    if arch == "roberta":
        inputs, labels = mask_tokens(batch, tokenizer, generator)
        hidden = model.roberta(input_ids=inputs).last_hidden_state
        sel = labels != -100
        logits = model.lm_head(hidden[sel])
        return F.cross_entropy(logits.float(), labels[sel]), int(sel.sum())
    logits = model(input_ids=batch).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)), batch[:, 1:].numel()


@torch.no_grad()
def evaluate(model, arch: str, data: torch.Tensor, tokenizer, batch_size: int, seed: int) -> float:
    """Token-weighted mean loss over ``data`` (for the MLM with a fixed, seeded masking)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        loss, n = lm_loss(model, arch, data[i : i + batch_size], tokenizer, g)
        total += float(loss) * n
        count += n
    model.train()
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("roberta", "gpt2"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default=DEFAULT_DATA if os.path.isdir(DEFAULT_DATA) else None)
    p.add_argument("--sources", default=None, help=f"comma-separated subset of {','.join(ALL_SOURCES)}")
    p.add_argument("--init-from", default=None,
                   help="continue from the weights of an earlier run's --out (a fresh optimizer and schedule)")
    p.add_argument("--max-minutes", type=float, default=25.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=None, help="optional step budget")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--gpt2-positions", type=int, default=256, help="n_positions of the GPT-2 config")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 (roberta), 16 (gpt2)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate; default 5e-4 (roberta), 6e-4 (gpt2)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--eval-sequences", type=int, default=256, help="held-out sequences evaluated")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if not args.data_dir or not os.path.isdir(args.data_dir):
        p.error("--data-dir with glue/, tinyshakespeare/, e2e/ and tokenizers/ is required")
    batch_size = args.batch_size or (32 if args.arch == "roberta" else 16)
    peak_lr = args.lr or (5e-4 if args.arch == "roberta" else 6e-4)
    sources = args.sources.split(",") if args.sources else DEFAULT_SOURCES[args.arch]
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.time()
    tokenizer = load_tokenizer(args.arch, args.data_dir)
    docs, held_docs = read_corpus(args.data_dir, sources)
    train = pack(docs, tokenizer, args.arch, args.seq_len, args.seed)
    held = pack(held_docs, tokenizer, args.arch, args.seq_len, args.seed)[: args.eval_sequences]
    print(f"[pretrain] {args.arch}: {len(docs)} documents from {','.join(sources)} -> {len(train)} sequences x "
          f"{args.seq_len} tokens ({train.numel() / 1e6:.2f} M tokens); held-out {len(held)} sequences "
          f"({time.time() - t_start:.0f} s to prepare)", flush=True)

    torch.manual_seed(args.seed)  # the weight initialization of the transformers model (seeded once, at start)
    model = build_model(args, tokenizer)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        (no_decay if prm.ndim < 2 or "norm" in name.lower() or "ln_" in name else decay).append(prm)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=peak_lr, betas=(0.9, 0.98), eps=1e-6)

    eval_seed = 12345  # the same held-out masking for every run (comparable losses, also across --init-from)
    held_before = evaluate(model, args.arch, held, tokenizer, EVAL_BATCH, eval_seed)
    print(f"[pretrain] {n_params / 1e6:.2f} M parameters; held-out loss at init {held_before:.3f}", flush=True)

    mask_gen = torch.Generator().manual_seed(args.seed + 1)
    order_gen = torch.Generator().manual_seed(args.seed + 2)
    budget_s = args.max_minutes * 60.0
    t0 = time.time()
    step, tokens_seen, epoch = 0, 0, 0
    curve, window = [], []
    perm, pos = torch.randperm(len(train), generator=order_gen), 0
    while True:
        elapsed = time.time() - t0
        frac = elapsed / budget_s
        if args.max_steps:
            frac = max(frac, step / args.max_steps)
        if frac >= 1.0:
            break
        lr = peak_lr * min(1.0, (step + 1) / max(1, args.warmup_steps)) * (1.0 - frac)
        for group in opt.param_groups:
            group["lr"] = lr
        if pos + batch_size > len(perm):
            perm, pos, epoch = torch.randperm(len(train), generator=order_gen), 0, epoch + 1
        batch = train[perm[pos : pos + batch_size]]
        pos += batch_size
        loss, _ = lm_loss(model, args.arch, batch, tokenizer, mask_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += batch.numel()
        window.append(float(loss.detach()))
        if step % args.log_every == 0:
            mean = sum(window) / len(window)
            curve.append({"step": step, "minutes": round((time.time() - t0) / 60, 2), "train_loss": round(mean, 4),
                          "lr": lr})
            print(f"[pretrain] step {step} epoch {epoch} {(time.time() - t0) / 60:.1f} min lr {lr:.2e} "
                  f"train loss {mean:.3f}", flush=True)
            window = []
    train_minutes = (time.time() - t0) / 60
    held_after = evaluate(model, args.arch, held, tokenizer, EVAL_BATCH, eval_seed)
    what = "MLM loss" if args.arch == "roberta" else "LM loss"
    print(f"[pretrain] done: {step} steps, {tokens_seen / 1e6:.2f} M tokens ({tokens_seen / train.numel():.2f} epochs) "
          f"in {train_minutes:.1f} min; held-out {what} {held_before:.3f} -> {held_after:.3f} "
          f"(perplexity {math.exp(held_before):.0f} -> {math.exp(held_after):.1f})", flush=True)

    os.makedirs(args.out, exist_ok=True)
    done = os.path.join(args.out, "DONE")
    if os.path.exists(done):
        os.remove(done)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    earlier = {}
    if args.init_from and os.path.isfile(os.path.join(args.init_from, "pretrain_info.json")):
        with open(os.path.join(args.init_from, "pretrain_info.json")) as f:
            earlier = json.load(f)
    info = {
        "arch": args.arch, "init_from": args.init_from,
        "earlier_steps": earlier.get("steps", 0) + earlier.get("earlier_steps", 0),
        "earlier_tokens_seen": earlier.get("tokens_seen", 0) + earlier.get("earlier_tokens_seen", 0),
        "model_class": type(model).__name__, "config": model.config.to_dict(),
        "parameters": n_params, "sources": list(sources), "train_sequences": len(train), "seq_len": args.seq_len,
        "train_tokens": train.numel(), "batch_size": batch_size, "peak_lr": peak_lr, "warmup_steps": args.warmup_steps,
        "steps": step, "tokens_seen": tokens_seen, "epochs": round(tokens_seen / train.numel(), 3),
        "held_out": "glue/MNLI/train_heldout_1000.json text", "held_out_sequences": len(held),
        "held_out_loss_init": held_before, "held_out_loss": held_after,
        "held_out_perplexity_init": math.exp(held_before), "held_out_perplexity": math.exp(held_after),
        "loss_kind": what, "train_loss_curve": curve, "train_minutes": round(train_minutes, 2),
        "total_minutes": round((time.time() - t_start) / 60, 2), "max_minutes": args.max_minutes,
        "max_steps": args.max_steps, "seed": args.seed, "torch_threads": torch.get_num_threads(),
    }
    with open(os.path.join(args.out, "pretrain_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    open(done, "w").close()
    print(f"[pretrain] saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
