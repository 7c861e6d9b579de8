"""Data parallel through torch.distributed (kdforge/engine/distributed.py): a 2-process gloo run launched by torchrun
on loopback against a 1-process run with the same global batch gives the same losses and the same final weights
(Hinton KD through sharded BatchLoaders, on one node and on two torchrun "nodes" meeting through a c10d rendezvous;
every method: tests/test_distributed_methods.py); ranks that initialise their student differently start from rank
0's; only rank 0 writes; `--nproc`, a lost rank, resume."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, launcher, torchrun_env

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

WORKER = r'''
import json, sys
import numpy as np
import torch
from torch import nn
import kdforge
from kdforge.data.decoded import DecodedData
from kdforge.data.loader import BatchLoader
from kdforge.engine import distributed

out, method, global_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
ctx = distributed.init_from_env("cpu")
rng = np.random.default_rng(0)
data = DecodedData(rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, 64), list("abcd"),
                   name="toy")

def net(width):  # no BatchNorm: nothing couples the samples of a batch (SyncBatchNorm is CUDA-only in torch)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * width, 4))

torch.manual_seed(100)
teacher = net(16)
torch.manual_seed(ctx.rank)  # every rank its own student init: the Trainer must start them all from rank 0's
student = net(8)
loader = BatchLoader(data, global_batch // ctx.world_size, shuffle=True, drop_last=True, mean=(0.5,) * 3,
                     std=(0.5,) * 3, seed=0, prefetch=0, rank=ctx.rank, world_size=ctx.world_size)
options = {"student_layers": ["1"], "teacher_layers": ["1"], "input_shape": (3, 8, 8)} if method == "vid" else {}
torch.manual_seed(7)  # the method's own modules (VID's mean predictor and variances)
result = kdforge.distill(student, teacher, loader, method=method, seed=None, run_dir=out, method_options=options,
                         train={"epochs": 2, "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine", "device": "cpu",
                                "progress": False, "log_every": 1})
torch.save(result.student.state_dict(), f"{out}/student_rank{ctx.rank}.pt")
'''


def _run(script: Path, out: Path, method: str, nproc: int) -> None:
    done = subprocess.run([*launcher(nproc), str(script), str(out), method, "16"], env=torchrun_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _run_two_nodes(script: Path, out: Path, method: str) -> None:
    """Two torchrun agents, one process each, meeting through a c10d rendezvous on loopback: the multi-node form."""
    port = free_port()
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=kdforge-test",
                                str(script), str(out), method, "16"], env=torchrun_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for agent in agents:
        _, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, err[-3000:]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "step"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("one_process")
    script = root / "worker.py"
    script.write_text(WORKER)
    _run(script, root / "one", "kd", 1)
    return script, root / "one"


@pytest.mark.parametrize("launch", ["one_node", "two_nodes"])  # every method: tests/test_distributed_methods.py
def test_two_processes_match_one_with_the_same_global_batch(launch, one_process, tmp_path):
    script, one = one_process
    two = tmp_path / "two"
    if launch == "one_node":
        _run(script, two, "kd", 2)
    else:
        _run_two_nodes(script, two, "kd")
    ref = torch.load(one / "student_rank0.pt")
    for rank in (0, 1):  # both ranks end with the single process's weights
        got = torch.load(two / f"student_rank{rank}.pt")
        for k, v in ref.items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {k}")
    losses_one, losses_two = _losses(one), _losses(two)
    assert len(losses_one) == len(losses_two) == 8  # 64 samples / 16 per global batch x 2 epochs
    torch.testing.assert_close(torch.tensor(losses_two), torch.tensor(losses_one), rtol=1e-4, atol=1e-5)
    assert (two / "checkpoints" / "last.pt").exists() and len((two / "metrics.jsonl").read_text().splitlines()) == \
        len((one / "metrics.jsonl").read_text().splitlines())  # rank 0 alone wrote (no interleaved lines)


def test_cli_nproc_runs_a_recipe_on_two_processes_and_resumes(tmp_path):
    from kdforge.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("resnet20", num_classes=10).state_dict(), tmp_path / "teacher.pt")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({  # JSON is YAML
        "name": "ddp", "out_dir": str(tmp_path / "runs"),
        "data": {"name": "synthetic", "synthetic_train": 64, "synthetic_test": 32, "synthetic_size": 16,
                 "root": str(tmp_path / "cache"), "batch_size": 16, "crop_pad": 0, "flip": False},
        "student": "resnet20", "teacher": {"name": "resnet20", "weights": str(tmp_path / "teacher.pt")},
        "method": {"name": "kd"}, "train": {"epochs": 1, "device": "cpu", "progress": False, "log_every": 1}}))
    env = torchrun_env()

    def kdforge(*args):
        done = subprocess.run([sys.executable, "-m", "kdforge", "distill", str(recipe), "--nproc", "2", *args],
                              env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    out = kdforge()
    assert out.count("run folder:") == 1  # one report on the console, rank 0's
    run = tmp_path / "runs" / "ddp"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert steps == [1, 2, 3, 4]  # 64 samples / a global batch of 16, logged once (rank 0)
    kdforge("--resume", "--set", "train.epochs=2")
    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["position"]["step"] == 8 and (run / "report.md").exists()


CRASHNET = '''
import os
import torch
from torch import nn


class CrashNet(nn.Module):
    """A small classifier that raises on rank 1 at its 3rd training forward while CRASH_RANK1 is set."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if os.environ.get("CRASH_RANK1") and os.environ.get("RANK") == "1" and self.calls == 3:
                raise RuntimeError("rank 1 lost")
        return self.fc(self.body(x))
'''


def test_a_lost_rank_fails_the_run_clearly_and_it_resumes_from_the_last_checkpoint(tmp_path):
    (tmp_path / "crashnet.py").write_text(CRASHNET)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "name": "lost", "out_dir": str(tmp_path / "runs"),
        "data": {"name": "synthetic", "synthetic_train": 64, "synthetic_test": 32, "synthetic_size": 16,
                 "root": str(tmp_path / "cache"), "batch_size": 16, "crop_pad": 0, "flip": False},
        "student": "crashnet:CrashNet", "method": "scratch",
        "train": {"epochs": 1, "device": "cpu", "progress": False, "log_every": 1, "checkpoint_every": 1}}))
    env = {**torchrun_env(), "CRASH_RANK1": "1"}
    cmd = [sys.executable, "-m", "kdforge", "train", str(recipe), "--nproc", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0 and "rank 1 lost" in done.stderr and "add --resume" in done.stderr
    ckpt = tmp_path / "runs" / "lost" / "checkpoints" / "last.pt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["position"]["step"] == 2  # the steps both made
    env.pop("CRASH_RANK1")
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["position"]["step"] == 4


def test_rank_shards_are_whole_blocks_of_each_global_batch_and_keep_batchwise_balance():
    import numpy as np

    from kdforge.data.decoded import DecodedData
    from kdforge.data.loader import BatchLoader
    from kdforge.data.samplers import GroupClassBalancedSampler

    rng = np.random.default_rng(0)
    labels, groups = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
    data = DecodedData(np.zeros((40, 4, 4, 3), np.uint8), labels, ["a", "b"], attrs={"group": groups})

    def loader(batch, **kw):
        return BatchLoader(data, batch, sampler=GroupClassBalancedSampler(batchwise=True), seed=3, prefetch=0, **kw)

    one = loader(4)  # one process, the sampler bound to the per-rank batch
    ranks = [loader(4, rank=r, world_size=2) for r in range(2)]
    for ld in (one, *ranks):
        ld.set_epoch(2)
    assert len(ranks[0]) == len(ranks[1]) == len(one) // 2
    single = list(one)
    for i, (b0, b1) in enumerate(zip(*ranks)):  # rank r's batch i: block r of global batch i of the same order
        torch.testing.assert_close(b0["index"], single[2 * i]["index"])
        torch.testing.assert_close(b1["index"], single[2 * i + 1]["index"])
        for b in (b0, b1):  # and each rank's own batch has every (group, class) cell once
            cells = sorted(zip(b["group"].tolist(), b["label"].tolist()))
            assert cells == [(0, 0), (0, 1), (1, 0), (1, 1)]
