"""Folders of images anonymised and deanonymised with a flow run (kdforge/privacy/folder.py, `kdforge anonymize` /
`kdforge deanonymize`): round trips with the teacher and the students of a real (tiny) flow_kd recipe run, a wrong key,
a flow_mle run, the errors a user meets, and the two CLI verbs."""
from __future__ import annotations

import pytest
import torch
from torchvision.io import decode_image, write_jpeg, write_png

import kdforge
from kdforge.cli import main
from kdforge.config import load_config
from kdforge.data.synthetic import make_synthetic
from kdforge.engine.checkpoint import load_checkpoint
from kdforge.models import build_model
from kdforge.privacy.folder import anonymize_folder, deanonymize_folder, load_flow_pair, read_image
from kdforge.recipe import run_recipe

SIZE = 16
SEED = 2024
SMALL_RDB = {"levels": 2, "steps": 1, "width": 8, "growth": 4, "rdb_layers": 2}
GLOW = {"name": "glow", "img_size": SIZE, "levels": 2, "steps": 2, "hidden": 16}
# what the src folder holds, relative: flow-sized PNGs, a JPEG in a subfolder and a bigger non-square PNG
NAMES = ["face_0.png", "face_1.png", "face_2.png", "face_3.png", "odd_size.png", "sub/face_4.jpg"]
OUTPUTS = sorted(n.rsplit(".", 1)[0] + ".png" for n in NAMES)
TEACHERS = {"encoder": "teacher", "decoder": "teacher"}
# alpha 0.5: this tiny untrained Glow's fakes at alpha 1 overshoot [0, 1] (2.4% of values clipped when written, which
# the way back cannot undo: mean recovery 39 dB, worst image 26 dB); at 0.5 none are clipped
ALPHA = 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny flow_kd recipe run (a saved Glow teacher, flow_student students, 2 steps), a tiny flow_mle run, and a
    folder of source images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention
    root = tmp_path_factory.mktemp("flows")
    faces = torch.as_tensor(make_synthetic(32, 16, size=SIZE, seed=0)["train"].images).permute(0, 3, 1, 2)
    glow = build_model(**GLOW)
    glow.initialize_actnorm(glow.preprocess(faces.float() / 255))  # the teacher's only "training"
    torch.save(glow.state_dict(), root / "glow.pt")
    data = {"name": "synthetic", "synthetic_train": 32, "synthetic_test": 16, "synthetic_size": SIZE, "batch_size": 16,
            "eval_batch_size": 16, "crop_pad": 0, "flip": False, "mean": [0.0] * 3, "std": [1.0] * 3}
    train = {"epochs": 2, "max_steps": 2, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "device": "cpu",
             "progress": False}
    run_recipe(load_config(None, base={
        "name": "kd", "out_dir": str(root / "runs"), "data": data,
        "teacher": {**GLOW, "weights": str(root / "glow.pt")},
        "student": {"name": "flow_student", "img_size": SIZE, "latent_levels": 2, "encoder": SMALL_RDB,
                    "decoder": SMALL_RDB},
        "method": {"name": "flow_kd"}, "eval": {"name": "flow"}, "train": train}))
    run_recipe(load_config(None, base={
        "name": "mle", "out_dir": str(root / "runs"), "data": data, "student": GLOW, "method": {"name": "flow_mle"},
        "eval": {"name": "flow", "monitor": "bits_per_dim", "mode": "min"}, "train": {**train, "epochs": 1}}))
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(4):
        write_png(faces[i].contiguous(), str(src / f"face_{i}.png"))
    write_jpeg(faces[4].contiguous(), str(src / "sub" / "face_4.jpg"), quality=95)
    odd = torch.nn.functional.interpolate(faces[5:6].float(), size=(24, 20), mode="bilinear")[0]
    write_png(odd.round().clamp(0, 255).to(torch.uint8), str(src / "odd_size.png"))
    (src / "notes.txt").write_text("not an image")
    yield {"kd": root / "runs" / "kd", "mle": root / "runs" / "mle", "src": src, "root": root}
    torch.set_num_threads(threads)


def _outputs(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


def test_teacher_pair_gives_the_faces_back_and_a_wrong_key_does_not(runs, tmp_path):
    fakes, back, wrong = tmp_path / "fakes", tmp_path / "back", tmp_path / "wrong"
    made = anonymize_folder(runs["kd"], runs["src"], fakes, key_seed=SEED, alpha=ALPHA, **TEACHERS)
    assert made["images"] == made["written"] == len(NAMES) and _outputs(fakes) == OUTPUTS
    assert made["img_size"] == SIZE and made["key_dim"] == 3 * SIZE ** 2 and made["clipped"] < 1e-3
    assert all(decode_image(str(fakes / n)).shape == (3, SIZE, SIZE) for n in OUTPUTS)  # resized to the flow's
    assert made["psnr"] < 20  # the fakes do not look like the originals (measured 13.7 dB)

    undone = deanonymize_folder(runs["kd"], fakes, back, key_seed=SEED, alpha=ALPHA, reference=runs["src"],
                                **TEACHERS)
    assert _outputs(back) == OUTPUTS and undone["psnr_compared_with"].startswith("the reference folder")
    # An exact flow: only the fakes' 8-bit rounding is lost (RMS 1/(255 sqrt 12): 59 dB), times 1/alpha = 2 and the
    # flow's own stretch on the way back; measured mean 49.2 dB, worst 48.3 dB. The wrong key's is 11.8 dB.
    # (made["clipped"]: 2e-4 of the values, at the resized and JPEG inputs' extremes)
    assert undone["psnr_min"] > 45, undone
    guessed = deanonymize_folder(runs["kd"], fakes, wrong, key_seed=SEED + 1, alpha=ALPHA, reference=runs["src"],
                                 **TEACHERS)
    assert guessed["psnr"] < 20 and guessed["psnr"] < undone["psnr"] - 25, guessed


def test_teacher_pair_is_exact_on_8_bit_images_in_memory(runs, tmp_path):
    encode, decode, info = load_flow_pair(runs["kd"])  # teacher / teacher by default
    assert (info.method, info.encoder, info.decoder, info.latent, info.img_size) == (
        "flow_kd", "teacher", "teacher", "standardized", SIZE)
    assert "teacher Glow encoder" in info.describe() and "glow.pt" in info.describe()
    images = torch.stack([read_image(runs["src"] / n, SIZE) for n in NAMES])
    latents = encode(images.float() / 255)
    assert [tuple(z.shape[1:]) for z in latents] == [(6, 8, 8), (24, 4, 4)]  # the Glow's levels, standardized
    again = decode(latents)
    assert again.min() >= 0 and again.max() <= 1
    assert torch.equal((again * 255).round().to(torch.uint8), images)  # model_to_unit undoes preprocess exactly

    raw_run = tmp_path / "raw.pt"  # the same run had it distilled raw latents: both sides speak raw z_l
    ckpt = load_checkpoint(runs["kd"] / "checkpoints" / "last.pt")
    ckpt["config"]["method"]["latent"] = "raw"
    torch.save(ckpt, raw_run)
    encode_raw, decode_raw, info = load_flow_pair(raw_run)
    assert info.latent == "raw"
    glow = build_model(**GLOW)
    glow.load_state_dict(torch.load(runs["root"] / "glow.pt"))
    raw = encode_raw(images.float() / 255)
    expect = glow.eval().encode(glow.preprocess(images.float() / 255))
    assert all(torch.allclose(a, b) for a, b in zip(raw, expect))
    assert torch.equal((decode_raw(raw) * 255).round().to(torch.uint8), images)


@pytest.mark.parametrize("encoder, decoder", [("student", "student"), ("teacher", "student"),
                                              ("student", "teacher")])
def test_student_pairings_round_trip_and_keep_the_names(runs, tmp_path, encoder, decoder):
    made = anonymize_folder(runs["kd"], runs["src"], tmp_path / "fakes", key_seed=SEED, encoder=encoder,
                            decoder=decoder, batch_size=4)  # batches of 4: the last one is partial
    named = {"teacher": "teacher Glow", "student": "student"}
    assert f"{named[encoder]} encoder" in made["loaded"] and f"{named[decoder]} decoder" in made["loaded"]
    undone = deanonymize_folder(runs["kd"], tmp_path / "fakes", tmp_path / "back", key_seed=SEED, encoder=encoder,
                                decoder=decoder)
    assert _outputs(tmp_path / "fakes") == _outputs(tmp_path / "back") == OUTPUTS
    assert undone["images"] == len(NAMES) and undone["psnr"] is None  # no reference given
    # students trained for 2 steps invert nothing, so their round trip's quality is not asserted (PSNR against the
    # originals: 14 dB, as the fakes'); the students-only pair loads without the Glow's weights
    assert (made["latent"], undone["latent"]) == ("standardized", "standardized")


def test_a_flow_mle_run_is_its_glow_and_has_no_students(runs, tmp_path):
    with pytest.raises(ValueError, match="flow_mle run: it trained the Glow itself"):
        load_flow_pair(runs["mle"], encoder="student", decoder="teacher")
    with pytest.raises(ValueError, match="no student encoder"):
        anonymize_folder(runs["mle"], runs["src"], tmp_path / "fakes", key_seed=SEED)  # students by default
    assert not (tmp_path / "fakes").exists()
    made = anonymize_folder(runs["mle"] / "checkpoints" / "last.pt", runs["src"], tmp_path / "fakes", key_seed=SEED,
                            alpha=ALPHA, **TEACHERS)
    assert "the run's trained flow" in made["loaded"]
    undone = deanonymize_folder(runs["mle"], tmp_path / "fakes", tmp_path / "back", key_seed=SEED, alpha=ALPHA,
                                reference=runs["src"], **TEACHERS)
    assert undone["psnr_min"] > 45, undone  # as the flow_kd run's teacher: measured mean 49.5 dB, worst 49.0 dB


def test_user_errors_fail_clearly_and_write_nothing(runs, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        anonymize_folder(runs["kd"], tmp_path / "empty", out, key_seed=SEED)
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        anonymize_folder(runs["kd"], tmp_path / "missing", out, key_seed=SEED)
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        anonymize_folder(tmp_path / "no_run", runs["src"], out, key_seed=SEED)
    with pytest.raises(ValueError, match="alpha must be a finite nonzero"):
        anonymize_folder(runs["kd"], runs["src"], out, key_seed=SEED, alpha=0.0)
    with pytest.raises(ValueError, match="key_seed"):
        anonymize_folder(runs["kd"], runs["src"], out, key_seed=-1)
    with pytest.raises(ValueError, match="'teacher' or 'student'"):
        load_flow_pair(runs["kd"], encoder="glow")

    broken = tmp_path / "broken"
    broken.mkdir()
    write_png(torch.zeros(3, SIZE, SIZE, dtype=torch.uint8), str(broken / "a_good.png"))
    (broken / "b_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*b_corrupt.jpg"):
        anonymize_folder(runs["kd"], broken, out, key_seed=SEED)
    assert not out.exists()  # everything is read before anything is written

    clash = tmp_path / "clash"
    clash.mkdir()
    for name in ("a.png", "a.jpg"):
        (clash / name).write_bytes((runs["src"] / "face_0.png").read_bytes())
    with pytest.raises(ValueError, match="would both be written as a.png"):
        anonymize_folder(runs["kd"], clash, out, key_seed=SEED)

    classifier = tmp_path / "classifier.pt"  # a run of another method: a config and no flow
    torch.save({"config": load_config(None, ["method.name=kd", "student.name=resnet20"]).to_dict(), "model": {}},
               classifier)
    with pytest.raises(ValueError, match="kd run, not a flow run"):
        load_flow_pair(classifier)


def test_existing_outputs_are_kept_unless_overwrite(runs, tmp_path):
    out = tmp_path / "fakes"
    anonymize_folder(runs["kd"], runs["src"], out, key_seed=SEED)
    before = (out / "face_0.png").read_bytes()
    with pytest.raises(FileExistsError, match=f"{len(NAMES)} of the outputs exist already"):
        anonymize_folder(runs["kd"], runs["src"], out, key_seed=SEED + 1)
    assert (out / "face_0.png").read_bytes() == before
    anonymize_folder(runs["kd"], runs["src"], out, key_seed=SEED + 1, overwrite=True)
    assert (out / "face_0.png").read_bytes() != before  # another key, another fake
    nested = runs["src"].parent / "src_copy"  # dst inside src is left out of src's listing
    nested.mkdir(exist_ok=True)
    for name in ("face_0.png", "face_1.png"):
        (nested / name).write_bytes((runs["src"] / name).read_bytes())
    made = anonymize_folder(runs["kd"], nested, nested / "fakes", key_seed=SEED)
    again = anonymize_folder(runs["kd"], nested, nested / "fakes", key_seed=SEED, overwrite=True)
    assert made["images"] == again["images"] == 2


def test_lazy_top_level_names():
    from kdforge.privacy import folder

    assert kdforge.anonymize_folder is folder.anonymize_folder
    assert kdforge.deanonymize_folder is folder.deanonymize_folder


def test_cli_verbs_end_to_end(runs, tmp_path, capsys):
    fakes, back = str(tmp_path / "fakes"), str(tmp_path / "back")
    teacher = ["--encoder", "teacher", "--decoder", "teacher", "--alpha", str(ALPHA), "--key-seed", str(SEED)]
    assert main(["anonymize", str(runs["kd"]), str(runs["src"]), fakes, *teacher, "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "run kd (flow_kd" in printed and f"anonymized {len(NAMES)} images" in printed
    assert "PSNR against the originals" in printed
    assert main(["deanonymize", str(runs["kd"]), fakes, back, *teacher, "--reference", str(runs["src"])]) == 0
    printed = capsys.readouterr().out
    assert f"deanonymized {len(NAMES)} images" in printed and "PSNR against the reference folder" in printed
    assert _outputs(tmp_path / "back") == OUTPUTS

    for argv, message in [
        (["anonymize", str(runs["kd"]), str(runs["src"]), fakes, "--key-seed", "1"], "outputs exist already"),
        (["anonymize", str(tmp_path / "nope"), str(runs["src"]), back, "--key-seed", "1"], "no such run folder"),
        (["anonymize", str(runs["mle"]), str(runs["src"]), str(tmp_path / "x"), "--key-seed", "1"],
         "no student encoder"),
        (["deanonymize", str(runs["kd"]), fakes, str(tmp_path / "y"), "--key-seed", "1", "--alpha", "0"],
         "alpha must be a finite nonzero"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
