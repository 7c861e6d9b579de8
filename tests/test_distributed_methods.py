"""Every registered method, data parallel: one torchrun launch of 2 gloo processes trains each method for a few
steps on a tiny problem, and one plain process trains the same with the same global batch. For each method:
- both ranks end with identical weights and buffers (the gradients, the noise draws, the memory banks, the
  batch-wide loss terms and the data-dependent initialisations all agree across ranks);
- the 2-process run equals the 1-process run (weights, every logged loss, the sharded evaluation's metrics) within
  float tolerance. The models have no BatchNorm (instance norm, ActNorm or none), since on CPU each rank would
  normalise its own shard (torch's SyncBatchNorm is CUDA-only).
Two launches for all methods keep this to about a minute."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import launcher, torchrun_env

from kdforge.registry import DISTILLERS

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

WORKER = r'''
import json, sys
import torch
from torch import nn
import kdforge
from kdforge.engine import distributed
from kdforge.models import build_model

out, methods = sys.argv[1], sys.argv[2].split(",")
torch.set_num_threads(1)
ctx = distributed.init_from_env("cpu")
GLOBAL, STEPS, SIZE, PAIR_SIZE = 8, 3, 16, 32  # the U-Net takes 32 px and up


def batches(kind):
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(STEPS):
        size = PAIR_SIZE if kind == "pairs" else SIZE
        image = torch.rand(GLOBAL, 3, size, size, generator=g)
        if kind == "pairs":
            image = image * 2 - 1
        batch = {"image": image, "label": torch.randint(0, 4, (GLOBAL,), generator=g),
                 "group": torch.arange(GLOBAL) % 2, "index": torch.arange(GLOBAL) + GLOBAL * i}
        if kind == "pairs":
            batch["target"] = torch.tanh(image.roll(1, dims=1) * 0.7 + 0.1)
        rows.append(batch)
    return rows


def shard(rows):  # this rank's block of each global batch, as BatchLoader(rank=, world_size=) takes it
    mine = distributed.block(GLOBAL, ctx.rank, ctx.world_size)
    return [{k: v[mine] for k, v in b.items()} for b in rows]


class Net(nn.Module):  # no BatchNorm: nothing couples a rank's samples
    def __init__(self, width):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 4))

    def forward(self, x):
        return self.head(self.features(x))


class Gen(nn.Module):
    z_dim = 8

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 3 * SIZE * SIZE), nn.Tanh())

    def forward(self, z):
        return self.body(z).view(-1, 3, SIZE, SIZE)


def disc():
    return nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3, 1, 1))


def unet(width=1.0):
    return build_model("unet_generator", img_size=PAIR_SIZE, ngf=4, width=width, norm="instance")


def glow():
    return build_model("glow", img_size=SIZE, levels=2, steps=1, hidden=8)


def students():
    part = {"levels": 2, "steps": 1, "width": 4, "growth": 4, "rdb_layers": 1}
    return build_model("flow_student", img_size=SIZE, latent_levels=2, encoder=part, decoder=part)


maps = {"student_layers": ["features.3"], "teacher_layers": ["features.3"]}
pairs = {"input_shape": (3, PAIR_SIZE, PAIR_SIZE)}
patchgan = {"discriminator_options": {"ndf": 4, "norm": "instance"}}
SPECS = {  # method: (student, teacher, options (or what makes them), data, evaluator)
    "kd": (lambda: Net(4), lambda: Net(8), {}, "images", None),
    "scratch": (lambda: Net(4), lambda: None, {}, "images", None),
    "at": (lambda: Net(4), lambda: Net(8), maps, "images", None),
    "nst": (lambda: Net(4), lambda: Net(8), maps, "images", None),
    "vid": (lambda: Net(4), lambda: Net(8), {**maps, "input_shape": (3, SIZE, SIZE)}, "images", None),
    "fitnet": (lambda: Net(4), lambda: Net(8), {"student_layer": "features.3", "teacher_layer": "features.3",
                                               "input_shape": (3, SIZE, SIZE)}, "images", None),
    "pkt": (lambda: Net(4), lambda: Net(8), {}, "images", None),
    "rkd": (lambda: Net(4), lambda: Net(8), {}, "images", None),
    "crd": (lambda: Net(4), lambda: Net(8), {"n_data": GLOBAL * STEPS, "num_negatives": 6, "feat_dim": 8,
                                             "input_shape": (3, SIZE, SIZE)}, "images", None),
    "mfd": (lambda: Net(4), lambda: Net(4), {"num_classes": 4, "num_groups": 2}, "images", None),
    "ad": (lambda: Net(4), lambda: None, {"num_classes": 4, "num_groups": 2, "input_shape": (3, SIZE, SIZE)},
           "images", None),
    "dafl": (lambda: Net(4), lambda: Net(8), lambda: {"generator": Gen(), "input_shape": (3, SIZE, SIZE)}, "images",
             None),
    "dfad": (lambda: Net(4), lambda: Net(8), lambda: {"generator": Gen(), "student_steps": 2,
                                              "input_shape": (3, SIZE, SIZE)}, "images", None),
    "mosaic": (lambda: Net(4), lambda: Net(8), lambda: {"generator": Gen(), "discriminator": disc(), "student_steps": 1,
                                                "input_shape": (3, SIZE, SIZE)}, "images", None),
    "pix2pix": (unet, lambda: None, patchgan, "pairs", "images"),
    "dcgan": (Gen, lambda: None, {"input_shape": (3, SIZE, SIZE), "discriminator_options": {"ndf": 4}}, "images",
              "images"),
    "gan_kd": (lambda: unet(0.5), unet, {**pairs, "l1_weight": 1.0}, "pairs", "images"),
    "gan_vid": (lambda: unet(0.5), unet, {**pairs, "hidden": 4}, "pairs", "images"),
    "gan_crd": (lambda: unet(0.5), unet, {**pairs, "embed_dim": 8}, "pairs", "images"),
    "vem": (lambda: unet(0.5), unet, {**pairs, "langevin_steps": 2, "chain_init": "noise", "langevin_step_size": 1.0,
                                      "energy_options": {"nef": 4}}, "pairs", "images"),
    "flow_mle": (glow, lambda: None, {}, "images", "flow"),
    "flow_kd": (students, glow, {}, "images", "flow"),
}
for method in methods:
    if method not in SPECS:
        raise SystemExit(f"tests/test_distributed_methods.py: a new method, {method!r}: add its tiny setup to SPECS")
    student, teacher, options, kind, evaluator = SPECS[method]
    torch.manual_seed(100)
    t = teacher()
    options = options() if callable(options) else options  # a method's own modules: built after the seed
    torch.manual_seed(200 + ctx.rank)  # ranks initialise differently: the Trainer must start all from rank 0's
    s = student()
    rows = batches(kind)
    run = f"{out}/{method}"
    epochs = 2 if method in ("fitnet", "flow_kd") else 1
    result = kdforge.distill(s, t, shard(rows), method=method, seed=0, run_dir=run, val_loader=rows,
                             evaluator=evaluator, method_options=options,
                             train={"epochs": epochs, "lr": 0.05,  # SGD: Adam's normalised steps blow float
                                    "optimizer": "sgd",                    # noise in near-zero gradients up to lr
                                    "device": "cpu", "progress": False, "log_every": 1})
    torch.save(result.distiller.state_dict(), f"{run}/state_rank{ctx.rank}.pt")
'''

# kdforge's own methods (toy methods other test files register are not in the worker's table)
METHODS = sorted(n for n in DISTILLERS.names() if DISTILLERS.get(n).__module__.startswith("kdforge."))
# a BatchNorm inside the method itself: its ranks agree with each other, not with one process
NOT_EQUAL_TO_ONE_PROCESS = {"fitnet": "its regressor has a BatchNorm, which normalises each rank's shard on CPU"}
ROUNDING_ONLY = {"val_psnr_teacher"}  # a flow's exact inverse: about 140 dB, float rounding alone
NO_EVALUATION = {"dcgan"}  # an unconditional GAN with no teacher: FID needs a feature network, out of scope here


def _launch(script: Path, out: Path, nproc: int) -> None:
    env = torchrun_env()
    done = subprocess.run([*launcher(nproc), str(script), str(out), ",".join(METHODS)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp_methods")
    script = root / "worker.py"
    script.write_text(WORKER)
    _launch(script, root / "one", 1)
    _launch(script, root / "two", 2)
    return root / "one", root / "two"


def _records(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(record[k]) for k in sorted(record) if isinstance(record[k], (int, float))
            and k not in ("step", "epoch") and not k.startswith("time")}


def _close(a, b, what: str, exact: bool = False) -> None:
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(a, b, **tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_train_every_method_as_one(method, runs):
    one, two = (r / method for r in runs)
    ref = torch.load(one / "state_rank0.pt")
    rank0, rank1 = torch.load(two / "state_rank0.pt"), torch.load(two / "state_rank1.pt")
    assert ref.keys() == rank0.keys() == rank1.keys()
    for k in ref:
        _close(rank1[k], rank0[k], f"{method}: ranks differ: {k}", exact=True)
        if method not in NOT_EQUAL_TO_ONE_PROCESS:
            _close(rank0[k], ref[k], f"{method}: 2 processes vs 1: {k}")
    steps_one, steps_two = _records(one, "step"), _records(two, "step")
    assert len(steps_one) == len(steps_two) > 0  # rank 0 alone wrote
    for a, b in zip(steps_one, steps_two):
        assert a.keys() == b.keys()
        if method in NOT_EQUAL_TO_ONE_PROCESS:
            break
        _close(torch.tensor(list(_numbers(b).values())), torch.tensor(list(_numbers(a).values())),
               f"{method}: logged losses at step {a['step']} ({sorted(_numbers(a))})")
    evals_one, evals_two = _records(one, "epoch"), _records(two, "epoch")
    assert len(evals_one) == len(evals_two) > 0
    for a, b in zip(evals_one, evals_two):
        va = {k: v for k, v in _numbers(a).items() if k.startswith("val_") and k not in ROUNDING_ONLY}
        vb = {k: v for k, v in _numbers(b).items() if k.startswith("val_") and k not in ROUNDING_ONLY}
        assert va.keys() == vb.keys() and (va or method in NO_EVALUATION)
        if method in NOT_EQUAL_TO_ONE_PROCESS:
            continue
        _close(torch.tensor(list(vb.values())), torch.tensor(list(va.values())), f"{method}: sharded evaluation")
