"""`kdforge demo flow`: flow distillation's story (issue 18) on generated data in about a minute and a half on 2 CPU
cores.

A Glow (kdforge/models/glow.py) is trained by maximum likelihood (`flow_mle`) on generated 16 px shapes: its test
bits/dim, and its exact invertibility, max |decode(encode(x)) - x|. It is then distilled by Algorithm 1 (`flow_kd`:
the decoder stage, then the encoder stage) into a `flow_student` pair whose decoder is a quarter of the Glow's size;
the flow evaluator scores all four encoder/decoder pairings, and the Glow's and the students' networks are counted
(parameters, MACs by `count_macs`) and timed, interleaved, on a batch of 64 test images with torch on one thread.
Last, 64 test images are anonymised with a seeded secret key (kdforge.privacy.anonymize: z -> K z, decoded to a
fake) through the Glow, through the students and through both mixed pairings, and de-anonymised with the key, with
the key from the fake rounded to 8 bits (what `kdforge anonymize` writes: `load_flow_pair` on the students' run),
and with wrong keys (`perturbed_key`) at Frobenius distances 1, 10 and 39.2 (= sqrt(2 D), where an independent random
key lies); every PSNR is against the original. anonymisation.png shows original / fake / recovered / recovered from
the 8-bit fake / the blind guess's recovery for eight images, through the Glow and through the students.

Departures from recipes/flow/utkface/glow.yaml and rdb_students.yaml (faces at 32 px), each for time or measured:
- data: the generated `synthetic` shapes at 16 px, 4,000 train / 500 test images (made in memory, so nothing is
  prepared into <out>); their uniform pixel noise (std 0.06) caps what a non-invertible decoder can reach: the image
  without its noise scores 24.4 dB against it.
- Glow: L = 2, K = 4, hidden 32 (78.6 k parameters; the recipe's 1.62 M), Adam at 1e-3, not 5e-4 (10 epochs, 620
  steps; at 5e-4 the sigmoid-scaled Glow reached 5.25 bits/dim against 4.93), and the coupling scale soft-clamped,
  exp(2 tanh(s / 2)) (`affine_clamp: 2.0`), not Glow's sigmoid(s + 2), whose inverse diverges: with it 0.2-0.3 %
  of the Glow's samples at temperature 1 decoded to inf / NaN, which stopped flow_kd's encoder stage with a NaN loss in
  its first epoch, and 8 of 500 test images' fakes were non-finite. Soft-clamped: 4.47 bits/dim against 4.93, and
  none of 5,000 samples or 500 fakes diverged.
- students: encoder (K, L) = (2, 2) at width 32 (109.5 k), decoder (1, 2) at width 16, growth 8, 3-layer RDBs
  (18.2 k; the recipe's (6, 3) and (2, 3) at width 64: 2.68 M and 0.93 M), Adam at 3e-3 for 12 epochs, 6 per stage
  (the recipe: 2e-4, 4 epochs): at 2e-3 the students reached 23.5 dB, at 3e-3 24.4. A decoder at width 24 (36 k,
  about 2.6x faster than the Glow's) reached 23.9 dB at 2e-3; a Glow of hidden 64 (166 k) made the decoder 6x
  faster but its students reached 21.3 dB, and the demo took about 20 s longer.

Measured at the default size: the Glow 4.469 test bits/dim, max |decode(encode(x)) - x| = 9.8e-7. Reconstruction
PSNR / SSIM: students 24.41 dB / 0.619 (the noise cap: 24.4), Glow encoder + student decoder 23.85 / 0.584, student
encoder + Glow decoder 22.47 / 0.620 (max error 437: the Glow's inverse blows the student encoder's errors up on a
few images). The student decoder: 18.2 k parameters against 78.6 k, 0.67 M MACs an image against 2.56 M, 3.4-3.5x
faster (3.5-4.0 ms against 12.3-13.5 ms for 64 images, two runs); the student encoder is larger than the Glow
(109.5 k, 4.26 M MACs) and only 1.2x faster: the speed claim is the decoder's. Anonymisation through the Glow: the
fake is 14.6 dB from its original; the key recovers it at 122 dB from the float fake but at 26.9 dB from the 8-bit
one (the trained flow amplifies the rounding, the more the better it models the noise: 32 dB with the sigmoid-scaled
Glow of 4.93 bits/dim, 50 dB with the quick demo's barely trained one); wrong keys at distances 1 / 10 / 39.2
recover 47.4 / 27.4 / 14.7 dB: a close guess succeeds (the (theta, A)-ball of the paper's Lemma 1), a blind one
gives another image. Through the students: fake 15.2 dB, the key 19.8 dB (their round trip is 24.4 dB, and
anonymising takes two), the blind guess 15.3 dB. The whole demo took 80-83 s from the command line (76-79 s in the
demo, 78-80 s of CPU) with OMP_NUM_THREADS=1 on 2 cores shared with a training job (load 3-4); the quick demo (256 /
64 images, 2 epochs each) about 5 s.
Every step is an ordinary recipe run through `run_recipe`, so each leaves a full run folder with its report (the
Glow's samples at temperatures 0, 0.5, 0.7 and 1 per epoch in teacher/samples/).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.demo import demo_config
from kdforge.models.cost import count_macs, interleaved
from kdforge.recipe import run_recipe

SIZE = 16  # L = 2 levels: latents (6, 8, 8) and (24, 4, 4), D = 768 numbers an image
BASE: dict[str, Any] = {  # the utkface flow recipes' data section, on generated shapes
    "data": {"name": "synthetic", "synthetic_train": 4000, "synthetic_test": 500, "synthetic_size": SIZE,
             "options": {"group_bias": 0.5}, "batch_size": 64, "eval_batch_size": 250, "crop_pad": 0,
             "flip": True, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},  # [0, 1]: the flow dequantises
    "train": {"optimizer": "adam", "betas": [0.9, 0.999], "weight_decay": 0.0, "schedule": "cosine"},
    "eval": {"name": "flow"},
}
# glow.yaml's Glow at a demo's size; the soft-clamped coupling scale is the demo's (module docstring)
TEACHER = {"name": "glow", "img_size": SIZE, "levels": 2, "steps": 4, "hidden": 32, "affine_clamp": 2.0}
TEACHER_TRAIN = {"epochs": 10, "lr": 1e-3, "warmup_epochs": 1, "grad_clip": 50.0}
# rdb_students.yaml's pair, shrunk: the encoder (K, L) = (2, 2), the decoder (1, 2) at half the encoder's width
STUDENT = {"name": "flow_student", "img_size": SIZE, "latent_levels": TEACHER["levels"],
           "encoder": {"steps": 2, "levels": 2, "width": 32, "growth": 16, "rdb_layers": 3},
           "decoder": {"steps": 1, "levels": 2, "width": 16, "growth": 8, "rdb_layers": 3}}
FLOW_KD = {"name": "flow_kd", "l1_weight": 1.0, "ssim_weight": 1.0, "latent_weight": 1.0,
           "encoder_loss": "weighted", "latent": "standardized", "decoder_share": 0.5}  # rdb_students.yaml's
STUDENT_TRAIN = {"epochs": 12, "lr": 3e-3, "warmup_epochs": 0.5}
PAIRINGS = {  # label -> (encoder, decoder, the flow evaluator's name for the pairing)
    "Glow (teacher)": ("teacher", "teacher", "teacher"),
    "students": ("student", "student", "student"),
    "Glow encoder, student decoder": ("teacher", "student", "t_enc_s_dec"),
    "student encoder, Glow decoder": ("student", "teacher", "s_enc_t_dec"),
}
KEY_SEED, WRONG_KEY_SEED = 18, 1
DIM = 3 * SIZE ** 2  # the key is DIM x DIM
# Frobenius distances of the wrong keys from the secret one: a close guess, a farther one, and the distance at which
# an independent random key lies (sqrt(2 D): a blind guess)
WRONG_DISTANCES = (1.0, 10.0, round(math.sqrt(2 * DIM), 1))
NOISE_STD = 0.06  # the generated images' uniform pixel noise (kdforge.data.synthetic)
N_ANONYMISE, N_GRID = 64, 8
QUICK = {"synthetic_train": 256, "synthetic_test": 64, "epochs": 2}


def _recipe(name: str, out: Path, method: dict[str, Any], quick: bool, progress: bool, train: dict[str, Any],
            **extra: Any) -> Any:
    small = {k: QUICK[k] for k in ("synthetic_train", "synthetic_test")} if quick else None
    base = {**BASE, "train": {**BASE["train"], **train}}
    return demo_config(base, name, out, method, progress=progress, quick_data=small,
                       epochs=QUICK["epochs"] if quick else None, **extra)


class _GlowDecoder(nn.Module):
    """The flow's decode as a module of its own, so FlopCounterMode counts it like the student decoder."""

    def __init__(self, glow: nn.Module) -> None:
        super().__init__()
        self.glow = glow

    def forward(self, *latents: torch.Tensor) -> torch.Tensor:
        return self.glow.decode(list(latents), standardized=True)


class _GlowEncoder(nn.Module):
    def __init__(self, glow: nn.Module) -> None:
        super().__init__()
        self.glow = glow

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.glow.encode(x, standardized=True)


def _costs(glow: nn.Module, student: nn.Module, x: torch.Tensor) -> list[tuple[str, int, int, float, float]]:
    """(network, parameters, MACs an image, ms per batch, speed-up over the Glow's same direction) of the four
    networks on the batch x (model space), timed interleaved with torch on one thread, without grad."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            z = glow.encode(x, standardized=True)
            nets = {"Glow decoder": (_GlowDecoder(glow), tuple(z)), "student decoder": (student.decoder, (z,)),
                    "Glow encoder": (_GlowEncoder(glow), (x,)), "student encoder": (student.encoder, (x,))}
            seconds = interleaved({k: (lambda m=m, a=a: m(*a)) for k, (m, a) in nets.items()}, rounds=7)
        rows = []
        for name, (module, args) in nets.items():
            one = tuple([t[:1] for t in a] if isinstance(a, list) else a[:1] for a in args)
            rows.append((name, sum(p.numel() for p in module.parameters()), count_macs(module, *one),
                         1e3 * seconds[name], seconds[name.replace("student", "Glow")] / seconds[name]))
        return rows
    finally:
        torch.set_num_threads(threads)


def _test_images(n: int, quick: bool) -> torch.Tensor:
    """The first n test images of the demo's data, (n, 3, S, S) in [0, 1], as the runs' loaders serve them."""
    from kdforge.data.synthetic import make_synthetic

    data = BASE["data"]
    sizes = QUICK if quick else data
    test = make_synthetic(sizes["synthetic_train"], sizes["synthetic_test"], size=SIZE, seed=0,
                          **data["options"])["test"]
    return torch.as_tensor(test.images[:n]).permute(0, 3, 1, 2).float() / 255


def _anonymisation(glow: nn.Module, student: nn.Module, run: Path, x: torch.Tensor,
                   out: Path) -> list[tuple[str, float, float, float, list[float]]]:
    """Per pairing: (label, then mean PSNRs against the originals x in [0, 1] of: the fake, the recovery with the
    key, the recovery with the key from the fake rounded to 8 bits, the recovery with each wrong key).

    The fakes are kept as floats except in the 8-bit column, which goes through `load_flow_pair` on the students'
    run folder, as `kdforge anonymize` / `deanonymize` do (a fake there is an 8-bit image). Also saves
    anonymisation.png: for the Glow and then the students, rows original / fake / recovered / recovered from the
    8-bit fake / recovered with the blind guess (the farthest wrong key), one column per image."""
    from torchvision.utils import save_image

    from kdforge.privacy import anonymize, deanonymize, load_flow_pair, perturbed_key, psnr, secret_key
    from kdforge.privacy.folder import model_to_unit

    key = secret_key(DIM, KEY_SEED)
    wrong = [perturbed_key(key, d, WRONG_KEY_SEED) for d in WRONG_DISTANCES]
    encoders = {"teacher": lambda v: glow.encode(v, standardized=True), "student": student.encoder}
    decoders = {"teacher": lambda z: glow.decode(z, standardized=True), "student": student.decoder}
    xm = glow.preprocess(x)  # eval mode: the bin centres, which model_to_unit maps back to x exactly
    rows, grid = [], []
    with torch.no_grad():
        for label, (enc_side, dec_side, _) in PAIRINGS.items():
            enc, dec = encoders[enc_side], decoders[dec_side]
            fake = anonymize(xm, enc, dec, key)
            back = deanonymize(fake, enc, dec, key)
            guesses = [deanonymize(fake, enc, dec, k) for k in wrong]
            encode8, decode8, _ = load_flow_pair(run, encoder=enc_side, decoder=dec_side)
            back8 = deanonymize(anonymize(x, encode8, decode8, key), encode8, decode8, key)
            fake, back, *guesses = (model_to_unit(v, glow.n_bits) for v in (fake, back, *guesses))
            rows.append((label, float(psnr(fake, x).mean()), float(psnr(back, x).clamp(max=200).mean()),
                         float(psnr(back8, x).clamp(max=200).mean()), [float(psnr(g, x).mean()) for g in guesses]))
            if enc_side == dec_side:
                grid += [v[:N_GRID].clamp(0, 1) for v in (x, fake, back, back8, guesses[-1])]
    big = nn.functional.interpolate(torch.cat(grid), scale_factor=4, mode="nearest")
    save_image(big, out / "anonymisation.png", nrow=N_GRID, padding=2, pad_value=1.0)
    return rows


def _reading(glow_metrics: dict[str, Any], kd_metrics: dict[str, Any], costs: list, anon: list) -> str:
    """What this run's numbers say, in words: each claim of the story against its yardstick."""
    noise_psnr = -20 * math.log10(NOISE_STD)  # an image without its noise, against the noisy one
    dec = {r[0]: r for r in costs}
    speed = dec["student decoder"][4]
    glow, students = anon[0], anon[1]
    closeness = ("close to it: they reproduce the shapes, not the noise" if kd_metrics["psnr_student"] > noise_psnr - 2
                 else "well below it: the students are still far from their teacher")
    blind = "no closer than the fake itself" if glow[4][-1] <= glow[1] + 1 else "closer than the fake"
    return (
        f"Reading (this run): the Glow is exactly invertible (largest error {glow_metrics['max_err_teacher']:.1e}, "
        f"an 8-bit level is {1 / 256:.1e}). The student decoder has {dec['student decoder'][1] / 1e3:.1f} k "
        f"parameters against the Glow's {dec['Glow decoder'][1] / 1e3:.1f} k and decodes "
        f"{speed:.1f}x {'faster' if speed >= 1 else 'slower'}. The students reconstruct at "
        f"{kd_metrics['psnr_student']:.1f} dB (SSIM {kd_metrics.get('ssim_student', float('nan')):.2f}); an image "
        f"without its pixel noise (uniform, std {NOISE_STD}) scores {noise_psnr:.1f} dB against it, {closeness}. "
        f"A fake is {glow[1]:.1f} dB from its original through the Glow ({students[1]:.1f} dB through the "
        f"students): another image. The key gives the original back at {glow[2]:.0f} dB through the Glow, "
        f"{glow[3]:.1f} dB once the fake is rounded to 8 bits (the flow amplifies the rounding), and at "
        f"{students[2]:.1f} dB through the students; a guess at distance {WRONG_DISTANCES[0]:g} from the key "
        f"recovers {glow[4][0]:.1f} dB through the Glow, a blind guess (distance {WRONG_DISTANCES[-1]:g}) "
        f"{glow[4][-1]:.1f} dB, {blind}.")


def run_flow_demo(out: str | Path = "runs/demo/flow", *, quick: bool = False, progress: bool = True) -> str:
    out = Path(out)
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def step(label: str, cfg: Any) -> Any:
        print(f"[demo flow] {label} ...", flush=True)
        t = time.perf_counter()
        res = run_recipe(cfg, overwrite=True, eval_teacher=False)
        times[label] = time.perf_counter() - t
        return res

    glow_run = step("Glow", _recipe("teacher", out, {"name": "flow_mle"}, quick, progress, TEACHER_TRAIN,
                                    student=TEACHER, eval={"name": "flow", "monitor": "bits_per_dim", "mode": "min"}))
    teacher = {**TEACHER, "weights": str(out / "teacher" / "checkpoints" / "last.pt")}
    kd_run = step("students", _recipe("students", out, FLOW_KD, quick, progress, STUDENT_TRAIN, student=STUDENT,
                                      teacher=teacher))
    print("[demo flow] speed and anonymisation ...", flush=True)
    t = time.perf_counter()
    glow, student = kd_run.distiller.teacher.eval(), kd_run.student.eval()
    x = _test_images(N_ANONYMISE, quick)
    costs = _costs(glow, student, glow.preprocess(x))
    anon = _anonymisation(glow, student, out / "students", x, out)
    times["speed and anonymisation"] = time.perf_counter() - t

    g, m = glow_run.metrics, kd_run.metrics
    lines = [f"Glow: test bits/dim {g['bits_per_dim']:.3f}; invertibility, max |decode(encode(x)) - x|: "
             f"{g['max_err_teacher']:.1e}.", "",
             "| reconstruction (encoder, decoder) | PSNR (dB) | SSIM | max error |", "| --- | --- | --- | --- |"]
    for label, (_, _, name) in PAIRINGS.items():
        lines.append(f"| {label} | {m[f'psnr_{name}']:.2f} | {m.get(f'ssim_{name}', float('nan')):.3f} | "
                     f"{m[f'max_err_{name}']:.2e} |")
    lines += ["", f"| network | params | MACs / image | ms / batch of {len(x)} | speed-up vs the Glow |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r[0]} | {r[1] / 1e3:.1f} k | {r[2] / 1e6:.2f} M | {r[3]:.2f} | {r[4]:.1f}x |" for r in costs]
    wrong = " | ".join(f"wrong key at {d:g}" for d in WRONG_DISTANCES)
    lines += ["", f"| anonymised with (encoder, decoder) | fake | recovered, key | recovered, key, 8-bit fake | "
                  f"{wrong} |", "| --- | --- | --- | --- |" + " --- |" * len(WRONG_DISTANCES)]
    lines += [f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | " + " | ".join(f"{v:.2f}" for v in r[4]) + " |"
              for r in anon]
    table = "\n".join(lines)
    reading = _reading(g, m, costs, anon)
    steps = {k: (r.history[-1]["step"] if r.history else 0) for k, r in (("glow", glow_run), ("kd", kd_run))}
    sizes = QUICK if quick else BASE["data"]
    header = (f"# kdforge demo flow\n\nGenerated {SIZE} px shapes ({sizes['synthetic_train']} train / "
              f"{sizes['synthetic_test']} test images, {'quick' if quick else 'default'} size, one seed, total "
              f"{time.perf_counter() - t0:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + "). "
              f"Teacher: Glow L = {TEACHER['levels']}, K = {TEACHER['steps']}, hidden {TEACHER['hidden']}, "
              f"{steps['glow']} steps by maximum likelihood (flow_mle). Students: an RDB encoder and a smaller RDB "
              f"decoder, {steps['kd']} steps of flow_kd (Algorithm 1: the decoder stage, then the encoder stage). "
              "Reconstructions are scored on the test split in the flow's [-0.5, 0.5] space (the flow evaluator); "
              f"anonymisation PSNRs (dB) are means over {len(x)} test images against the originals in [0, 1]: of "
              f"the fake, and of the image recovered with the secret key (seed {KEY_SEED}), with it from the fake "
              "rounded to 8 bits (as `kdforge anonymize` writes it), and with wrong keys at Frobenius distances "
              f"{', '.join(f'{d:g}' for d in WRONG_DISTANCES)} from it (the last: where an independent random key "
              "lies). anonymisation.png: one column per image, rows original / fake / recovered / recovered from "
              "the 8-bit fake / recovered with the farthest wrong key, for the Glow (top five) and the students "
              "(bottom five).\n\n")
    (out / "report.md").write_text(header + table + "\n\n" + reading
                                   + "\n\nEach run's folder holds its own report.md.\n")
    print("\n" + table + "\n\n" + reading)
    return table
