"""kdforge vs torchdistill 1.1.5 vs a bare PyTorch loop, end to end on the CPU, one recipe (issue 19).

Recipe: Hinton KD of the pretrained CIFAR-10 ResNet-56 (../shared/data/cifar10-resnets) into a fresh ResNet-20 on
the CIFAR-10 JPEG data, batch 128, SGD lr 0.05 / momentum 0.9 / weight decay 5e-4, 0.1 * CE + 0.9 * T^2 * KL at
T = 4, augmentation random crop 32 with 4 px zero padding + horizontal flip, ImageNet normalisation. Each tool runs
as its users run it, in its own process, one after another, with the same OMP_NUM_THREADS / MKL_NUM_THREADS:

  bare loop    this file's `--bare-loop` mode: the fastest honest reference. kdforge's decoded uint8 cache (one
               memmap read into RAM), crop + flip gathered on uint8 tensors in the training thread, teacher in
               eval mode under no_grad, student forward/backward, torch.optim.SGD. No logging, no prefetch.
  kdforge      `kdforge distill recipes/kd/cifar10/resnet20_from_resnet56.yaml --set data.batch_size=128
               --set train.max_steps=K ...` (the recipe as shipped, plus: batch 128, K steps, no progress bar,
               a 500-image validation subset so the end-of-run evaluation stays short).
  torchdistill torchdistill 1.1.5 in its own virtualenv (benchmarks/runs/torchdistill_env: its package only, on top
               of kdforge's torch through a .pth file, so no second torch is downloaded; never a kdforge
               dependency). A sample-shaped YAML (as configs/sample/*/kd/*.yaml of its repository, v1 syntax:
               `!import_call` datasets) builds torchvision ImageFolder datasets over the extracted JPEG tree with
               RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize, a DataLoader with a
               RandomSampler(num_samples=K * batch) so its one epoch is exactly K steps, and KDLoss(T=4,
               alpha=0.1). The models are kdforge's option-A CIFAR ResNets registered in torchdistill's model
               registry through the YAML's `dependencies` (torchdistill's own resnet20/56 use 1x1-conv
               shortcuts, so the published teacher weights do not load into them; importing kdforge for them
               adds about 2 s to its process time, not to the timed steps); the teacher weights are the same file,
               re-saved as {"model": state_dict} for torchdistill's load_ckpt. Teacher and student name
               `forward_proc: 'forward_batch_only'`: 1.1.5 registers no default forward process, and a config
               without the key stops with "No forward process function `None` registered". As torchdistill
               does, the teacher stays in train mode while the student trains (only the student is set to
               train() each epoch; the frozen teacher's BatchNorm layers use batch statistics and update their
               running statistics every step): the runner logs both facts. Its DataLoader workers (--td-workers)
               made no difference on 2 idle cores (0, 1 and 2 workers: 240-246 images/s in a 20-step probe).
               The PyPI sdist of torchdistill 1.1.5 carries no examples/ folder and this machine reaches PyPI only,
               so its example script (examples/torchvision/image_classification.py) cannot be fetched at run
               time. This file's `--torchdistill-runner` mode is a minimal runner, written for this benchmark,
               that calls torchdistill's public API in the order that script does: load the YAML, import its
               dependencies, build the models (get_image_classification_model / get_model + load_ckpt),
               get_distillation_box, then per epoch pre_epoch_process, the MetricLogger.log_every loop of
               forward_process + post_forward_process + loss.item() logging, a validation pass, save_ckpt of the
               best student, post_epoch_process; at the end load_ckpt of the student and a test pass of teacher and
               student. It adds nothing to the training loop beyond what the example does.

What is timed. A sitecustomize.py (written under benchmarks/runs/vs_torchdistill/stepclock and put on PYTHONPATH of
each run only) registers torch's global optimizer-step post hook and appends time.perf_counter() after every
optimizer.step() of every process. Each run makes W + N steps (W = --warmup, N = --steps); with stamp k taken
after step k, images/s is N * batch / (stamp[W + N] - stamp[W]): N whole training iterations: data loading (kdforge's
prefetch thread, torchdistill's DataLoader workers with PIL decoding and per-sample transforms, the bare loop's
gather), the teacher forward, the student forward/backward/step, the LR schedule, each tool's logging and metric
bookkeeping. Not in it: process start, imports, dataset/model setup, the first W steps (worker start-up, allocator
warm-up), evaluation, checkpoints and reports after the last step. "process s" is the wall time of the whole
process (all of the above), for the record. "median-step images/s" is batch / the median duration of the same N
steps, which a few steps slowed by another process do not move. With --ddp the stamps come from rank 0 (both ranks
step in lock-step: every step all-reduces the gradients).

Run (defaults: about 7 minutes on 2 idle cores, one step of this recipe taking about 0.5 s; the first run also
sets up the torchdistill virtualenv and extracts the JPEG tree, about 30 s):
    python benchmarks/vs_torchdistill.py [--steps 100] [--warmup 3] [--rounds 2] [--threads 2] [--td-workers 2]
    python benchmarks/vs_torchdistill.py --ddp [--steps 100] [--rounds 2]   # kdforge 1 process vs --nproc 2
    python benchmarks/vs_torchdistill.py --only torchdistill --steps 20 --rounds 1   # probe one tool
    python benchmarks/vs_torchdistill.py --device cuda --batch 512 --steps 200   # on a GPU: every tool there,
        # kdforge and the bare loop with the data on it, and a kdforge bf16 + channels_last + compile row; the step
        # clock synchronises CUDA at each stamp (tested on the CPU only: no GPU in the session that wrote it)
Rounds are interleaved (each round runs every tool once, in a rotated order); medians are reported. Another
process using the CPUs during a run slows 2-thread runs a lot (OpenMP threads wait for each other): the load
average before each run is printed, and the median-step rate shows what a run does when left alone.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "runs" / "vs_torchdistill"
TD_ENV = REPO / "benchmarks" / "runs" / "torchdistill_env"  # gitignored (runs/)
TD_VERSION = "1.1.5"
RECIPE = REPO / "recipes" / "kd" / "cifar10" / "resnet20_from_resnet56.yaml"
TEACHER_FILE = "cifar10-resnets/resnet56-4bfd9763.th"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what the shared ResNets were trained with
LR, MOMENTUM, WEIGHT_DECAY, TEMPERATURE, CE_WEIGHT, KD_WEIGHT = 0.05, 0.9, 5e-4, 4.0, 0.1, 0.9
STEP_LOG_ENV = "VS_TORCHDISTILL_STEP_LOG"

# Every process started with PYTHONPATH=<stepclock> and STEP_LOG_ENV set stamps each optimizer step; the forked
# DataLoader workers never step, so only training processes write a file (one per process, named by rank and pid).
STEPCLOCK = f'''"""vs_torchdistill.py step clock: time.perf_counter() after every optimizer.step() (generated file)."""
import os

if os.environ.get("{STEP_LOG_ENV}"):
    import time

    from torch.optim.optimizer import register_optimizer_step_post_hook

    import torch

    def _stamp(optimizer, args, kwargs):
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # the step's kernels done, not just queued
            torch.cuda.synchronize()
        name = "steps-r%s-%d.txt" % (os.environ.get("RANK", "0"), os.getpid())
        with open(os.path.join(os.environ["{STEP_LOG_ENV}"], name), "a") as f:
            f.write("%.6f\\n" % time.perf_counter())

    register_optimizer_step_post_hook(_stamp)
'''

# Imported by torchdistill through the YAML's `dependencies`: kdforge's option-A CIFAR ResNets in its registry.
TD_MODELS = '''"""kdforge's CIFAR ResNets (option-A shortcuts, like the shared weights) in torchdistill's registry."""
from torchdistill.models.registry import register_model

from kdforge.models.cifar_resnet import resnet20, resnet56

register_model(key="kdforge_resnet20")(resnet20)
register_model(key="kdforge_resnet56")(resnet56)
'''


def td_yaml(*, root: Path, teacher_ckpt: Path, student_ckpt: Path, batch: int, samples: int, workers: int) -> str:
    """torchdistill config in the shape of its configs/sample/cifar10/kd/*.yaml (v1 syntax)."""
    transform = """!import_call
          key: 'torchvision.transforms.Compose'
          init:
            kwargs:
              transforms:"""
    to_tensor_normalize = f"""
                - !import_call
                  key: 'torchvision.transforms.ToTensor'
                  init:
                - !import_call
                  key: 'torchvision.transforms.Normalize'
                  init:
                    kwargs: &normalize_kwargs
                      mean: {list(MEAN)}
                      std: {list(STD)}"""
    return f"""# Generated by benchmarks/vs_torchdistill.py: Hinton KD, ResNet-56 -> ResNet-20, CIFAR-10 JPEG,
# {samples // batch} steps of {batch}.
dependencies:
  - name: 'vs_torchdistill_models'
datasets:
  &cifar10_train cifar10/train: !import_call
    key: 'torchvision.datasets.ImageFolder'
    init:
      kwargs:
        root: '{root / "train"}'
        transform: {transform}
                - !import_call
                  key: 'torchvision.transforms.RandomCrop'
                  init:
                    kwargs:
                      size: 32
                      padding: 4
                - !import_call
                  key: 'torchvision.transforms.RandomHorizontalFlip'
                  init:
                    kwargs:
                      p: 0.5{to_tensor_normalize}
  &cifar10_test cifar10/test: !import_call
    key: 'torch.utils.data.Subset'
    init:
      kwargs:
        dataset: !import_call
          key: 'torchvision.datasets.ImageFolder'
          init:
            kwargs:
              root: '{root / "test"}'
              transform: !import_call
                key: 'torchvision.transforms.Compose'
                init:
                  kwargs:
                    transforms:
                      - !import_call
                        key: 'torchvision.transforms.ToTensor'
                        init:
                      - !import_call
                        key: 'torchvision.transforms.Normalize'
                        init:
                          kwargs: *normalize_kwargs
        indices: !import_call
          key: 'builtins.range'
          init:
            args: [0, 10000, 20]

models:
  teacher_model:
    key: &teacher_model_key 'kdforge_resnet56'
    kwargs:
      num_classes: 10
    src_ckpt: '{teacher_ckpt}'
  student_model:
    key: &student_model_key 'kdforge_resnet20'
    kwargs:
      num_classes: 10
    src_ckpt:
    dst_ckpt: '{student_ckpt}'

train:
  log_freq: 50
  num_epochs: 1
  train_data_loader:
    dataset_id: *cifar10_train
    sampler:
      class_or_func: !import_get
        key: 'torch.utils.data.RandomSampler'
      kwargs:
        num_samples: {samples}
    kwargs:
      batch_size: {batch}
      num_workers: {workers}
      pin_memory: False
      drop_last: False
    cache_output:
  val_data_loader:
    dataset_id: *cifar10_test
    sampler: &val_sampler
      class_or_func: !import_get
        key: 'torch.utils.data.SequentialSampler'
      kwargs:
    kwargs:
      batch_size: {batch}
      num_workers: {workers}
      pin_memory: False
      drop_last: False
  teacher:
    forward_proc: 'forward_batch_only'
    sequential: []
    wrapper: 'DataParallel'
    requires_grad: False
  student:
    forward_proc: 'forward_batch_only'
    adaptations:
    sequential: []
    wrapper: 'DistributedDataParallel'
    requires_grad: True
    frozen_modules: []
  optimizer:
    key: 'SGD'
    kwargs:
      lr: {LR}
      momentum: {MOMENTUM}
      weight_decay: {WEIGHT_DECAY}
  scheduler:
    key: 'MultiStepLR'
    kwargs:
      milestones: [150, 180, 210]
      gamma: 0.1
  criterion:
    key: 'WeightedSumLoss'
    kwargs:
      sub_terms:
        kd:
          criterion:
            key: 'KDLoss'
            kwargs:
              student_module_path: '.'
              student_module_io: 'output'
              teacher_module_path: '.'
              teacher_module_io: 'output'
              temperature: {TEMPERATURE}
              alpha: {CE_WEIGHT}
              reduction: 'batchmean'
          weight: 1.0

test:
  test_data_loader:
    dataset_id: *cifar10_test
    sampler: *val_sampler
    kwargs:
      batch_size: {batch}
      num_workers: {workers}
      pin_memory: False
      drop_last: False
"""


# ----------------------------------------------------------------------------------------------- set-up
def shared_data() -> Path:
    env = os.environ.get("KDFORGE_SHARED_DATA")
    return Path(env).expanduser() if env else REPO.parent / "shared" / "data"


def td_python() -> Path:
    return TD_ENV / "bin" / "python"


def ensure_torchdistill_env() -> None:
    """A virtualenv holding only torchdistill==1.1.5; torch, torchvision, numpy, PyYAML and Pillow come from the
    environment running this script, through a .pth file (its site-packages, from sysconfig). Idempotent."""
    probe = ("import torch, torchdistill, torchvision, yaml, PIL; "
             "print(torchdistill.__version__, torch.__version__, torch.__file__)")
    if td_python().exists():
        done = subprocess.run([str(td_python()), "-c", probe], capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.split()[0] == TD_VERSION:
            return
    if sys.prefix == sys.base_prefix:
        raise SystemExit("run this with the kdforge virtualenv's python (make setup): its site-packages are shared "
                         "with the torchdistill environment")
    print(f"setting up {TD_ENV} (torchdistill=={TD_VERSION}, no second torch) ...", flush=True)
    if TD_ENV.exists():
        shutil.rmtree(TD_ENV)
    subprocess.run([sys.executable, "-m", "venv", str(TD_ENV)], check=True)
    site = subprocess.run([str(td_python()), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    Path(site, "kdforge_venv_site_packages.pth").write_text(ours + "\n")
    # torchdistill declares torch, torchvision, numpy, pyyaml, scipy and cython; its example's code path imports only
    # torch, torchvision, numpy, yaml and PIL (scipy and cython are imported nowhere in the package), all of which
    # the .pth provides: so torchdistill itself, without dependencies
    subprocess.run([str(td_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    f"torchdistill=={TD_VERSION}"], check=True)
    done = subprocess.run([str(td_python()), "-c", probe], capture_output=True, text=True, check=True)
    print(f"  torchdistill {done.stdout.strip()}", flush=True)


def ensure_jpeg_tree() -> Path:
    """Extract cifar10-jpeg.tar.gz once under benchmarks/runs (torchdistill reads the JPEG files, as its users do)."""
    root = WORK / "data" / "cifar10-jpeg"
    if (root / ".complete").exists():
        return root
    src = shared_data() / "cifar10-jpeg.tar.gz"
    tmp = WORK / "data" / f".extract-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(src) as tar:
        tar.extractall(tmp, filter="data")
    shutil.rmtree(root, ignore_errors=True)
    (tmp / "cifar10-jpeg").rename(root)
    shutil.rmtree(tmp)
    (root / ".complete").write_text(f"{src}\n")
    return root


def prepare_inputs(td: bool) -> dict[str, Path]:
    """Decoded cache for kdforge and the bare loop; for torchdistill the JPEG tree, the teacher re-saved for its
    load_ckpt, the model-registry module and the step clock."""
    import torch

    from kdforge.data.prepare import prepare

    prepare("cifar10", shared_data() / "cifar10-jpeg.tar.gz")  # reuses ~/.cache/kdforge/data/cifar10 when valid
    paths = {"stepclock": WORK / "stepclock"}
    paths["stepclock"].mkdir(parents=True, exist_ok=True)
    (paths["stepclock"] / "sitecustomize.py").write_text(STEPCLOCK)
    if td:
        ensure_torchdistill_env()
        paths["jpeg"] = ensure_jpeg_tree()
        folder = WORK / "torchdistill"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vs_torchdistill_models.py").write_text(TD_MODELS)
        paths["td_models"] = folder
        paths["teacher"] = folder / "resnet56_model.pt"
        if not paths["teacher"].exists():
            state = torch.load(shared_data() / TEACHER_FILE, map_location="cpu", weights_only=True)["state_dict"]
            state = {k.removeprefix("module."): v for k, v in state.items()}
            torch.save({"model": state}, paths["teacher"])
    return paths


# ----------------------------------------------------------------------------------------------- the bare loop
def bare_loop(steps: int, batch: int, device: str = "cpu") -> None:
    """Hinton KD with nothing around it: uint8 cache in RAM (on `device`), crop/flip on tensors there, teacher eval +
    no_grad."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from kdforge.data.prepare import load_split
    from kdforge.models.cifar_resnet import resnet20, resnet56
    from kdforge.models.weights import load_weights

    torch.manual_seed(0)
    data = load_split("cifar10", "train")
    dev = torch.device(device)
    images = torch.from_numpy(np.array(data.images)).permute(0, 3, 1, 2).to(dev)  # N,3,32,32 uint8 (a view)
    labels = torch.from_numpy(np.asarray(data.labels)).to(dev)
    teacher = load_weights(resnet56(), shared_data() / TEACHER_FILE).to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = resnet20().to(dev).train()
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=dev).view(1, 3, 1, 1) * 255
    order = torch.randperm(len(labels), device=dev)
    ar = torch.arange(32, device=dev)
    for step in range(steps):
        idx = order[(step * batch) % len(order):][:batch]
        x = F.pad(images[idx], (4, 4, 4, 4))  # B,3,40,40 uint8, zero border
        oy, ox = torch.randint(0, 9, (2, len(idx), 1), device=dev)
        rows, cols = oy + ar, ox + ar  # B,32 each
        cols = torch.where(torch.rand(len(idx), 1, device=dev) < 0.5, cols.flip(1), cols)
        b = torch.arange(len(idx), device=dev).view(-1, 1, 1, 1)
        c = torch.arange(3, device=dev).view(1, 3, 1, 1)
        x = x[b, c, rows[:, None, :, None], cols[:, None, None, :]]
        x = (x.float() - mean) / std
        y = labels[idx]
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        kl = F.kl_div(F.log_softmax(s_logits / TEMPERATURE, 1), F.log_softmax(t_logits / TEMPERATURE, 1),
                      reduction="batchmean", log_target=True)
        loss = CE_WEIGHT * F.cross_entropy(s_logits, y) + KD_WEIGHT * TEMPERATURE ** 2 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"bare loop: {steps} steps, last loss {loss.item():.4f}")


# ----------------------------------------------------------------------------------------------- torchdistill
def torchdistill_runner(config_path: str, run_log: str | None, device_name: str = "cpu") -> None:
    """torchdistill's examples/torchvision/image_classification.py (1.1.5), reduced to what a KD config on one CPU
    process reaches, written here (see the module docstring): the same torchdistill calls in the same order."""
    import logging

    import torch
    from torchdistill.common import module_util, yaml_util
    from torchdistill.common.main_util import (
        import_dependencies,
        init_distributed_mode,
        load_ckpt,
        save_ckpt,
        set_seed,
    )
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.datasets.util import build_data_loader
    from torchdistill.misc.log import MetricLogger, SmoothedValue, set_basic_log_config, setup_log_file
    from torchdistill.models.official import get_image_classification_model
    from torchdistill.models.registry import get_model

    log = logging.getLogger("vs_torchdistill.runner")
    set_basic_log_config()
    if run_log:
        setup_log_file(run_log)
    distributed, _world_size, device_ids = init_distributed_mode(1, "env://")
    set_seed(0)
    config = yaml_util.load_yaml_file(config_path)
    import_dependencies(config.get("dependencies", None))
    device = torch.device(device_name)

    def load_model(model_config: dict) -> torch.nn.Module:
        model = get_image_classification_model(model_config, distributed)
        if model is None:
            model = get_model(model_config["key"], model_config.get("repo_or_dir", None), **model_config["kwargs"])
        load_ckpt(model_config.get("src_ckpt", None), model=model, strict=True)
        return model.to(device)

    @torch.inference_mode()
    def evaluate(model: torch.nn.Module, loader, header: str) -> float:
        model.eval()
        meters = MetricLogger(delimiter="  ")
        correct = seen = 0
        for image, target in meters.log_every(loader, 1000, header):
            output = model(image.to(device))
            correct += int((output.argmax(1) == target.to(device)).sum())
            seen += len(target)
        accuracy = 100.0 * correct / max(1, seen)
        log.info(" * Acc@1 %.4f", accuracy)
        return accuracy

    models = config["models"]
    teacher = load_model(models["teacher_model"])
    student_config = models["student_model"]
    student = load_model(student_config)
    dst = student_config["dst_ckpt"]
    train_config = config["train"]
    box = get_distillation_box(teacher, student, config["datasets"], train_config, device, device_ids, distributed, 1)
    log_freq = train_config["log_freq"]
    first_bn = next(m for m in box.teacher_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    tracked = int(first_bn.num_batches_tracked)
    best = 0.0
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        log.info("teacher mode during training: %s", "train" if box.teacher_model.training else "eval")
        meters = MetricLogger(delimiter="  ")
        meters.add_meter("lr", SmoothedValue(window_size=1, fmt="{value}"))
        meters.add_meter("img/s", SmoothedValue(window_size=10, fmt="{value}"))
        for images, targets, supp in meters.log_every(box.train_data_loader, log_freq, f"Epoch: [{epoch}]"):
            t0 = time.time()
            images, targets = images.to(device), targets.to(device)
            loss = box.forward_process(images, targets, supp)
            box.post_forward_process(loss=loss)
            meters.update(loss=loss.item(), lr=box.optimizer.param_groups[0]["lr"])
            meters.meters["img/s"].update(images.shape[0] / (time.time() - t0))
            if not torch.isfinite(loss):
                raise ValueError(f"The training loop was broken due to loss = {loss}")
        accuracy = evaluate(student, box.val_data_loader, "Validation:")
        if accuracy > best:
            best = accuracy
            save_ckpt(student, box.optimizer, box.lr_scheduler, best, argparse.Namespace(config=config_path), dst)
        box.post_epoch_process()
    log.info("teacher BatchNorm updates during training: %d (num_batches_tracked of its first BN layer)",
             int(first_bn.num_batches_tracked) - tracked)
    box.clean_modules()
    load_ckpt(dst, model=student.module if module_util.check_if_wrapped(student) else student, strict=True)
    test_config = config["test"]["test_data_loader"]
    test_loader = build_data_loader(config["datasets"][test_config["dataset_id"]], test_config, distributed)
    evaluate(teacher, test_loader, f"[Teacher: {models['teacher_model']['key']}]")
    evaluate(student, test_loader, f"[Student: {student_config['key']}]")


# ----------------------------------------------------------------------------------------------- one timed run
def run_timed(name: str, cmd: list[str], *, threads: int, steps: int, warmup: int, batch: int, tag: str,
              paths: dict[str, Path], extra_path: list[Path] = (), cwd: Path = REPO) -> dict[str, float]:
    """Run `cmd` in its own process with the step clock; images/s over stamps warmup..warmup+steps of rank 0."""
    clock = WORK / "clock" / tag
    shutil.rmtree(clock, ignore_errors=True)
    clock.mkdir(parents=True)
    log = WORK / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    pythonpath = [str(paths["stepclock"]), *map(str, extra_path)]
    if os.environ.get("PYTHONPATH"):
        pythonpath.append(os.environ["PYTHONPATH"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(pythonpath), STEP_LOG_ENV: str(clock)}
    load = os.getloadavg()[0]  # other work on the machine shows here: these runs are not alone on shared hosts
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{name} failed (exit {done.returncode}); see {log}")
    files = sorted(clock.glob("steps-r0-*.txt"))
    if len(files) != 1:
        raise RuntimeError(f"{name}: expected one rank-0 step clock file in {clock}, found {len(files)}; see {log}")
    stamps = [float(s) for s in files[0].read_text().split()]
    if len(stamps) != warmup + steps:
        raise RuntimeError(f"{name}: {len(stamps)} optimizer steps stamped, expected {warmup + steps}; see {log}")
    seconds = stamps[warmup + steps - 1] - stamps[warmup - 1]
    # the median step: what the tool does when nothing else on the machine interferes (one slow step in a
    # window, from another process waking up, moves the window's rate but not this)
    step = statistics.median(b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:]))
    ranks = len(list(clock.glob("steps-r*.txt")))
    print(f"  {name:<26} {steps * batch / seconds:6.1f} img/s  (median step {batch / step:6.1f} img/s; {steps} steps "
          f"in {seconds:.1f} s; process {wall:.0f} s; {ranks} stepping process(es); load average before {load:.1f})",
          flush=True)
    return {"ips": steps * batch / seconds, "step_ips": batch / step, "seconds": seconds, "wall": wall, "load": load}


def kdforge_cmd(total: int, batch: int, run_name: str, nproc: int = 1, device: str = "cpu",
                fast: bool = False) -> list[str]:
    """`kdforge distill` of the recipe for `total` steps; on a GPU the data lives there (data.device), and `fast`
    adds bf16 autocast, channels_last and torch.compile."""
    exe = Path(sys.executable).with_name("kdforge")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "kdforge"]
    sets = [f"data.batch_size={batch}", f"train.max_steps={total}", "train.progress=false", "data.val_subset=500",
            f"train.device={device}", f"out_dir={WORK / 'kdforge'}", f"name={run_name}"]
    if device != "cpu":
        sets.append(f"data.device={device}")
    if fast:
        sets += ["train.precision=bf16", "train.channels_last=true", "train.compile=true"]
    cmd = [*head, "distill", str(RECIPE), *[arg for s in sets for arg in ("--set", s)], "--overwrite"]
    return cmd + (["--nproc", str(nproc)] if nproc != 1 else [])


def plan(a: argparse.Namespace, paths: dict[str, Path]) -> dict[str, dict]:
    """name -> {cmd, threads, extra_path}; the rows of the table, in their first-round order."""
    total = a.warmup + a.steps
    me = str(Path(__file__).resolve())
    if a.ddp:
        return {
            f"kdforge 1 process x {a.threads} thr": {
                "cmd": lambda r: kdforge_cmd(total, a.batch, f"ddp1_r{r}"), "threads": a.threads},
            f"kdforge --nproc 2 x {max(1, a.threads // 2)} thr": {
                "cmd": lambda r: kdforge_cmd(total, a.batch, f"ddp2_r{r}", nproc=2),
                "threads": max(1, a.threads // 2)},
        }
    folder = WORK / "torchdistill"

    def td(r: int) -> list[str]:
        config = folder / f"kd_resnet20_from_resnet56_r{r}.yaml"
        ckpt = folder / "ckpt" / f"student_r{r}.pt"
        ckpt.unlink(missing_ok=True)
        config.write_text(td_yaml(root=paths["jpeg"], teacher_ckpt=paths["teacher"], student_ckpt=ckpt,
                                  batch=a.batch, samples=total * a.batch, workers=a.td_workers))
        return [str(td_python()), me, "--torchdistill-runner", str(config), "--run-log", str(folder / f"r{r}.log"),
                *on]

    on = ["--device", a.device]
    rows = {
        "bare PyTorch loop": {"cmd": lambda r: [sys.executable, me, "--bare-loop", "--total", str(total),
                                                "--batch", str(a.batch), *on], "threads": a.threads},
        "kdforge": {"cmd": lambda r: kdforge_cmd(total, a.batch, f"kd_r{r}", device=a.device), "threads": a.threads},
    }
    if a.device != "cpu":  # the GPU keys: bf16 autocast + channels_last + torch.compile (warm-up covers compiling)
        rows["kdforge bf16+cl+compile"] = {"cmd": lambda r: kdforge_cmd(total, a.batch, f"kdfast_r{r}",
                                                                        device=a.device, fast=True),
                                           "threads": a.threads}
    return {
        **rows,
        f"torchdistill {TD_VERSION}": {"cmd": td, "threads": a.threads,
                                       "extra_path": [paths["td_models"], REPO]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="timed training steps per run (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the timed ones, not timed (>= 1)")
    ap.add_argument("--batch", type=int, default=128, help="global batch size")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians are reported")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="OMP/MKL threads of every run (with --ddp: of the 1-process run; each of 2 gets half)")
    ap.add_argument("--td-workers", type=int, default=2, help="torchdistill DataLoader workers (its samples say 16; "
                                                              "this machine has 2 cores)")
    ap.add_argument("--ddp", action="store_true", help="instead: kdforge on 1 process vs `kdforge distill --nproc 2`")
    ap.add_argument("--only", nargs="+", choices=["bare", "kdforge", "torchdistill"],
                    help="run only these tools (a probe; the ratios need the bare loop and torchdistill)")
    ap.add_argument("--out", help="also write the table to this file (e.g. results/vs_torchdistill.md)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: every tool trains there (kdforge with its data "
                                                    "there too, plus a bf16 + channels_last + compile row)")
    # internal modes: the runs themselves
    ap.add_argument("--bare-loop", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--total", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--torchdistill-runner", metavar="CONFIG", help=argparse.SUPPRESS)
    ap.add_argument("--run-log", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.bare_loop:
        return bare_loop(a.total, a.batch, a.device)
    if a.torchdistill_runner:
        return torchdistill_runner(a.torchdistill_runner, a.run_log, a.device)
    if a.warmup < 1 or a.steps < 1 or a.rounds < 1:
        ap.error("--warmup, --steps and --rounds must be >= 1")

    if a.ddp and a.only:
        ap.error("--only picks among the tools of the comparison, not the --ddp runs")
    paths = prepare_inputs(td=not a.ddp and (not a.only or "torchdistill" in a.only))
    rows = plan(a, paths)
    if a.only:
        rows = {n: row for n, row in rows.items() if n.split()[0].lower() in a.only}
    names = list(rows)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    print(f"{'DDP scaling' if a.ddp else 'kdforge vs torchdistill'}: ResNet-56 -> ResNet-20 Hinton KD, CIFAR-10 JPEG, "
          f"batch {a.batch}, {a.warmup} + {a.steps} steps a run, {a.rounds} round(s), {a.device}, "
          f"{os.cpu_count()} cores", flush=True)
    t_all = time.perf_counter()
    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}", flush=True)
        for name in names[r % len(names):] + names[:r % len(names)]:
            row = rows[name]
            tag = f"{'ddp' if a.ddp else 'vs'}-r{r}-{name.split()[0].lower()}{'-n2' if '--nproc' in name else ''}"
            results[name].append(run_timed(name, row["cmd"](r), threads=row["threads"], steps=a.steps,
                                           warmup=a.warmup, batch=a.batch, tag=tag, paths=paths,
                                           extra_path=row.get("extra_path", [])))
    print(f"all runs done in {time.perf_counter() - t_all:.0f} s\n", flush=True)
    publish(table(a, names, results), a.out)


def table(a: argparse.Namespace, names: list[str], results: dict[str, list[dict[str, float]]]) -> list[str]:
    ips = {n: statistics.median(x["ips"] for x in results[n]) for n in names}
    step_ips = {n: statistics.median(x["step_ips"] for x in results[n]) for n in names}
    wall = {n: statistics.median(x["wall"] for x in results[n]) for n in names}
    rounds = {n: ", ".join(f"{x['ips']:.1f}" for x in results[n]) for n in names}
    if a.ddp:
        base = names[0]
        head = ["| run | timed steps | images/s | rounds | vs 1 process | median-step images/s | vs 1 process | "
                "process s |", "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
        body = [f"| {n} | {a.steps} | {ips[n]:.1f} | {rounds[n]} | {ips[n] / ips[base]:.2f}x | {step_ips[n]:.1f} | "
                f"{step_ips[n] / step_ips[base]:.2f}x | {wall[n]:.0f} |" for n in names]
        title = (f"DDP scaling of kdforge on this {os.cpu_count()}-core machine: ResNet-56 -> ResNet-20 KD, "
                 f"global batch {a.batch} ({a.batch // 2} a process with --nproc 2), {a.warmup} warm-up + "
                 f"{a.steps} timed steps, median of {a.rounds} interleaved round(s)")
    else:
        td = next((n for n in names if n.startswith("torchdistill")), None)
        bare = next((n for n in names if n.startswith("bare")), None)

        def ratio(n: str, ref: str | None, of: dict[str, float]) -> str:
            return f"{of[n] / of[ref]:.2f}x" if ref else "-"

        head = ["| tool | timed steps | images/s | rounds | vs torchdistill | vs bare loop | median-step images/s | "
                "vs torchdistill | process s |", "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        body = [f"| {n} | {a.steps} | {ips[n]:.1f} | {rounds[n]} | {ratio(n, td, ips)} | {ratio(n, bare, ips)} | "
                f"{step_ips[n]:.1f} | {ratio(n, td, step_ips)} | {wall[n]:.0f} |" for n in names]
        where = "CPU" if a.device == "cpu" else f"{a.device} (data on it for kdforge and the bare loop), CPU"
        title = (f"ResNet-56 -> ResNet-20 Hinton KD on CIFAR-10 JPEG, {where} ({os.cpu_count()} cores, {a.threads} "
                 f"threads each), batch {a.batch}, {a.warmup} warm-up + {a.steps} timed steps, median of {a.rounds} "
                 f"interleaved round(s); torchdistill with {a.td_workers} DataLoader workers")
    notes = ["", "images/s: timed steps x batch / time from the end of the last warm-up optimizer step to the end "
             "of the last step (step clock: torch's optimizer-step post hook), so it covers data loading, teacher, "
             "student, optimiser and each tool's logging, not start-up, warm-up, evaluation or checkpoints; the "
             "median over rounds, each round's value listed. median-step images/s: batch / the median of the same "
             "steps' durations (robust to another process stealing the CPUs for a few steps). "
             "process s: the whole process, start to exit (median)."]
    loads = [x["load"] for n in names for x in results[n]]
    notes.append(f"1-minute load average before the runs: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} "
                 f"cores (a decaying 1-minute mean: right after a {a.threads}-thread run it reads about {a.threads} "
                 "with nothing else running; well above that, other work shared the CPUs)")
    if not a.ddp and td and "kdforge" in ips:
        notes.append(f"kdforge / torchdistill = {ips['kdforge'] / ips[td]:.2f}x end to end, "
                     f"{step_ips['kdforge'] / step_ips[td]:.2f}x by the median step (target >= 1.2x)")
    return [title, "", *head, *body, *notes]


def publish(lines: list[str], path: str | None) -> None:
    from _common import publish as write  # benchmarks/ is run as a script folder; _common imports torch

    write(lines, path)


if __name__ == "__main__":
    main()
