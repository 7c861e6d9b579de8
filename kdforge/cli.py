"""The `kdforge` command: prepare | train | distill | eval | report | sweep | export | bench | anonymize |
deanonymize | demo | list.

Each verb parses its options and calls one function of the Python API (kdforge.api, kdforge.data,
kdforge.report); nothing is done here that a script could not do.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

RECIPE_HELP = ("A YAML recipe with sections data, teacher, student, method, train (see recipes/). "
               "Override any key with --set section.key=value, e.g. --set train.epochs=2.")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help=RECIPE_HELP)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (repeatable), values parsed as YAML: train.lr=0.1, "
                        "method.temperature=2, data.train_subset=null")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in <out_dir>/<name> from its last checkpoint, exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    p.add_argument("--no-teacher-eval", action="store_true",
                   help="skip evaluating the teacher on the validation set at the start")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data parallel on N processes of this machine: a shortcut for `torchrun "
                        "--nproc_per_node=N -m kdforge ...` (data.batch_size stays the global batch)")


OOD_SUBSET = "ood-subset"  # `kdforge prepare ood-subset ...`: a teacher's transfer set from a prepared pool
_OOD_FLAGS = {"pool": "--pool", "teacher": "--teacher", "teacher_weights": "--teacher-weights",
              "rule": "--rule", "k": "--k", "per_class": "--per-class"}


def cmd_prepare(a: argparse.Namespace) -> int:
    from kdforge.config import expand_path, parse_override
    from kdforge.data.prepare import prepare

    if a.name == OOD_SUBSET:
        return _prepare_ood_subset(a)
    stray = [flag for key, flag in _OOD_FLAGS.items() if getattr(a, key) is not None] + (
        ["--teacher-option"] if a.teacher_options else [])
    if stray:
        raise ValueError(f"{', '.join(stray)} belong to `kdforge prepare {OOD_SUBSET}`, not to preparing dataset "
                         f"{a.name!r}")
    if a.source is None:
        raise ValueError(f"kdforge prepare {a.name} needs --source PATH (the published files: a directory, .tar or "
                         ".tar.gz)")
    options = dict(parse_override(o) for o in a.options)
    out = prepare(a.name, expand_path(a.source), expand_path(a.root), force=a.force, **options)
    print(f"decoded cache ready: {out}")
    return 0


def _prepare_ood_subset(a: argparse.Namespace) -> int:
    """The teacher's transfer set from a prepared pool: kdforge.data.ood.select_ood_subset, nothing more."""
    from kdforge.config import ModelConfig, expand_path, parse_override
    from kdforge.data.ood import select_ood_subset
    from kdforge.recipe import build_model_from_config

    missing = [flag for key, flag in _OOD_FLAGS.items() if key in ("pool", "teacher", "teacher_weights", "rule")
               and getattr(a, key) is None]
    if missing:
        raise ValueError(f"kdforge prepare {OOD_SUBSET} needs {', '.join(missing)} (e.g. --pool tiny_imagenet "
                         "--teacher resnet56 --teacher-weights resnet56.th --rule entropy --k 5000)")
    if a.source is not None or a.options:
        raise ValueError(f"--source and --option prepare a dataset; `kdforge prepare {OOD_SUBSET}` reads the pool "
                         f"prepared already (kdforge prepare {a.pool} --source ...)")
    kwargs = dict(parse_override(o) for o in a.teacher_options)
    teacher = build_model_from_config(ModelConfig(a.teacher, expand_path(a.teacher_weights), kwargs), role="teacher")
    indices = select_ood_subset(a.pool, teacher, rule=a.rule, k=a.k, per_class=a.per_class, root=expand_path(a.root),
                                device=a.device, split=a.split, batch_size=a.batch_size, mean=a.mean, std=a.std,
                                resize=a.resize, progress=print)
    print(f"selected {len(indices)} samples of {a.pool} ({a.split})")
    return 0


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Run this same command under torchrun on `nproc` local processes (loopback rendezvous, a free port)."""
    import socket
    import subprocess

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rest, skip = [], False
    for arg in argv:  # the same arguments without --nproc, which torchrun's processes must not see again
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "kdforge", *rest]
    code = subprocess.run(cmd).returncode
    if code:
        print(f"kdforge: a process of the {nproc}-process run failed (its error is above) and torchrun stopped the "
              "others; the run folder keeps the last checkpoint: fix the cause and add --resume", file=sys.stderr)
    return code


def _run(a: argparse.Namespace, scratch: bool) -> int:
    from kdforge.config import load_config
    from kdforge.recipe import run_recipe
    from kdforge.registry import DISTILLERS

    if a.nproc != 1 and "LOCAL_RANK" not in os.environ:
        return _torchrun(a.nproc, a.argv)

    cfg = load_config(a.recipe, a.overrides)
    if scratch and not DISTILLERS.get(cfg.method.name).trains_alone:
        # `kdforge train` trains without a teacher: a teacher-free method (scratch, pix2pix, dcgan) runs as the
        # recipe says; any other is replaced by scratch, its options dropped (they are the distiller's)
        cfg = load_config(a.recipe, [*a.overrides, "method=scratch"])
    result = run_recipe(cfg, resume=a.resume, overwrite=a.overwrite, eval_teacher=not a.no_teacher_eval)
    from kdforge.engine.distributed import current

    if current().is_main:  # under torchrun, one report on the console
        print((result.run_dir / "report.md").read_text())
        print(f"run folder: {result.run_dir}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from kdforge.config import load_config
    from kdforge.engine.checkpoint import load_checkpoint
    from kdforge.recipe import evaluate_checkpoint

    ckpt = load_checkpoint(a.checkpoint)  # read once: it gives the config and the weights
    saved = ckpt.get("config") or {}
    if a.recipe:
        cfg = load_config(a.recipe, a.overrides)
    elif saved:
        cfg = load_config(None, a.overrides, base=saved)
    else:
        raise ValueError(f"{a.checkpoint} carries no config: pass --recipe to say which model and data it is")
    if a.split:
        cfg.data.val_split = a.split
    metrics = evaluate_checkpoint(a.checkpoint, cfg, model_name=a.model, ckpt=ckpt)
    print(json.dumps({"checkpoint": str(a.checkpoint), "split": cfg.data.val_split, "evaluator": cfg.eval.name,
                      **metrics}, indent=1))
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    import warnings

    from kdforge.report import aggregate

    with warnings.catch_warnings(record=True) as caught:  # skipped runs: one line each, not a Python warning
        warnings.simplefilter("always")
        try:
            table = aggregate(a.runs, metric=a.metric, mode=a.mode, select=a.select, select_mode=a.select_mode)
        finally:
            for w in caught:
                print(f"kdforge report: warning: {w.message}", file=sys.stderr)
    if a.out:
        Path(a.out).write_text(table)
    print(table)
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from kdforge.sweep import SweepFailed, parse_grid, parse_seeds, parse_space, search, sweep

    seeds = parse_seeds(a.seeds) if a.seeds is not None else None
    common = dict(jobs=a.jobs, verb=a.verb, out_dir=a.out_dir, overrides=a.overrides, threads=a.threads, mode=a.mode,
                  select=a.select, select_mode=a.select_mode)
    try:
        if a.search == "optuna":
            if a.grid:
                raise ValueError("--grid and --search optuna do not mix: give the searched keys as --space; fixed "
                                 "values as --set")
            if a.trials is None or not a.space or a.metric is None:
                raise ValueError("--search optuna needs --trials N, --metric M (the mean over seeds is the objective) "
                                 "and at least one --space key=low:high[:log], key=int:low:high or key=a,b,c")
            search(a.recipe, parse_space(a.space), seeds, trials=a.trials, metric=a.metric, **common)
        else:
            if a.trials is not None or a.space:
                raise ValueError("--trials and --space belong to --search optuna; a grid is given by --grid")
            sweep(a.recipe, parse_grid(a.grid), seeds, metric=a.metric, **common)
    except SweepFailed as e:
        print(f"kdforge sweep: {e}", file=sys.stderr)
        return 1
    return 0


def _add_select_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--select", metavar="METRIC",
                   help="mark the row with the best mean of this metric over its seeds and name it under the table; "
                        "it may differ from --metric (show top1, select by DEO_M as the MFD paper does)")
    s.add_argument("--select-mode", choices=["max", "min"], default=None,
                   help="whether higher or lower --select is better (default: decided for it as for --mode)")


def cmd_export(a: argparse.Namespace) -> int:
    from kdforge.deploy.export import SUFFIX, export
    from kdforge.deploy.sources import example_input, load_source

    if a.opset is not None and a.format != "onnx":
        raise ValueError(f"--opset is an ONNX setting; --format {a.format} has none")
    src = load_source(a.source, network=a.network)
    example, what = example_input(src.model, src.config, n=a.batch, input_shape=a.input_shape)
    out = Path(a.out) if a.out else Path("exports") / f"{src.label.replace(':', '_')}{SUFFIX[a.format]}"
    result = export(src.model, example, out, format=a.format, dynamic_batch=a.dynamic_batch, opset=a.opset,
                    progress=lambda line: print(f"kdforge export: {line}", file=sys.stderr))
    print(f"{src.label}: the {src.network} of {src.path}, checked on {what}")
    print(result.summary())
    return 0 if result.passed else 1


def cmd_bench(a: argparse.Namespace) -> int:
    from kdforge.deploy.bench import bench

    result = bench(a.entries, a.data, teachers=a.teachers, threads=a.threads, out=a.out, int8=a.int8,
                   network=a.network, warmup=a.warmup, repeats=a.repeats, batch_size=a.batch_size,
                   input_shape=a.input_shape, progress=lambda line: print(line, file=sys.stderr))
    print(result.table)
    if result.path:
        print(f"table: {result.path}" + (f", plot: {result.plot}" if result.plot else ""))
    return 0


def cmd_anonymize(a: argparse.Namespace, direction: str) -> int:
    from kdforge.privacy.folder import anonymize_folder, deanonymize_folder

    options = dict(key_seed=a.key_seed, alpha=a.alpha, encoder=a.encoder, decoder=a.decoder,
                   batch_size=a.batch_size, device=a.device, overwrite=a.overwrite,
                   progress=lambda line: print(f"kdforge {direction}: {line}", file=sys.stderr))
    if direction == "anonymize":
        result = anonymize_folder(a.run, a.src, a.dst, **options)
    else:
        result = deanonymize_folder(a.run, a.src, a.dst, reference=a.reference, **options)
    print(result["loaded"])
    print(f"{direction}d {result['images']} images of {result['src']} into {result['dst']} "
          f"({result['written']} PNGs, {result['img_size']} px; key {result['key_dim']} x {result['key_dim']} from "
          f"the key seed, alpha {result['alpha']:g})")
    if result["psnr"] is not None:
        what = ("low means the fakes do not look like them" if direction == "anonymize" else
                "high when the run, key seed and alpha are those that anonymised")
        print(f"PSNR against {result['psnr_compared_with']}: mean {result['psnr']:.2f} dB, lowest "
              f"{result['psnr_min']:.2f} dB ({what})")
    if result["clipped"] > 0:
        print(f"clipped to [0, 1]: {100 * result['clipped']:.3g}% of the output values")
    return 0


def _add_anonymize_options(s: argparse.ArgumentParser, direction: str) -> None:
    s.add_argument("run", help="a flow_kd run folder (teacher Glow and students) or a flow_mle run folder (the Glow; "
                               "--encoder teacher --decoder teacher), or a checkpoint of one")
    s.add_argument("src", help="folder of images (.png, .jpg, .jpeg; searched recursively)"
                   + ("" if direction == "anonymize" else ": the fakes `kdforge anonymize` wrote"))
    s.add_argument("dst", help="folder for the PNGs, same relative names (created)")
    s.add_argument("--key-seed", type=int, required=True,
                   help="the secret: seeds the orthogonal key. Whoever knows it (and has the flow) can undo the "
                        "anonymisation; pick a large random number and keep it apart from the fakes")
    s.add_argument("--alpha", type=float, default=1.0,
                   help="temperature, nonzero, the same both ways: < 1 makes more average fakes (default: %(default)s)")
    s.add_argument("--encoder", choices=["teacher", "student"], default="student",
                   help="the Glow's encoder or the run's student encoder (default: %(default)s)")
    s.add_argument("--decoder", choices=["teacher", "student"], default="student",
                   help="the Glow's decoder or the run's student decoder (default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, auto (default: %(default)s)")
    s.add_argument("--overwrite", action="store_true", help="replace outputs that exist already in dst")
    if direction == "deanonymize":
        s.add_argument("--reference", help="folder of the originals (same relative names): report the PSNR of "
                                           "the recovered faces against them")
    s.set_defaults(fn=lambda a: cmd_anonymize(a, direction))


def cmd_demo(a: argparse.Namespace) -> int:
    from kdforge.demo import run_demo
    from kdforge.demo_fair import run_fair_demo
    from kdforge.demo_flow import run_flow_demo
    from kdforge.demo_gan import run_gan_demo
    from kdforge.demo_mosaic import run_mosaic_demo

    out = Path(a.out)  # the classic demo writes there; every other demo into its own <out>/<name>
    if a.name in ("classic", "all"):
        run_demo(out, quick=a.quick, progress=not a.no_progress)
    if a.name in ("fair", "all"):
        run_fair_demo(out / "fair", quick=a.quick, progress=not a.no_progress)
    if a.name == "mosaic":
        run_mosaic_demo(out / "mosaic", quick=a.quick, progress=not a.no_progress)
    if a.name == "gan":  # by name only, as mosaic
        run_gan_demo(out / "gan", quick=a.quick, progress=not a.no_progress)
    if a.name == "flow":  # by name only, as mosaic
        run_flow_demo(out / "flow", quick=a.quick, progress=not a.no_progress)
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    import kdforge  # noqa: F401  (registration)
    from kdforge.registry import DATASETS, DISTILLERS, EVALUATORS, LOSSES, MODELS

    tables = {"models": MODELS, "methods": DISTILLERS, "datasets": DATASETS, "losses": LOSSES,
              "evaluators": EVALUATORS}
    for kind in ([a.kind] if a.kind else tables):
        print(f"{kind}: {', '.join(tables[kind].names())}")
    if not a.kind or a.kind == "models":
        print("also: torchvision:<name>, timm:<name> (pip install timm), pkg.module:factory")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdforge", description="Knowledge distillation: recipes, engine, reports.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("prepare", help="decode a public dataset once into a memory-mapped uint8 cache",
                       description="Decode a dataset from its published format into <root>/<name>/<split>/ "
                                   "(uint8 images, labels, meta.json); later runs load it in seconds.")
    s.add_argument("name", help="cifar10 | cifar100 | tiny_imagenet | utkface | image_folder | ... (kdforge list "
                                "datasets); or ood-subset: a teacher's transfer set from a prepared pool (below)")
    s.add_argument("--source",
                   help="the published files: a directory, a .tar or .tar.gz (image folders, the official "
                        "CIFAR python pickles, Tiny-ImageNet's layout); needed to prepare a dataset")
    s.add_argument("--root", default="${KDFORGE_CACHE}/data",
                   help="cache root (default: %(default)s, KDFORGE_CACHE defaulting to ~/.cache/kdforge)")
    s.add_argument("--force", action="store_true", help="decode again even if a valid cache exists")
    s.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="a builder option (repeatable, values parsed as YAML): cifar10s skew=0.9, utkface size=32, "
                        "celeba target=Smiling; recipes give them as data.options")
    g = s.add_argument_group(
        "ood-subset", "kdforge prepare ood-subset --pool NAME --teacher MODEL --teacher-weights PATH --rule entropy "
        "--k N: run the teacher once over the prepared pool's split (cached per teacher) and save the indices it "
        "keeps as JSON beside the pool (recipes: data.train_select). Rules: entropy --k N (MosaicKD's "
        "highest-entropy OOD subset), balanced --per-class N (Nayak et al.'s class-balanced transfer set)")
    g.add_argument("--pool", help="a prepared dataset (e.g. tiny_imagenet prepared with --option size=32)")
    g.add_argument("--split", default="train", help="the pool's split to select from (default: %(default)s)")
    g.add_argument("--teacher", help="the teacher model's name (kdforge list models)")
    g.add_argument("--teacher-weights", help="the teacher's weights (a kdforge checkpoint or a state dict)")
    g.add_argument("--teacher-option", dest="teacher_options", action="append", default=[], metavar="KEY=VALUE",
                   help="a teacher model option (repeatable), e.g. num_classes=100")
    g.add_argument("--rule", help="entropy | balanced")
    g.add_argument("--k", type=int, help="entropy: how many samples to keep")
    g.add_argument("--per-class", type=int, help="balanced: how many samples per teacher class")
    g.add_argument("--device", default="auto", help="where the teacher runs (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=512, help="teacher batch size (default: %(default)s)")
    g.add_argument("--mean", type=float, nargs=3, default=[0.485, 0.456, 0.406],
                   help="input normalisation, as the recipe's data.mean (default: ImageNet's)")
    g.add_argument("--std", type=float, nargs=3, default=[0.229, 0.224, 0.225],
                   help="as the recipe's data.std (default: ImageNet's)")
    g.add_argument("--resize", type=int, help="as the recipe's data.resize (default: none)")
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("train", help="train a model without a teacher (teachers, baselines) from a recipe",
                       description="Train the recipe's student without a teacher: a teacher-free method (scratch, "
                                   "pix2pix, dcgan: a GAN teacher) runs as the recipe says, any other method is "
                                   "replaced by scratch (cross-entropy only). " + RECIPE_HELP)
    _add_run_options(s)
    s.set_defaults(fn=lambda a: _run(a, scratch=True))

    s = sub.add_parser("distill", help="distil a teacher into a student from a recipe",
                       description="Run a distillation recipe; writes config.yaml, metrics.jsonl, "
                                   "checkpoints/ and report.md into <out_dir>/<name>. " + RECIPE_HELP)
    _add_run_options(s)
    s.set_defaults(fn=lambda a: _run(a, scratch=False))

    s = sub.add_parser("eval", help="evaluate a checkpoint on a dataset split",
                       description="Evaluate the student in a kdforge checkpoint (or a plain state dict with "
                                   "--recipe/--model). Data and model come from the config saved in the "
                                   "checkpoint unless --recipe is given.")
    s.add_argument("checkpoint", help="path to a checkpoint (e.g. runs/<name>/checkpoints/last.pt)")
    s.add_argument("--recipe", help="recipe naming the model and data (default: the checkpoint's own config)")
    s.add_argument("--model", help="model name, when it differs from the recipe's student")
    s.add_argument("--split", help="split to evaluate (default: the recipe's data.val_split)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. data.root=/data")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("report", help="aggregate run folders into one table (mean ± std over seeds)",
                       description="Find run folders (summary.json) under the given paths and print a Markdown "
                                   "table with one row per experiment (its configuration minus seed, labelled by "
                                   "recipe name): the teacher's value, the student's mean ± std over seeds, the "
                                   "number of seeds and the best seed. Copies of a run count once; unreadable "
                                   "summaries are skipped and named.")
    s.add_argument("runs", nargs="+", help="run folders or folders containing them")
    s.add_argument("--metric", default=None,
                   help="metric to aggregate, any the runs' evaluator returned (default: the runs' monitor metric)")
    s.add_argument("--mode", choices=["max", "min"], default=None,
                   help="whether higher or lower is better, for 'best' (default: the runs' monitor mode for this "
                        "metric, else min for loss/error/distance names such as loss, l1, fid)")
    _add_select_options(s)
    s.add_argument("--out", help="also write the table to this file")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("sweep", help="run a recipe over a grid of values (or an Optuna search) and seeds, N at once",
                       description="Run the recipe once per grid point (the cartesian product of the --grid values) "
                                   "and seed, each as its own `kdforge distill|train` process, --jobs at once (the "
                                   "CPU cores split between them; on CUDA they share the GPU), into "
                                   "<--out-dir>/<name>_<key><value>..._s<seed> with its output in sweep.log there. "
                                   "Every run's config is checked before any starts. Finished runs are skipped and "
                                   "interrupted ones resumed, so the same command again completes a sweep. A failed "
                                   "run is reported with the end of its log, the others go on, and the exit code "
                                   "is 1. Ends with the `kdforge report` table of the sweep's runs. " + RECIPE_HELP)
    s.add_argument("recipe", help="a YAML recipe (see recipes/)")
    s.add_argument("--verb", choices=["distill", "train"], default="distill",
                   help="what each run is: kdforge distill or kdforge train (default: %(default)s)")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a key and its values (repeatable: the grid is the product), each parsed as --set parses "
                        "it: --grid method.temperature=2,4 --grid train.lr=0.1,0.05; brackets keep a list whole")
    s.add_argument("--seeds", metavar="S1,S2,...", help="seeds of every point, e.g. 0,1,2 (default: the recipe's)")
    s.add_argument("--jobs", type=int, default=1, metavar="N", help="runs at once (default: %(default)s)")
    s.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads per run (OMP_NUM_THREADS; default: the cores divided by --jobs)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key in every run (repeatable), e.g. train.epochs=30")
    s.add_argument("--out-dir", help="the sweep's folder, holding one run folder per point and seed (default: "
                                     "<the recipe's out_dir>/<its name>_sweep)")
    s.add_argument("--metric", default=None,
                   help="the table's metric (default: the runs' monitor metric); with --search, the objective")
    s.add_argument("--mode", choices=["max", "min"], default=None,
                   help="whether higher or lower --metric is better (default: as kdforge report decides)")
    _add_select_options(s)
    g = s.add_argument_group("search", "--search optuna --trials N --metric M --space ...: Optuna proposes each "
                             "trial's values; a trial is one run per seed, scored by the mean of M over them. The "
                             "study is kept in <out-dir>/optuna.db: --trials counts the completed trials wanted in "
                             "all, so the same command again continues a search (pip install 'kdforge[sweep]')")
    g.add_argument("--search", choices=["grid", "optuna"], default="grid", help="(default: %(default)s)")
    g.add_argument("--trials", type=int, metavar="N", help="completed trials wanted in the study")
    g.add_argument("--space", action="append", default=[], metavar="KEY=RANGE",
                   help="a searched key (repeatable): key=low:high[:log] (float), key=int:low:high[:log] or "
                        "key=a,b,c (choices), e.g. --space train.lr=1e-3:1e-1:log --space method.temperature=2,4,8")
    s.set_defaults(fn=cmd_sweep)

    s = sub.add_parser("export", help="export a trained network to ONNX, TorchScript or torch.export and check it",
                       description="Export the student (or --network) of a run folder or checkpoint, load the file "
                                   "back (ONNX: onnx.checker and ONNX Runtime on the CPU) and compare its outputs "
                                   "with the eager model's on real test images of the run's data (else a random "
                                   "input of --input-shape) within 1e-4 + 1e-4 * max|output|. ONNX tries the "
                                   "torch.export-based exporter, then the legacy TorchScript-based one; "
                                   "TorchScript tries torch.jit.trace, then torch.jit.script. Exit code 1 when "
                                   "the outputs differ, 2 when the model cannot be exported (the error names the "
                                   "operator or line and the formats that would work).")
    s.add_argument("source", help="a run folder (its checkpoints/last.pt) or a checkpoint file")
    s.add_argument("--format", choices=["onnx", "torchscript", "torch.export"], default="onnx",
                   help="default: %(default)s")
    s.add_argument("--dynamic-batch", action="store_true",
                   help="a symbolic batch dimension; also checked at batch sizes 1 and 7")
    s.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    s.add_argument("--network", default="student",
                   help="which trained network of the checkpoint (student, generator, ...; default: %(default)s)")
    s.add_argument("--out", help="the file to write (default: exports/<run name>.<onnx|pt|pt2>)")
    s.add_argument("--input-shape", help="C,H,W of one input when the run's data is not available, e.g. 3,32,32")
    s.add_argument("--batch", type=int, default=8, help="example batch size (default: %(default)s)")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("bench", help="size, MACs, latency and score of several models side by side",
                       description="One table row per model: parameters, MACs (FLOPs / 2), ONNX file size, eager "
                                   "PyTorch and ONNX Runtime CPU latency at batch 1 (median ± IQR/2, ms/image) and "
                                   "throughput at --batch-size (images/s), GPU where there is one, the evaluator's "
                                   "main metric on the test split, and ORT / eager. Every CPU backend runs with "
                                   "--threads threads. Writes the table to --out and a plot of score against "
                                   "latency beside it.")
    s.add_argument("entries", nargs="*", help="run folders or checkpoints")
    s.add_argument("--teacher", dest="teachers", action="append", default=[], metavar="NAME=WEIGHTS",
                   help="a pretrained model (repeatable), e.g. resnet56=../shared/data/cifar10-resnets/"
                        "resnet56-4bfd9763.th")
    s.add_argument("--data", help="a recipe or a prepared dataset name whose test split scores every model "
                                  "(default: the first run's own data)")
    s.add_argument("--threads", type=int, default=1, help="CPU threads for every backend (default: %(default)s)")
    s.add_argument("--out", help="write the Markdown table here (and <stem>.png, <stem>_onnx/ beside it)")
    s.add_argument("--int8", action="store_true",
                   help="add an int8 row per model (ONNX Runtime static quantisation, calibrated on training images)")
    s.add_argument("--network", default="student", help="which network of each run (default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=64, help="throughput batch size (default: %(default)s)")
    s.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: %(default)s)")
    s.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (default: %(default)s)")
    s.add_argument("--input-shape", help="C,H,W of one input when no data is given, e.g. 3,32,32")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("anonymize", help="replace every face of a folder by a fake, reversibly, with a flow run",
                       description="Encode each image with the run's flow (a flow_kd run's teacher Glow or student, "
                                   "or a flow_mle run's Glow), rotate its latent by a secret orthogonal key drawn "
                                   "from --key-seed (times --alpha) and decode the fake face, written as a PNG at "
                                   "the flow's size. `kdforge deanonymize` with the same run, key seed and alpha "
                                   "gives the faces back. Prints the PSNR between originals and fakes.")
    _add_anonymize_options(s, "anonymize")

    s = sub.add_parser("deanonymize", help="undo `kdforge anonymize` with the same run, key seed and alpha",
                       description="Encode each fake with the run's flow, undo the key's rotation (and --alpha) "
                                   "and decode the original face, written as a PNG. A wrong key seed gives other "
                                   "faces. With --reference, prints the PSNR against the originals.")
    _add_anonymize_options(s, "deanonymize")

    s = sub.add_parser("demo", help="each method's headline story on generated data (about 3 min for all)",
                       description="Generate small image datasets (no download) and run each story end to end. "
                                   "classic: a teacher and a student from scratch, then Hinton KD and AT. "
                                   "fair: a teacher biased by a colour/grey skew, then the same CNN alone, with "
                                   "HKD and with MFD, with accuracy and DEO_A/DEO_M. mosaic: a teacher of ten "
                                   "generated classes distilled from ten other classes only, by blind KD and by "
                                   "MosaicKD. gan: a pix2pix edges -> image generator compressed to a quarter "
                                   "width, trained alone, by generator distillation and by VEM, with FID, PSNR, "
                                   "MACs and VEM's cost per step. flow: a Glow trained by maximum "
                                   "likelihood, distilled into a faster encoder/decoder pair (flow_kd), and "
                                   "reversible anonymisation with a secret key through both. Run folders go under "
                                   "--out.")
    s.add_argument("name", nargs="?", default="all", choices=["all", "classic", "fair", "mosaic", "gan", "flow"],
                   help="which demo (default: %(default)s)")
    s.add_argument("--out", default="runs/demo", help="folder for the demo's runs (default: %(default)s)")
    s.add_argument("--quick", action="store_true", help="a much smaller run, for smoke tests")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("list", help="list registered models, methods, datasets, losses and evaluators")
    s.add_argument("kind", nargs="?", choices=["models", "methods", "datasets", "losses", "evaluators"])
    s.set_defaults(fn=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    from kdforge.registry import RegistryError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if "" not in sys.path and os.getcwd() not in sys.path:  # recipes may name factories in local modules
        sys.path.insert(0, os.getcwd())
    try:
        return args.fn(args)
    except (OSError, ValueError, RegistryError, ImportError, FloatingPointError) as e:
        # user errors (bad recipe or input, missing or corrupt file, unknown name, full disk, NaN loss) as one
        # clear line; anything else is a bug (kdforge's or in code a recipe names) and keeps its traceback.
        # KDFORGE_DEBUG=1 shows the traceback of user errors too
        if os.environ.get("KDFORGE_DEBUG"):
            raise
        msg = e
        print(f"kdforge {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
