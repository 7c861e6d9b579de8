"""The deployment table for CIFAR-10 (issue 20): the pretrained ResNet-56 teacher, the pretrained ResNet-20 trained
alone, and ResNet-20s distilled from the ResNet-56 at CPU scale (Hinton KD and one-stage FitNet), side by side
with `kdforge.bench`: parameters, MACs, ONNX size, eager and ONNX Runtime latency at batch 1 and throughput at
batch 64 with pinned threads, int8 rows, and top-1 on the CIFAR-10 JPEG test set.
    python benchmarks/deploy_cifar10.py [--epochs 1] [--train-subset 10000] [--threads 1] [--repeats 20]
Distils the students first when runs/deploy/<recipe name> holds none. Writes results/deploy_cifar10_cpu.md and
the accuracy-latency plot beside it. Needs ../shared/data.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from _common import publish  # noqa: E402  (benchmarks/ is run as a script folder)

from kdforge.config import load_config
from kdforge.data import shared_data_dir
from kdforge.deploy.bench import bench
from kdforge.recipe import run_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["recipes/kd/cifar10/resnet20_from_resnet56.yaml", "recipes/kd/cifar10/fitnet1_resnet20_from_resnet56.yaml"]
WEIGHTS = "{shared}/cifar10-resnets/{file}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1, help="distillation epochs of each student")
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="runs/deploy")
    a = ap.parse_args()
    runs = []
    for recipe in RECIPES:
        cfg = load_config(ROOT / recipe, [f"out_dir={a.out}", f"train.epochs={a.epochs}", "train.schedule=cosine",
                                          f"data.train_subset={a.train_subset}", "train.progress=false"])
        run = Path(a.out) / cfg.name
        if not (run / "checkpoints" / "last.pt").exists():
            run_recipe(cfg, overwrite=True, eval_teacher=False)
        runs.append(run)
    shared = shared_data_dir()
    teachers = [f"resnet56={WEIGHTS.format(shared=shared, file='resnet56-4bfd9763.th')}",
                f"resnet20={WEIGHTS.format(shared=shared, file='resnet20-12fca82f.th')}"]
    result = bench(runs, ROOT / RECIPES[0], teachers=teachers, threads=a.threads, int8=True, repeats=a.repeats,
                   out=Path(a.out) / "bench.md", progress=print)
    lines = ["# From distilled student to deployable artefact: CIFAR-10 at CPU scale", "",
             f"Models: `resnet56` is the pretrained ResNet-56 teacher and `resnet20` the pretrained ResNet-20 trained "
             f"alone (both the published weights in ../shared/data); the two run folders are ResNet-20s distilled "
             f"from that ResNet-56 by Hinton KD and by one-stage FitNet for {a.epochs} epoch(s) on {a.train_subset} "
             "CIFAR-10 training images from random weights, one run each with the recipes' seed "
             f"{cfg.seed} (the CPU budget: they are far from converged, so their accuracy says nothing about the "
             "methods; results/cifar10_methods_cpu.md compares methods over seeds). The pretrained rows are fixed "
             "weights, so no seed applies; every latency is a median over repeats, not over seeds. Top-1 on the "
             "10,000 CIFAR-10 JPEG test images. Latency and "
             f"throughput on this machine's CPU with {a.threads} thread(s) for every backend, {a.repeats} timed "
             "repeats after warm-up; int8 rows are ONNX Runtime static quantisation calibrated on training images.",
             "", result.table, "",
             f"Produced by `python benchmarks/deploy_cifar10.py --epochs {a.epochs} --train-subset {a.train_subset} "
             f"--threads {a.threads} --repeats {a.repeats}` on 2 CPU cores."]
    target = ROOT / "results/deploy_cifar10_cpu.md"
    if result.plot:
        shutil.copyfile(result.plot, ROOT / "results/deploy_cifar10_cpu.png")
        lines.insert(-2, "![top-1 against latency](deploy_cifar10_cpu.png)")
        lines.insert(-2, "")
    publish(lines, str(target))


if __name__ == "__main__":
    main()
