"""Flow distillation at CPU scale (issue 18): the paper's Table 1 / 8 analogue, its privacy, usability (Table 7) and
fairness figures, the wrong-key ball and the alpha sweep, for a Glow face teacher and its CNN students.

Rows (recipes/flow/utkface/<row>.yaml): Algorithm 1 with the paper's three decoder sizes, and the baselines of its
comparison on the same teacher, student (decoder (2, 3)), data and budget: MSE only, perceptual only, Baranchuk et
al. 2021, OMGD-style, WKD. The perceptual term is 1 - SSIM (LPIPS needs ImageNet weights that cannot be downloaded);
OMGD's VGG16 is the shared CIFAR-10 ResNet-20. Every row is `kdforge distill` for two epochs of a fixed training
subset (one per stage: decoder, then encoder), one process with one thread per run, `--jobs` at a time.

Scored on `--eval-n` test faces of utkface_faces (a seeded random sample) (never seen in training), per run:
- reconstruction PSNR / SSIM of the four encoder/decoder pairings (the run's own `flow` evaluator, all test faces);
- anonymisation with a secret orthogonal key (seed `--key-seed`) through the student pair and the teacher pair,
  fakes stored as 8-bit images: PSNR of fake to original (low: another face), de-anonymised PSNR / SSIM (high);
- re-identification rate (nearest neighbour among the originals) of the fakes (lower is more private) and of the
  de-anonymised faces (higher is a better recovery), in two named feature spaces: raw pixels and the age
  classifier's pooled penultimate features (no face-identity network ships offline);
- usability (Table 7 analogue): the age-group accuracy of a ResNet-20 kdforge trained on original faces
  (recipes/flow/utkface/age_classifier.yaml), on the original, the anonymised and the de-anonymised faces;
- fairness (Eq. 7-9 and STD) over race (White, Black, Asian, Indian; "Others" left out as the paper) and gender, of
  two per-image scores: the IoU of OpenCV's Haar-cascade face box on the original and on the fake (the paper's
  mIoU; a missed detection scores 0) and the de-anonymisation PSNR;
- the wrong-key ball (A.2.1): de-anonymisation PSNR with keys at growing Frobenius distance from the right one,
  and the alpha sweep (A.3.2, Fig. 6): fakes at alpha 0 .. 1, their spread and their re-identification rate.

    python benchmarks/flow_table.py --prepare           # the Glow teacher and the age classifier, once
    python benchmarks/flow_table.py [--rows ...] [--seeds 0 1 2] [--steps 150] [--jobs 2] [--eval-n 500]
Writes results/flow_cpu.md, results/flow_wrong_key.png and results/flow_alpha.png. Needs ../shared/data and
opencv-python-headless < 5 (the dev extra). A stopped table resumes: finished runs and analyses are kept.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import interleaved, publish, run_logged, run_plan, set_args  # noqa: E402  (benchmarks/ is run as a script folder)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes/flow/utkface"
ROWS = {  # row -> label
    "rdb_students": "Algorithm 1 (L1 + SSIM), decoder (2, 3)",
    "rdb_students_k1": "Algorithm 1, decoder (1, 3)",
    "rdb_students_l2": "Algorithm 1, decoder (3, 2)",
    "mse": "MSE only",
    "perceptual_only": "perceptual only (1 - SSIM)",
    "baranchuk": "Baranchuk et al. 2021 (prior samples, L1 + 10 SSIM)",
    "omgd": "OMGD-style (SSIM, ResNet-20 features + style, TV)",
    "wkd": "WKD (L1 + Haar high bands)",
}
MAIN = "rdb_students"  # the row whose student encoder every row's student decoder is paired with
TEACHER_RUN, CLASSIFIER_RUN = "flow_glow_utkface", "flow_age_classifier"  # the names in their recipes
RACES = ("White", "Black", "Asian", "Indian")  # UTKFace race ids 0-3; 4 ("Others") is left out
GENDERS = ("male", "female")
DISTANCE_FRACTIONS = (0.0, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)  # of the largest Frobenius distance
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _ckpt(runs: Path, name: str) -> Path:
    return runs / name / "checkpoints" / "last.pt"


def prepare(a: argparse.Namespace) -> None:
    for recipe in ("glow", "age_classifier"):
        print(f"kdforge train recipes/flow/utkface/{recipe}.yaml ...", flush=True)
        run_logged([sys.executable, "-m", "kdforge", "train", str(RECIPES / f"{recipe}.yaml"),
              *set_args([f"out_dir={a.runs}", "train.progress=false"])], a.runs / f"{recipe}.log")


def row_command(a: argparse.Namespace, row: str, seed: int) -> tuple[str, list[str]]:
    """MAIN distils both students (one epoch of the subset per stage); every other row its decoder alone."""
    name = f"{row}_seed{seed}"
    sets = [f"name={name}", f"seed={seed}", f"out_dir={a.runs / 'table'}", "train.progress=false",
            f"data.train_subset={a.steps * 64}", f"data.val_subset={a.val_n}",
            f"teacher.weights={_ckpt(a.runs, TEACHER_RUN)}"]
    sets += ["train.epochs=2"] if row == MAIN else ["train.epochs=1", "method.distil=decoder"]
    sets += a.overrides
    return name, [sys.executable, "-m", "kdforge", "distill", str(RECIPES / f"{row}.yaml"), *set_args(sets),
                  "--overwrite"]


# ---------------------------------------------------------------------------------------- scoring one pair
class Scorer:
    """Everything that is the same for every run: the test faces, the key, the age classifier and its features."""

    def __init__(self, a: argparse.Namespace) -> None:
        from kdforge.config import load_config
        from kdforge.data.build import load_splits
        from kdforge.models import build_model, load_weights
        from kdforge.models.feature_net import FrozenFeatures
        from kdforge.privacy.anonymize import secret_key

        cfg = load_config(RECIPES / "age_classifier.yaml")
        _, test = load_splits(cfg.data)
        # a seeded random sample: the split is stored in label order, so its first faces are all of one age group
        pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:min(a.eval_n, len(test))]
        pick = pick.sort().values.numpy()
        self.x = torch.tensor(test.images[pick]).permute(0, 3, 1, 2).float() / 255  # [0, 1]
        self.age = torch.from_numpy(test.labels[pick])
        self.race = torch.from_numpy(test.attrs["group"][pick]).long()
        self.gender = torch.from_numpy(test.attrs["gender"][pick]).long()
        self.classifier = build_model("resnet20", num_classes=len(test.classes)).eval()
        load_weights(self.classifier, _ckpt(a.runs, CLASSIFIER_RUN))
        taps = FrozenFeatures(self.classifier, ["auto:in"], mean=(0.0,) * 3, std=(1.0,) * 3, image_mean=(0.0,) * 3,
                              image_std=(1.0,) * 3, description="age ResNet-20 (kdforge-trained) pooled features")
        self.features = lambda images: taps(images)[0].flatten(1)
        self.features.description = taps.description
        self.key = secret_key(3 * self.x.shape[-1] ** 2, a.key_seed)
        self.key_seed = a.key_seed

    @torch.no_grad()
    def age_accuracy(self, images: torch.Tensor) -> float:
        pred = torch.cat([self.classifier(b).argmax(1) for b in images.split(250)])
        return float((pred == self.age).float().mean() * 100)

    @torch.no_grad()
    def through(self, fn, images: torch.Tensor, store: bool = True) -> torch.Tensor:
        """fn over batches, the output kept as an 8-bit image (what a user would store, and what the Glow's own
        `preprocess` makes of any input), or as floats with `store=False`. Decoders clip to [0, 1]. A Glow's inverse
        can overflow on a rotated latent: such images count in `self.nonfinite` and become black."""
        out = torch.cat([fn(b) for b in images.split(100)])
        self.nonfinite = int((~torch.isfinite(out).flatten(1).all(1)).sum())
        out = torch.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
        return (out.clamp(0, 1) * 255).round() / 255 if store else out

    def score(self, encode, decode) -> dict:
        from kdforge.privacy.anonymize import anonymize, deanonymize
        from kdforge.privacy.metrics import face_box_iou, group_fairness, psnr, reidentification_rate, ssim

        x = self.x
        recon = self.through(lambda b: decode(encode(b)), x, store=False)
        fake = self.through(lambda b: anonymize(b, encode, decode, self.key), x)
        bad_fakes = self.nonfinite
        back = self.through(lambda b: deanonymize(b, encode, decode, self.key), fake)
        back_psnr = psnr(back, x).clamp(max=100)
        iou = face_box_iou(x, fake)
        out = {"recon_psnr": float(psnr(recon, x).clamp(max=100).mean()), "recon_ssim": float(ssim(recon, x).mean()),
               "fake_psnr": float(psnr(fake, x).mean()), "deanon_psnr": float(back_psnr.mean()),
               "deanon_ssim": float(ssim(back, x).mean()),
               "reid_fake_pixels": reidentification_rate(fake, x)[0],
               "reid_fake_features": reidentification_rate(fake, x, self.features)[0],
               "reid_back_pixels": reidentification_rate(back, x)[0],
               "reid_back_features": reidentification_rate(back, x, self.features)[0],
               "age_fake": self.age_accuracy(fake), "age_back": self.age_accuracy(back),
               "box_iou_fake": float(iou.mean()), "nonfinite_fakes": bad_fakes, "nonfinite_back": self.nonfinite}
        keep = self.race < len(RACES)
        for attr, groups, n in (("race", self.race, len(RACES)), ("gender", self.gender, len(GENDERS))):
            mask = keep if attr == "race" else torch.ones_like(keep)
            for score_name, scores in (("iou", iou), ("psnr", back_psnr)):
                fair = group_fairness(scores[mask], groups[mask], n)
                out[f"fair_{attr}_{score_name}"] = {k: fair[k] for k in ("d_max", "d_mean", "epsilon", "std",
                                                                         "group_means")}
        return out


def wrong_key_curve(scorer: Scorer, encode, decode, n: int = 100) -> list[tuple[float, float]]:
    from kdforge.privacy.anonymize import anonymize, deanonymize, max_key_distance, perturbed_key
    from kdforge.privacy.metrics import psnr

    x, top = scorer.x[:n], max_key_distance(scorer.key.shape[0])
    fake = scorer.through(lambda b: anonymize(b, encode, decode, scorer.key), x)
    curve = []
    for frac in DISTANCE_FRACTIONS:
        wrong = perturbed_key(scorer.key, frac * top, seed=scorer.key_seed + 1)
        back = scorer.through(lambda b, k=wrong: deanonymize(b, encode, decode, k), fake)
        curve.append((frac * top, float(psnr(back, x).clamp(max=100).mean())))
    return curve


def alpha_sweep(scorer: Scorer, encode, decode, n: int = 200) -> tuple[list[dict], list[torch.Tensor]]:
    from kdforge.privacy.anonymize import anonymize
    from kdforge.privacy.metrics import reidentification_rate

    x, rows, grids = scorer.x[:n], [], []
    for alpha in ALPHAS:
        fake = scorer.through(lambda b, al=alpha: anonymize(b, encode, decode, scorer.key, alpha=al), x)
        flat = fake.flatten(1)
        spread = float(torch.pdist(flat[:100]).mean() / math.sqrt(flat.shape[1]))  # RMS pixel distance of pairs
        rows.append({"alpha": alpha, "spread": spread, "reid_pixels": reidentification_rate(fake, x)[0]})
        grids.append(fake[:8])
    return rows, grids


def flow_pair(a: argparse.Namespace, row: str, seed: int, pairing: str):
    """(encode, decode): the Glow both ways ("teacher"), or the row's student decoder after MAIN's student encoder
    of the same seed (the row's own encoder when it is MAIN)."""
    from kdforge.privacy.folder import load_flow_pair

    run, main = a.runs / "table" / f"{row}_seed{seed}", a.runs / "table" / f"{MAIN}_seed{seed}"
    if pairing == "teacher":
        return load_flow_pair(run, encoder="teacher", decoder="teacher")[:2]
    return (load_flow_pair(main, encoder="student", decoder="teacher")[0],
            load_flow_pair(run, encoder="teacher", decoder="student")[1])


def analysis_of(a: argparse.Namespace, scorer: Scorer, row: str, seed: int, pairing: str) -> dict:
    """The reconstruction / privacy / usability / fairness scores of one pair, cached beside its run."""
    path = a.runs / "table" / f"{row}_seed{seed}" / f"privacy_{pairing}_random{len(scorer.x)}_key{scorer.key_seed}.json"
    if not path.exists():
        encode, decode = flow_pair(a, row, seed, pairing)
        t = time.perf_counter()
        result = scorer.score(encode, decode)
        result["seconds"] = time.perf_counter() - t
        path.write_text(json.dumps(result, indent=1))
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------- cost
def cost_table(a: argparse.Namespace, rows: list[str]) -> list[str]:
    """Params, MACs and per-image latency (batch 1, one thread, interleaved medians) of each network."""
    from flow_speed import GlowDecoder  # the flow's decode as a module, so count_macs counts it

    from kdforge.config import load_config
    from kdforge.models.cost import count_macs
    from kdforge.recipe import build_model_from_config

    torch.set_num_threads(1)
    cfg = load_config(RECIPES / "rdb_students.yaml")
    glow = build_model_from_config(cfg.teacher, load=False).eval()
    x = torch.rand(1, 3, glow.img_size, glow.img_size) - 0.5
    glow.initialize_actnorm(torch.rand(16, 3, glow.img_size, glow.img_size) - 0.5)
    with torch.no_grad():
        z = glow.encode(x, standardized=True)

    nets = {"Glow encoder": (glow, (x,)), "Glow decoder": (GlowDecoder(glow), tuple(z))}
    for row in ("rdb_students", "rdb_students_k1", "rdb_students_l2"):
        if row not in rows:
            continue
        student = build_model_from_config(load_config(RECIPES / f"{row}.yaml").student, load=False).eval()
        if "student encoder (6, 3)" not in nets:
            nets["student encoder (6, 3)"] = (student.encoder, (x,))
        nets[f"student decoder {ROWS[row].rsplit('decoder ', 1)[-1]}"] = (student.decoder, tuple(z))

    def call(module, inputs):
        return lambda: [module(*inputs) for _ in range(10)]

    with torch.no_grad():
        times = interleaved({k: call(*v) for k, v in nets.items()}, rounds=5)
    lines = ["| network | params | MACs / image | ms / image (1 thread) | vs Glow decoder |", "|" + " --- |" * 5]
    base = times["Glow decoder"]
    for k, (module, inputs) in nets.items():
        params = sum(p.numel() for p in module.parameters())
        macs = count_macs(module, *inputs)
        speed = f"{base / times[k]:.1f}x faster" if "decoder" in k else "-"
        lines.append(f"| {k} | {params / 1e6:.2f} M | {macs / 1e6:.0f} M | {times[k] / 10 * 1e3:.1f} | {speed} |")
    return lines


# ---------------------------------------------------------------------------------------- the report
def _ms(vals, digits: int = 2, scale: float = 1.0) -> str:
    vals = [float(v) for v in vals if v is not None]  # summary.json stores a NaN metric as "nan"
    nans = sum(not math.isfinite(v) for v in vals)
    vals = [v * scale for v in vals if math.isfinite(v)]
    if nans:
        return f"NaN/inf in {nans} of {nans + len(vals)}" + (f" (others {_ms(vals, digits)})" if vals else "")
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.{digits}f} ± {sd:.{digits}f}"


def summary_of(a: argparse.Namespace, name: str) -> dict:
    return json.loads((a.runs / "table" / name / "summary.json").read_text())


def stage_minutes(a: argparse.Namespace, row: str, seed: int, stage: str) -> float | None:
    path = a.runs / "table" / f"{row}_seed{seed}" / "metrics.jsonl"
    epochs = [json.loads(line) for line in path.read_text().splitlines() if '"epoch"' in line]
    times = [e["epoch_time_s"] for e in epochs if e.get("kind") == "epoch" and e.get("stage") == stage]
    return sum(times) / 60 if times else None


def report(a: argparse.Namespace, scorer: Scorer, rows: list[str], compute: float) -> list[str]:
    main = [summary_of(a, f"{MAIN}_seed{s}") for s in a.seeds]
    train = main[0]["config"]["train"]
    teacher = analysis_of(a, scorer, MAIN, a.seeds[0], "teacher")
    ana = {row: [analysis_of(a, scorer, row, s, "student") for s in a.seeds] for row in rows}
    n = len(scorer.x)
    lines = ["# Flow distillation at CPU scale: a Glow face teacher, its CNN students, anonymisation", "",
             f"Teacher: `glow` (recipes/flow/utkface/glow.yaml: 32 px, L 3, K 8, width 128; 10 epochs), trained once "
             f"by `python benchmarks/flow_table.py --prepare`; test bits/dim {a.teacher_bpd}. Students: encoder "
             f"(K, L) = (6, 3), decoders as named (width 64, growth 32). Budget: {a.steps} steps of 64 faces per "
             f"stage (a fixed {a.steps * 64}-face training subset), Adam {train['lr']:g}, {train['schedule']} with "
             f"{train['warmup_epochs']:g} epochs of warm-up, each stage its own optimiser; seeds {a.seeds}; one "
             f"thread per run. The `{MAIN}` runs distil both students (decoder stage, then encoder stage); every "
             "other row distils its decoder alone "
             f"(`method.distil=decoder`, the same budget) and is paired with the `{MAIN}` encoder of the same seed: "
             "the baselines differ from Algorithm 1 only in the decoder's loss. The perceptual term is 1 - SSIM, not "
             "LPIPS (no ImageNet weights offline). Mean ± std over seeds.", "",
             "## Reconstruction PSNR of the encoder/decoder pairings (Table 1 analogue)", "",
             f"T = the Glow, S = students. S enc / S dec on {n} test faces (a seeded random sample); T enc / S dec "
             "(the decoder "
             f"alone) on {a.val_n}, by each run's `flow` evaluator; the Glow both ways: "
             f"{_ms([r['metrics']['psnr_teacher'] for r in main])} dB (exact up to float error); the shared student "
             "encoder into the Glow's decoder (S enc / T dec): "
             f"{_ms([r['metrics']['psnr_s_enc_t_dec'] for r in main])} dB.", "",
             "| row | S enc / S dec PSNR (dB) ↑ | S / S SSIM ↑ | T enc / S dec PSNR (dB) ↑ | T / S SSIM ↑ "
             "| decoder stage (min) |", "|" + " --- |" * 6]
    for row in rows:
        runs = [summary_of(a, f"{row}_seed{s}") for s in a.seeds]
        lines.append(f"| {ROWS[row]} | {_ms([r['recon_psnr'] for r in ana[row]])} | "
                     f"{_ms([r['recon_ssim'] for r in ana[row]], 3)} | "
                     f"{_ms([r['metrics']['psnr_t_enc_s_dec'] for r in runs])} | "
                     f"{_ms([r['metrics']['ssim_t_enc_s_dec'] for r in runs], 3)} | "
                     f"{_ms([stage_minutes(a, row, s, 'decoder') for s in a.seeds], 1)} |")
    lines += ["", f"The shared encoder stage took {_ms([stage_minutes(a, MAIN, s, 'encoder') for s in a.seeds], 1)} "
              "min per seed.", "", "## Cost (random weights, batch 1, 5 interleaved rounds of 10 calls, medians)", "",
              *cost_table(a, rows), ""]
    # privacy, usability, fairness
    lines += [f"## Anonymisation and de-anonymisation ({n} test faces, key seed {scorer.key_seed}, alpha 1; fakes and "
              "recoveries stored as 8-bit images)", "",
              f"Re-identification: the share of faces whose nearest original (cosine) is their own; chance "
              f"{100 / n:.1f} %. Feature spaces: raw pixels and `{scorer.features.description}`.", "",
              "| pair | PSNR fake↔original (dB) ↓ | de-anon. PSNR (dB) ↑ | de-anon. SSIM ↑ | re-id fakes, pixels (%) ↓ "
              "| re-id fakes, features (%) ↓ | re-id de-anon., pixels (%) ↑ | re-id de-anon., features (%) ↑ "
              "| fakes not finite |", "|" + " --- |" * 9]

    def prow(label, results):
        def col(key, scale=1.0, digits=2):
            return _ms([r[key] for r in results], digits, scale)
        return (f"| {label} | {col('fake_psnr')} | {col('deanon_psnr')} | {col('deanon_ssim', digits=3)} | "
                f"{col('reid_fake_pixels', 100, 1)} | "
                f"{col('reid_fake_features', 100, 1)} | {col('reid_back_pixels', 100, 1)} | "
                f"{col('reid_back_features', 100, 1)} | {col('nonfinite_fakes', digits=0)} |")
    lines.append(prow("teacher (Glow both ways)", [teacher]))
    lines += [prow(f"students: {ROWS[row]}", ana[row]) for row in rows]
    lines += ["", f"## Usability: age-group accuracy of the kdforge-trained classifier (Table 7 analogue; {n} faces)",
              "",
              f"On the original faces: {scorer.age_accuracy(scorer.x):.1f} %. Fakes keep the age of the person only if "
              "anonymisation keeps that attribute; de-anonymised faces should score like the originals.", "",
              "| pair | anonymised (%) | de-anonymised (%) |", "| --- | --- | --- |",
              f"| teacher | {teacher['age_fake']:.1f} | {teacher['age_back']:.1f} |"]
    lines += [f"| students: {ROWS[row]} | {_ms([r['age_fake'] for r in ana[row]], 1)} | "
              f"{_ms([r['age_back'] for r in ana[row]], 1)} |" for row in rows]
    for attr, names in (("race", RACES), ("gender", GENDERS)):
        lines += ["", f"## Fairness over {attr} ({', '.join(names)}): Eq. 7-9 and STD of the group means "
                  "(lower is fairer)", "", "| pair | score | group means | D_max | D_mean | epsilon | STD |",
                  "|" + " --- |" * 7]
        algorithm_1 = [(f"students: {ROWS[row]}", ana[row]) for row in rows if row.startswith("rdb_students")]
        for label, results in [("teacher", [teacher]), *algorithm_1]:
            for score, what in (("iou", "face-box IoU fake vs original"), ("psnr", "de-anon. PSNR (dB)")):
                fair = [r[f"fair_{attr}_{score}"] for r in results]
                means = " / ".join(_ms([f["group_means"][g] for f in fair], 2) for g in range(len(names)))
                lines.append(f"| {label} | {what} | {means} | " + " | ".join(
                    _ms([f[k] for f in fair], 3) for k in ("d_max", "d_mean", "epsilon", "std")) + " |")
    lines += ["", f"Produced by `python benchmarks/flow_table.py --rows {' '.join(rows)} --seeds "
              f"{' '.join(map(str, a.seeds))} --steps {a.steps} --jobs {a.jobs} --eval-n {a.eval_n} "
              f"--val-n {a.val_n}" + "".join(f" --set {o}" for o in a.overrides) + "` on 2 CPU cores: "
              f"{len(rows) * len(a.seeds)} runs, {compute / 60:.0f} min of process time in all; teacher and "
              "classifier not counted."]
    return lines


def figures(a: argparse.Namespace, scorer: Scorer, rows: list[str]) -> list[str]:
    """The wrong-key ball and the alpha sweep, for the teacher and the (2, 3) students of the first seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import save_image

    pairs = {side: flow_pair(a, MAIN, a.seeds[0], side) for side in ("teacher", "student")}
    lines = ["## The wrong-key ball (A.2.1): de-anonymisation PSNR (dB) with a key at Frobenius distance d", "",
             "| d | " + " | ".join(pairs) + " |", "| --- |" + " --- |" * len(pairs)]
    curves = {side: wrong_key_curve(scorer, *pair) for side, pair in pairs.items()}
    for i, frac in enumerate(DISTANCE_FRACTIONS):
        lines.append(f"| {curves['teacher'][i][0]:.3g} ({frac:g} of max) | "
                     + " | ".join(f"{curves[s][i][1]:.2f}" for s in pairs) + " |")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for side, curve in curves.items():
        ax.semilogx([max(d, 1e-2) for d, _ in curve], [p for _, p in curve], marker="o", label=side)
    ax.set_xlabel("Frobenius distance of the wrong key (0 plotted at 1e-2)")
    ax.set_ylabel("de-anonymisation PSNR (dB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "results/flow_wrong_key.png", dpi=120)
    lines += ["", "![wrong key](flow_wrong_key.png)", "",
              "## The alpha sweep (A.3.2, Fig. 6): fakes decoded from alpha * key @ z", "",
              "| alpha | " + " | ".join(f"{s}: spread (RMS px) / re-id pixels (%)" for s in pairs) + " |",
              "| --- |" + " --- |" * len(pairs)]
    sweeps = {side: alpha_sweep(scorer, *pair) for side, pair in pairs.items()}
    for i, alpha in enumerate(ALPHAS):
        lines.append(f"| {alpha} | " + " | ".join(f"{sweeps[s][0][i]['spread']:.3f} / "
                                                  f"{sweeps[s][0][i]['reid_pixels'] * 100:.1f}" for s in pairs) + " |")
    grid = torch.cat([torch.cat([scorer.x[:8]] + sweeps[s][1]) for s in pairs])
    save_image(grid, ROOT / "results/flow_alpha.png", nrow=8, padding=1)
    lines += ["", "![alpha sweep](flow_alpha.png)", "",
              f"Rows of the figure: originals, then fakes at alpha {', '.join(map(str, ALPHAS))}; teacher first, then "
              "the students. At alpha 0 every face becomes decode(0), the flow's mean face."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help=f"{MAIN} always runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=150, help="steps of 64 faces per stage")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    ap.add_argument("--eval-n", type=int, default=500, help="test faces in the privacy / fairness scores")
    ap.add_argument("--val-n", type=int, default=500, help="test faces each run's evaluator scores per epoch")
    ap.add_argument("--key-seed", type=int, default=20261203)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every row, e.g. train.lr=1e-3")
    ap.add_argument("--runs", type=Path, default=ROOT / "benchmarks/runs/flow")
    ap.add_argument("--prepare", action="store_true", help="train the Glow teacher and the age classifier, then stop")
    ap.add_argument("--results", default=str(ROOT / "results/flow_cpu.md"))
    a = ap.parse_args()
    a.runs = a.runs.resolve()
    (a.runs / "table").mkdir(parents=True, exist_ok=True)
    if a.prepare:
        prepare(a)
        return
    a.rows = [MAIN] + [r for r in a.rows if r != MAIN]  # every row's students pair with MAIN's encoder
    plan = [row_command(a, row, s) for row in a.rows for s in a.seeds]
    compute = run_plan(plan, a.runs / "table", a.jobs)
    teacher_metrics = [json.loads(line) for line in (a.runs / TEACHER_RUN / "metrics.jsonl").read_text().splitlines()]
    a.teacher_bpd = f"{[m for m in teacher_metrics if m.get('kind') == 'epoch'][-1]['val_bits_per_dim']:.3f}"
    torch.set_num_threads(2)
    scorer = Scorer(a)
    lines = report(a, scorer, a.rows, compute)
    lines[-1:-1] = [*figures(a, scorer, a.rows), ""]
    publish(lines, a.results)


if __name__ == "__main__":
    main()
