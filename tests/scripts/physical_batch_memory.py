"""Print the peak memory growth (MiB) of two short private fits on a model whose activations dominate (B examples
of 64 tokens, width 256): first with ``max_physical_batch_size=M``, then with ``None``. Used by
tests/test_physical_batch.py.

Each peak is the process's resident high-water mark (``VmHWM``), reset before each fit (``/proc/self/clear_refs``).
Not ``ru_maxrss``: across ``fork`` + ``exec`` Linux carries the parent's high-water mark into the child's, so under
a large pytest process it would report the parent's size.

    python physical_batch_memory.py {bk,ghost,dpzero} M B
"""

import os
import sys
import warnings

import lightning.pytorch as L
import opacus.accountants  # noqa: F401  (imported before the baseline, like everything the fit uses)
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lightning_dp import DPSGDStrategy, DPZeroStrategy  # noqa: E402

T, WIDTH, VOCAB = 64, 256, 512


class Encoder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, WIDTH)
        self.fc2 = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 2)

    def training_step(self, batch, batch_idx):
        ids, y = batch
        h = torch.tanh(self.fc1(self.norm(self.emb(ids))))
        h = torch.tanh(self.fc2(h))
        return F.cross_entropy(self.head(h.mean(1)), y, reduction="none")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def high_water_mark_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB


def main() -> None:
    method, m, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(2)
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2 * batch, T))
    data = TensorDataset(ids, (ids[:, 0] % 2).long())
    model = Encoder()

    def fit(batch_size: int, max_physical_batch_size: int | None) -> None:
        common = dict(noise_multiplier=1.0, clip=1.0, delta=1e-5, poisson_sampling=False,
                      max_physical_batch_size=max_physical_batch_size)
        if method == "dpzero":
            strategy = DPZeroStrategy(seed=0, **common)
        else:
            strategy = DPSGDStrategy(clipping=method, **common)
        trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, DataLoader(data, batch_size=batch_size))

    fit(4, m)  # warm-up: what any fit allocates (lazy imports, thread pools) is not the batch's memory
    peaks = []
    for max_physical_batch_size in (m, None):
        base = rss_mib()
        reset_high_water_mark()
        fit(batch, max_physical_batch_size)
        peaks.append(high_water_mark_mib() - base)
    print(*peaks)


if __name__ == "__main__":
    main()
