"""Every recipe of recipes/vem/ (GAN compression) and recipes/flow/ (flow distillation) runs two steps end to end on
generated data (fake UTKFace-named faces; synthetic images for the CIFAR-10 one), with random-weight stand-ins for
the files it names (teacher, style network, FID feature network and classifier), and reports what the issues ask:
FID named by its feature network, MACs of teacher and student, reconstruction of every encoder/decoder pairing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fake_utkface

from kdforge.cli import main
from kdforge.config import load_config
from kdforge.models import build_model
from kdforge.recipe import build_model_from_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted([*(ROOT / "recipes" / "vem").glob("*/*.yaml"), *(ROOT / "recipes" / "flow").glob("*/*.yaml")])


def _weights(tmp: Path, name: str, **kwargs) -> str:
    path = tmp / f"{name}_{'_'.join(f'{k}{v}' for k, v in kwargs.items())}.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(build_model(name, **kwargs).state_dict(), path)
    return str(path)


def _overrides(recipe: Path, tmp: Path, source: Path) -> list[str]:
    cfg = load_config(recipe)
    sets = [f"out_dir={tmp / 'runs'}", f"data.root={tmp / 'cache'}", "train.max_steps=2", "train.progress=false",
            "train.eval_every=1", "data.batch_size=4", "data.eval_batch_size=8"]
    if cfg.data.name == "cifar10":
        sets += ["data.name=synthetic", "data.source=null", "data.synthetic_train=16", "data.synthetic_test=8",
                 "data.synthetic_size=32"]
    else:
        sets += [f"data.source={source}", f"data.options={json.dumps({**cfg.data.options, 'test_size': 4})}"]
    for role in ("student", "teacher"):  # narrower generators and flows, same layout
        name = getattr(getattr(cfg, role), "name", "")
        if "generator" in name:
            sets.append(f"{role}.ngf=16")
        elif name == "glow":
            sets += [f"{role}.steps=2", f"{role}.hidden=16"]
        elif name == "flow_student":
            small = "width: 8, growth: 4, rdb_layers: 2"
            sets += [f"student.encoder={{steps: 1, levels: 3, {small}}}",
                     f"student.decoder={{steps: 1, levels: {cfg.student.kwargs['decoder']['levels']}, {small}}}"]
    cfg = load_config(recipe, sets)
    if cfg.teacher is not None:
        teacher = build_model_from_config(cfg.teacher, load=False)
        path = tmp / f"teacher_{recipe.parent.name}.pt"
        torch.save(teacher.state_dict(), path)
        sets.append(f"teacher.weights={path}")
    net = cfg.method.kwargs.get("feature_net")
    if net:
        sets.append(f"method.feature_net.weights={_weights(tmp, net['name'])}")
    for key in ("features", "classifier"):
        spec = cfg.eval.kwargs.get(key)
        if spec:
            sets.append(f"eval.{key}.weights={_weights(tmp, spec['name'], **spec.get('kwargs', {}))}")
    if cfg.eval.name == "generation":
        sets.append("eval.kid_subset_size=2")
    return sets


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_image_model_recipe_runs_two_steps(recipe, tmp_path):
    source = fake_utkface(tmp_path / "utk", n=12)
    sets = _overrides(recipe, tmp_path, source)
    verb = "train" if load_config(recipe).teacher is None else "distill"
    assert main([verb, str(recipe), *(a for s in sets for a in ("--set", s))]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["position"]["step"] == 2
    if summary["evaluator"] == "generation":
        assert summary["metrics"]["fid"] >= 0 and summary["metrics"]["fid_features"].startswith(("resnet", "Flatten"))
        report = (run / "report.md").read_text()
        assert "fid_features: `resnet" in report
    if summary["evaluator"] == "flow":
        assert summary["metrics"]["max_err_teacher"] < 1e-3 and "psnr_teacher" in summary["metrics"]
    if verb == "distill" and summary["evaluator"] == "generation":
        cost = summary["cost"]
        assert cost["student"]["macs"] < cost["teacher"]["macs"]  # the point of compressing a generator
        assert cost["student"]["params"] < cost["teacher"]["params"]
        assert "M MACs" in (run / "report.md").read_text()
