"""Reliability: run folders that are never wrongly deleted or shared, checkpoints that are never NaN, lost or
silently unreadable, config values checked at load, and weight files that fail with one clear error."""
from __future__ import annotations

import errno
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_net
from torch import nn

import kdforge
from kdforge.config import ConfigError, DataConfig, RunConfig, TrainConfig, load_config, save_config
from kdforge.engine.checkpoint import (
    CheckpointReadError,
    DiskFullError,
    NonFiniteStateError,
    assert_finite_state,
    atomic_save,
    load_checkpoint,
    load_checkpoint_with_fallback,
    save_checkpoint,
)
from kdforge.engine.run_folder import (
    LOCK,
    MARKER,
    ResumeConfigError,
    RunFolderError,
    RunFolderExistsError,
    RunFolderLockedError,
    diff_configs,
    open_run_folder,
)
from kdforge.models import load_weights


def _open(out_dir, name="run", *, resume=False, overwrite=False, config=None):
    return open_run_folder(out_dir, name, resume=resume, overwrite=overwrite, config=config)


def _make_run(out_dir: Path, name: str = "run", *, checkpoint: bool = True) -> Path:
    """A run folder as a finished kdforge run leaves it (created through open_run_folder, so marked)."""
    with _open(out_dir, name) as run:
        save_config(RunConfig(name=name), run.path / "config.yaml")
        for f in ("metrics.jsonl", "report.md", "summary.json", "teacher_metrics.json", "curves.png"):
            (run.path / f).write_text("x")
        (run.path / "tb").mkdir()
        (run.path / "tb" / "events.out.tfevents.1.host").write_text("x")
        if checkpoint:
            atomic_save({"w": torch.ones(2)}, run.last_checkpoint)
        return run.path


# ------------------------------------------------------------------------------------------ run folder: names
@pytest.mark.parametrize("name", [".", "..", "", "  ", "a/b", "/abs", "..\\x"])
def test_run_name_must_be_a_plain_folder_name(tmp_path, name):
    with pytest.raises(ConfigError, match="not a plain folder name"):
        _open(tmp_path, name, overwrite=True)
    with pytest.raises(ConfigError, match="name"):  # and the recipe fails when it loads
        load_config(None, [f"name={name}"] if name.strip() else ["name=''"])


def test_overwrite_never_deletes_the_working_directory(tmp_path, monkeypatch):
    """The reported defect: `--set out_dir=. --set name=. --overwrite` wiped the working directory."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text("precious")
    monkeypatch.chdir(work)
    with pytest.raises(ConfigError):
        _open(".", ".", overwrite=True)
    with pytest.raises(RunFolderExistsError, match="not a kdforge run folder"):  # the same folder by its name
        _open("..", "work", overwrite=True)
    # even a folder that looks like a kdforge run is not emptied while it is the working directory
    (work / "data.txt").unlink()
    (work / MARKER).write_text("")
    (work / "config.yaml").write_text("name: work\n")
    with pytest.raises(RunFolderError, match="working directory"):
        _open("..", "work", overwrite=True)
    assert (work / "config.yaml").exists()


def test_overwrite_refuses_a_folder_kdforge_did_not_create(tmp_path):
    data = tmp_path / "mydata"
    data.mkdir()
    (data / "images").mkdir()
    (data / "labels.csv").write_text("1,2\n")
    with pytest.raises(RunFolderExistsError) as e:
        _open(tmp_path, "mydata", overwrite=True)
    assert str(data) in str(e.value) and "images" in str(e.value) and "labels.csv" in str(e.value)
    assert sorted(os.listdir(data)) == ["images", "labels.csv"]  # nothing written, nothing deleted


def test_overwrite_refuses_a_kdforge_run_holding_other_files(tmp_path):
    run = _make_run(tmp_path)
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "best_by_hand.npy").write_text("mine")
    with pytest.raises(RunFolderExistsError) as e:
        _open(tmp_path, overwrite=True)
    assert str(run) in str(e.value) and "notes.txt" in str(e.value) and "checkpoints/best_by_hand.npy" in str(e.value)
    assert (run / "notes.txt").exists() and (run / "checkpoints" / "last.pt").exists()


def test_overwrite_replaces_a_kdforge_run(tmp_path):
    run = _make_run(tmp_path)
    with _open(tmp_path, overwrite=True) as again:
        assert again.path == run
        assert sorted(os.listdir(run)) == sorted([MARKER, LOCK])


def test_overwrite_of_an_unmarked_old_run_says_to_delete_it_by_hand(tmp_path):
    run = _make_run(tmp_path)
    (run / MARKER).unlink()  # as a kdforge from before the markers left it
    with pytest.raises(RunFolderExistsError, match="--resume.*delete this one yourself"):
        _open(tmp_path, overwrite=True)
    assert (run / "checkpoints" / "last.pt").exists()
    with _open(tmp_path, resume=True):  # resuming it works, and adopts it
        assert (run / MARKER).exists()


# ------------------------------------------------------------------------------------------ run folder: fresh starts
def test_fresh_start_refuses_a_folder_holding_a_run(tmp_path):
    run = _make_run(tmp_path)
    with pytest.raises(RunFolderExistsError) as e:
        _open(tmp_path)
    msg = str(e.value)
    assert str(run) in msg and "--resume" in msg and "--overwrite" in msg and "--set name=" in msg


def test_fresh_start_refuses_a_foreign_folder_but_takes_an_empty_one(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "paper.pdf").write_text("x")
    with pytest.raises(RunFolderExistsError, match=r"foreign.*paper\.pdf"):
        _open(tmp_path, "foreign")
    assert os.listdir(tmp_path / "foreign") == ["paper.pdf"]
    (tmp_path / "empty").mkdir()
    with _open(tmp_path, "empty") as run:
        assert (run.path / MARKER).is_file()


def test_fresh_start_removes_the_stale_files_of_a_failed_attempt(tmp_path):
    """A run killed before its first checkpoint must not hand its teacher metrics or log to the next one."""
    run = _make_run(tmp_path, checkpoint=False)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".last.pt.abc123.tmp").write_bytes(b"half")
    (run / "notes.txt").write_text("mine")
    with _open(tmp_path):
        left = sorted(os.listdir(run))
    assert left == sorted([MARKER, LOCK, "notes.txt"])  # only kdforge's own files were removed


def test_killed_writes_are_removed_on_resume(tmp_path):
    run = _make_run(tmp_path)
    (run / "checkpoints" / ".last.pt.k1ll3d.tmp").write_bytes(b"half")
    with _open(tmp_path, resume=True):
        assert sorted(os.listdir(run / "checkpoints")) == ["last.pt"]
        assert (run / "metrics.jsonl").exists()  # a resumed run keeps its log


def test_resume_needs_a_checkpoint_and_not_both_flags(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        _open(tmp_path, resume=True)
    with pytest.raises(ConfigError, match="not both"):
        _open(tmp_path, resume=True, overwrite=True)


# ------------------------------------------------------------------------------------------ run folder: paths
def test_run_folder_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(RunFolderError, match="not a directory"):
        _open(tmp_path)
    with pytest.raises(RunFolderError, match="not a directory"):
        _open(tmp_path / "run", "sub")  # out_dir is the file
    with pytest.raises(RunFolderError):
        _open(tmp_path / "run" / "deeper", "sub")  # a file on the way
    assert (tmp_path / "run").read_text() == "x"


def test_unwritable_run_folder_is_a_clear_error(tmp_path, monkeypatch):
    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(RunFolderError, match=r"cannot use run folder .*run.*read-only"):
        _open(tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file modes")
def test_read_only_out_dir_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(RunFolderError, match="read-only"):
            _open(ro)
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------------------------------ run folder: lock
_HOLDER = textwrap.dedent("""
    import sys
    from kdforge.engine.run_folder import open_run_folder
    run = open_run_folder(sys.argv[1], "run", resume=False, overwrite=False)
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test kills us or closes stdin
""")


def test_a_second_run_into_a_locked_folder_fails_naming_the_holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderLockedError) as e:
            _open(tmp_path)
        assert f"pid {proc.pid}" in str(e.value) and socket.gethostname() in str(e.value)
        with pytest.raises(RunFolderLockedError):
            _open(tmp_path, overwrite=True)  # nor may it be replaced under the running process
    finally:
        proc.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        proc.wait(timeout=30)
    with _open(tmp_path) as run:  # free again
        assert run.path == tmp_path / "run"


def test_lock_is_held_within_one_process_until_closed(tmp_path):
    first = _open(tmp_path)
    with pytest.raises(RunFolderLockedError, match=f"pid {os.getpid()}"):
        _open(tmp_path)
    first.close()
    first.close()  # idempotent
    _open(tmp_path).close()


# ------------------------------------------------------------------------------------------ run folder: resume config
def test_resume_refuses_a_changed_config_listing_each_key(tmp_path):
    cfg = load_config(None, ["method.temperature=4", "train.lr=0.05"])
    run = _make_run(tmp_path)
    save_config(cfg, run / "config.yaml")
    changed = load_config(None, ["method.temperature=2", "train.lr=0.1", "train.optimizer=adam"])
    with pytest.raises(ResumeConfigError) as e:
        _open(tmp_path, resume=True, config=changed.to_dict())
    msg = str(e.value)
    assert "method.temperature: 4 -> 2" in msg and "train.lr: 0.05 -> 0.1" in msg
    assert 'train.optimizer: "sgd" -> "adam"' in msg and "--set name=" in msg
    assert isinstance(e.value, ValueError)


def test_resume_accepts_changes_to_safe_keys(tmp_path):
    run = _make_run(tmp_path)
    cfg = load_config(None, ["train.epochs=2", "train.max_steps=3"])
    save_config(cfg, run / "config.yaml")
    more = load_config(None, ["train.epochs=5", "train.progress=false", "train.log_every=7", "train.device=cpu",
                              "train.eval_every=2", "train.checkpoint_every=9", "train.max_steps=null"])
    with _open(tmp_path, resume=True, config=more.to_dict()) as folder:
        folder.check_resume_config(more.to_dict())


def test_diff_configs_reports_added_and_removed_keys():
    old = {"student": {"name": "resnet20", "num_classes": 10}, "teacher": None, "train": {"milestones": [1, 2]}}
    new = {"student": {"name": "resnet20"}, "teacher": {"name": "resnet56"}, "train": {"milestones": (1.0, 2.0)}}
    assert diff_configs(old, new) == ['student.num_classes: 10 -> (absent)', 'teacher: null -> (absent)',
                                      'teacher.name: (absent) -> "resnet56"']


# ------------------------------------------------------------------------------------------ checkpoints: finiteness
def test_assert_finite_state_names_the_first_bad_tensor():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert_finite_state(net, "the student")
    with torch.no_grad():
        net[0].weight[0, :3] = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"parameter '0\.weight' of the student has 3 NaN values"):
        assert_finite_state(net, "the student")
    net[0].weight.data.zero_()
    net[1].running_var[1] = float("inf")
    with pytest.raises(FloatingPointError, match=r"buffer '1\.running_var' of the student has 1 Inf value$"):
        assert_finite_state(net, "the student")
    moments = {"state": {0: {"exp_avg": torch.tensor([1.0, -np.inf])}}}
    nested = {"model": {"w": torch.ones(2)}, "optimizers": {"main": moments}, "rng": torch.zeros(8, dtype=torch.uint8),
              "step": 3}
    with pytest.raises(NonFiniteStateError, match=r"tensor 'optimizers\.main\.state\.0\.exp_avg' of the checkpoint"):
        assert_finite_state(nested, "the checkpoint")


def test_save_checkpoint_refuses_nan_and_keeps_the_last_good_one(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()
    nan_message = r"'model\.w' of the checkpoint has 1 NaN value; .*last\.pt was not written"
    with pytest.raises(NonFiniteStateError, match=nan_message):
        save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan"), 2.0])}}, path)
    assert path.read_bytes() == good and sorted(os.listdir(path.parent)) == ["last.pt"]


# ------------------------------------------------------------------------------------------ checkpoints: previous.pt
def test_save_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)
    save_checkpoint({"step": torch.tensor(2)}, path)
    save_checkpoint({"step": torch.tensor(3)}, path)
    assert int(load_checkpoint(path)["step"]) == 3
    assert int(load_checkpoint(tmp_path / "previous.pt")["step"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "previous.pt"]


def test_load_falls_back_to_the_previous_checkpoint_saying_so(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)
    save_checkpoint({"step": torch.tensor(2)}, path)
    path.write_bytes(path.read_bytes()[:100])  # cut by a crash of the disk, say
    with pytest.warns(UserWarning) as w:
        ckpt = load_checkpoint_with_fallback(path)
    assert int(ckpt["step"]) == 1
    msg = str(w[0].message)
    assert str(path) in msg and str(tmp_path / "previous.pt") in msg
    path.unlink()  # a kill between the two renames of a filesystem without hard links
    with pytest.warns(UserWarning, match="missing"):
        assert int(load_checkpoint_with_fallback(path)["step"]) == 1
    (tmp_path / "previous.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointReadError, match="last.pt; the previous checkpoint is unreadable too: .*previous.pt"):
        load_checkpoint_with_fallback(path)
    path.write_bytes(b"junk")
    with pytest.raises(CheckpointReadError, match="previous checkpoint is unreadable too"):
        load_checkpoint_with_fallback(path)


def test_load_without_a_previous_checkpoint_raises_for_last(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"junk")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointReadError, match="last.pt"):
            load_checkpoint_with_fallback(path)


# ------------------------------------------------------------------------------------------ checkpoints: full disk
@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0; "
                 "PytorchStreamWriter failed writing file data/0: file write failed"),
])
def test_full_disk_says_no_space_left(tmp_path, monkeypatch, failure):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"w": torch.arange(4.0)}, path)
    good = path.read_bytes()

    def full(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")
        raise failure

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError) as e:
        save_checkpoint({"w": torch.zeros(4)}, path)
    assert f"no space left on {path.parent}" in str(e.value) and "MiB free" in str(e.value)
    assert isinstance(e.value, OSError) and isinstance(e.value, RuntimeError) and e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == good and sorted(os.listdir(path.parent)) == ["last.pt"]


# ------------------------------------------------------------------------------------------ checkpoints: bad files
def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(1000.0)}, good)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(1000.0)}, legacy, _use_new_zipfile_serialization=False)
    files = {"truncated": good.read_bytes()[:300], "garbage": b"hello, not a checkpoint " * 20, "empty": b"",
             "legacy_truncated": legacy.read_bytes()[: legacy.stat().st_size // 2],
             "plain_pickle": pickle.dumps({"a": [1, 2]}, protocol=4)}
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / f"{name}.pt"
        out[name].write_bytes(data)
    return out


def _assert_one_clear_error(err: BaseException, path: Path) -> None:
    msg = str(err)
    assert str(path) in msg and "weights_only" not in msg and "\n" not in msg
    # torch's own error (with its advice) is not shown in a traceback either
    assert err.__cause__ is None and (err.__suppress_context__ or err.__context__ is None)


def test_bad_checkpoint_files_name_the_path_without_torch_advice(tmp_path):
    for path in _bad_files(tmp_path).values():
        with pytest.raises(CheckpointReadError) as e:
            load_checkpoint(path)
        _assert_one_clear_error(e.value, path)
        assert isinstance(e.value, RuntimeError) and isinstance(e.value, ValueError)
    assert "truncated" in str(pytest.raises(RuntimeError, load_checkpoint, tmp_path / "truncated.pt").value)
    assert "empty" in str(pytest.raises(RuntimeError, load_checkpoint, tmp_path / "empty.pt").value)


def test_checkpoint_gets_the_mode_of_the_runs_other_files(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save({"w": torch.ones(1)}, tmp_path / "last.pt")
        (tmp_path / "metrics.jsonl").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == (tmp_path / "metrics.jsonl").stat().st_mode & 0o777


# ------------------------------------------------------------------------------------------ teacher weights
class _Payload:
    """Unpickling this would create a folder: proof that a payload ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def test_unsafe_weights_are_refused_without_running_the_payload(tmp_path):
    pwned = tmp_path / "pwned"
    path = tmp_path / "teacher.pt"
    torch.save({"state_dict": tiny_net().state_dict(), "extra": _Payload(pwned)}, path)
    with pytest.raises(ValueError) as e:
        load_weights(tiny_net(), path)
    _assert_one_clear_error(e.value, path)
    assert "mkdir" in str(e.value) and "state_dict()" in str(e.value)
    assert not pwned.exists()
    raw = tmp_path / "raw.pkl"  # a bare pickle with a payload, not written by torch
    raw.write_bytes(pickle.dumps(_Payload(pwned)))
    with pytest.raises(CheckpointReadError) as e:
        load_weights(tiny_net(), raw)
    _assert_one_clear_error(e.value, raw)
    assert not pwned.exists()


def test_corrupt_or_truncated_weights_give_one_clear_error(tmp_path):
    for path in _bad_files(tmp_path).values():
        with pytest.raises(ValueError) as e:
            load_weights(tiny_net(), path)
        _assert_one_clear_error(e.value, path)
        assert not isinstance(e.value, pickle.UnpicklingError)


# ------------------------------------------------------------------------------------------ config ranges
@pytest.mark.parametrize("override, fragment", [
    ("train.grad_clip=-1", "train.grad_clip: must be a number > 0 or null, got -1.0"),
    ("train.grad_clip=0", "train.grad_clip: must be a number > 0 or null"),
    ("train.epochs=0", "train.epochs: must be an integer >= 1, got 0"),
    ("train.lr=0", "train.lr: must be a number > 0"),
    ("train.lr=-0.1", "train.lr: must be a number > 0"),
    ("train.max_steps=0", "train.max_steps: must be an integer >= 1 or null"),
    ("train.momentum=1.5", "train.momentum: must be a number in [0, 1]"),
    ("train.weight_decay=-1e-4", "train.weight_decay: must be a number >= 0"),
    ("train.warmup_epochs=-1", "train.warmup_epochs: must be a number >= 0"),
    ("train.eval_every=0", "train.eval_every: must be an integer >= 1"),
    ("train.log_every=-1", "train.log_every: must be an integer >= 0"),
    ("train.checkpoint_every=0", "train.checkpoint_every: must be an integer >= 1 or null"),
    ("train.gamma=0", "train.gamma: must be a number > 0"),
    ("train.min_lr=-1", "train.min_lr: must be a number >= 0"),
    ("train.plateau_patience=-2", "train.plateau_patience: must be an integer >= 0"),
    ("train.betas=[0.9, 1.0]", "train.betas: every value must be a number >= 0 and < 1"),
    ("train.betas=[0.9]", "train.betas: expected 2 numbers"),
    ("train.milestones=[-1]", "train.milestones: every value must be a number >= 0"),
    ("train.precision=8", "train.precision: unknown precision '8'"),
    ("train.precision=fp8", "did you mean"),
    ("train.optimizer=adamm", "train.optimizer: unknown optimizer 'adamm'; did you mean 'adam'"),
    ("train.schedule=cosin", "train.schedule: unknown schedule 'cosin'"),
    ("train.device=gpu", "train.device: unknown device 'gpu'"),
    ("train.nesterov=true", "Nesterov momentum needs train.momentum > 0"),
    ("data.batch_size=0", "data.batch_size: must be an integer >= 1"),
    ("data.eval_batch_size=-8", "data.eval_batch_size: must be an integer >= 1"),
    ("data.train_subset=0", "data.train_subset: must be an integer >= 1 or null"),
    ("data.val_subset=0", "data.val_subset: must be an integer >= 1 or null"),
    ("data.crop_pad=-1", "data.crop_pad: must be an integer >= 0"),
    ("data.resize=0", "data.resize: must be an integer >= 1 or null"),
    ("data.std=[0.2, 0.0, 0.2]", "data.std: every value must be a number > 0"),
    ("data.mean=[0.5]", "need one value per channel"),
    ("data.synthetic_train=0", "data.synthetic_train: must be an integer >= 1"),
])
def test_out_of_range_settings_fail_at_load_naming_key_and_range(override, fragment):
    extra = ["train.momentum=0"] if "nesterov" in override else []
    with pytest.raises(ConfigError) as e:
        load_config(None, [override, *extra])
    assert fragment in str(e.value)


def test_edge_values_that_are_allowed():
    cfg = load_config(None, ["train.grad_clip=null", "train.max_steps=null", "train.log_every=0", "train.momentum=0",
                             "train.momentum=1", "train.warmup_epochs=0.5", "train.precision=bf16", "train.lr=1e-3",
                             "train.optimizer=AdamW", "train.device=cuda:1", "data.crop_pad=0", "data.resize=null"])
    assert cfg.train.grad_clip is None and cfg.train.log_every == 0 and cfg.train.precision == "bf16"
    for p in ("32", "fp32", "bf16", "16", "fp16"):
        assert TrainConfig(precision=p).precision == p
    assert TrainConfig(precision=16).precision == "16"  # as YAML or Python may give it


def test_python_built_configs_are_checked_too(plain_loader):
    with pytest.raises(ConfigError, match="train.epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="train.grad_clip"):
        kdforge.distill(tiny_net(1), tiny_net(2), plain_loader, method="kd", grad_clip=-1.0, progress=False)
    with pytest.raises(ConfigError, match="train.epochs"):
        kdforge.distill(tiny_net(1), tiny_net(2), plain_loader, method="kd", epochs=0, progress=False)
    with pytest.raises(ConfigError, match="data.batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ConfigError, match="train.lr: must be a number"):
        TrainConfig(lr="0.1")
    cfg = TrainConfig(lr=np.float32(0.5), epochs=np.int64(3), betas=[0.8, 0.9])
    assert type(cfg.lr) is float and type(cfg.epochs) is int and cfg.betas == (0.8, 0.9)
    yaml.safe_dump(RunConfig(train=cfg).to_dict())  # numpy scalars would make safe_dump fail


# ------------------------------------------------------------------------------------------ recipe files
def test_malformed_yaml_is_one_line_naming_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntrain: {epochs: 2\nstudent: resnet20\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:") and "invalid YAML" in msg and "\n" not in msg
    line = int(msg[len(str(path)) + 1:].split(":")[0])
    assert line in (2, 3, 4)
    path.write_text("name: x\n  bad: indent\n")
    with pytest.raises(ConfigError, match=rf"{path}:2:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set train.milestones=\[1, 2:1:\d+: invalid YAML"):
        load_config(None, ["train.milestones=[1, 2"])


def test_empty_recipe_says_so(tmp_path):
    for text in ("", "# only a comment\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert str(path) in str(e.value) and "empty" in str(e.value) and "HintonKD" not in str(e.value)


def test_error_classes_are_ones_the_cli_prints_as_one_line():
    handled = (FileNotFoundError, FileExistsError, ValueError, RuntimeError, FloatingPointError)
    for cls in (RunFolderError, RunFolderExistsError, RunFolderLockedError, ResumeConfigError, CheckpointReadError,
                DiskFullError, NonFiniteStateError, ConfigError):
        assert issubclass(cls, handled), cls
