"""Recipes (kdforge.config) and the name registry: typos fail naming the key and the closest valid one."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tiny_net

import kdforge
from kdforge.config import (
    ConfigError,
    DataConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    check_kwargs,
    load_config,
    parse_override,
    save_config,
)
from kdforge.registry import MODELS, Registry, RegistryError


def _recipe(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


RECIPE = {
    "name": "tiny",
    "seed": 3,
    "data": {"name": "synthetic", "batch_size": 64, "mean": [0.5, 0.5, 0.5]},
    "teacher": {"name": "resnet56", "weights": "teacher.pt"},
    "student": "resnet20",
    "method": {"name": "kd", "temperature": 4, "kd_weight": 0.5},
    "train": {"epochs": 3, "lr": 0.1, "milestones": [1, 2], "schedule": "multistep"},
}


# ------------------------------------------------------------------------------------------- load
def test_load_config_reads_every_section(tmp_path):
    cfg = load_config(_recipe(tmp_path, RECIPE))
    assert cfg.name == "tiny" and cfg.seed == 3
    assert cfg.data == DataConfig(batch_size=64, mean=(0.5, 0.5, 0.5))
    assert cfg.teacher == ModelConfig(name="resnet56", weights="teacher.pt")
    assert cfg.student == ModelConfig(name="resnet20")  # `student: resnet20` shorthand
    assert cfg.method == MethodConfig(name="kd", kwargs={"temperature": 4, "kd_weight": 0.5})
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.1 and cfg.train.schedule == "multistep"
    assert cfg.train.milestones == (1.0, 2.0) and isinstance(cfg.train.milestones, tuple)
    assert cfg.train.momentum == TrainConfig().momentum  # untouched keys keep their defaults


def test_missing_recipe_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_recipe_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


# ------------------------------------------------------------------------------------------- --set
def test_overrides_replace_recipe_values(tmp_path):
    overrides = ["train.lr=0.2", "method.temperature=2", "student.name=resnet32"]
    cfg = load_config(_recipe(tmp_path, RECIPE), overrides)
    assert cfg.train.lr == 0.2
    assert cfg.method.kwargs == {"temperature": 2, "kd_weight": 0.5}
    assert cfg.student.name == "resnet32"  # the `student: resnet20` shorthand became a section


def test_overrides_create_missing_sections_and_nested_keys():
    cfg = load_config(None, ["train.epochs=7", "method.name=at", "method.student_layers=[layer1, layer2]",
                             "student.num_classes=100", "data.batch_size=32"])
    assert cfg.train.epochs == 7 and cfg.data.batch_size == 32
    assert cfg.method == MethodConfig(name="at", kwargs={"student_layers": ["layer1", "layer2"]})
    assert cfg.student.kwargs == {"num_classes": 100}


@pytest.mark.parametrize("text, key, value", [
    ("train.lr=0.1", "train.lr", 0.1),
    ("train.lr=1e-3", "train.lr", "1e-3"),  # YAML 1.1 reads this as a string; the config converts it
    ("train.max_steps=null", "train.max_steps", None),
    ("data.flip=false", "data.flip", False),
    ("train.milestones=[3, 6]", "train.milestones", [3, 6]),
    ("name=a=b", "name", "a=b"),  # only the first '=' splits
    ("name=", "name", ""),
])
def test_parse_override_reads_values_as_yaml(text, key, value):
    assert parse_override(text) == (key, value)


def test_yaml_typed_override_values_are_coerced():
    cfg = load_config(None, ["train.lr=1e-3", "train.max_steps=null", "data.flip=false",
                             "train.milestones=[3, 6]", "train.grad_clip=5", "train.epochs=4.0"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps is None and cfg.data.flip is False
    assert cfg.train.milestones == (3.0, 6.0)
    assert cfg.train.grad_clip == 5.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.train.epochs == 4 and isinstance(cfg.train.epochs, int)


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr"])


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        load_config(None, ["seed.x=1"], base={"seed": 1})


def test_overrides_do_not_modify_the_base_dict():
    base = {"train": {"lr": 0.1}}
    cfg = load_config(None, ["train.lr=0.3"], base=base)
    assert cfg.train.lr == 0.3
    assert base == {"train": {"lr": 0.1}}


# ------------------------------------------------------------------------------------------- errors
def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lrr=0.1"])
    msg = str(e.value)
    assert "'train.lrr'" in msg and "did you mean 'lr'" in msg


def test_unknown_top_level_section_suggests_the_real_one(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_recipe(tmp_path, {"trian": {"epochs": 1}}))
    assert "'trian'" in str(e.value) and "did you mean 'train'" in str(e.value)


def test_unknown_key_in_a_closed_section_of_a_recipe(tmp_path):
    with pytest.raises(ConfigError, match=r"'data\.bach_size'.*did you mean 'batch_size'"):
        load_config(_recipe(tmp_path, {"data": {"bach_size": 3}}))


@pytest.mark.parametrize("override, fragment", [
    ("train.epochs=abc", "train.epochs: expected a number, got 'abc'"),
    ("train.epochs=1.5", "train.epochs: expected an integer, got 1.5"),
    ("train.lr=true", "train.lr: expected a number"),
    ("data.flip=yes please", "data.flip: expected true/false"),
    ("train.epochs=null", "train.epochs: null is not allowed"),
    ("train.lr=nan", "train.lr: expected a number"),
    ("data=3", "data: expected a mapping"),
])
def test_wrong_types_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


# ------------------------------------------------------------------------------------------- open sections
def test_open_sections_put_extra_keys_into_kwargs(tmp_path):
    tree = {"student": {"name": "wrn_16_2", "num_classes": 100, "dropout": 0.1},
            "method": {"name": "crd", "feat_dim": 64, "kwargs": {"crd_weight": 0.5}}}
    cfg = load_config(_recipe(tmp_path, tree))
    assert cfg.student == ModelConfig(name="wrn_16_2", kwargs={"num_classes": 100, "dropout": 0.1})
    assert cfg.method == MethodConfig(name="crd", kwargs={"feat_dim": 64, "crd_weight": 0.5})


def test_to_dict_writes_kwargs_inline():
    cfg = load_config(None, ["method.temperature=2", "student.num_classes=5"])
    d = cfg.to_dict()
    assert d["method"] == {"name": "kd", "temperature": 2}
    assert d["student"]["num_classes"] == 5 and "kwargs" not in d["student"]
    assert d["teacher"] is None and d["train"]["betas"] == [0.9, 0.999]


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(_recipe(tmp_path, RECIPE), ["train.grad_clip=1.0", "student.num_classes=10",
                                                  "train.max_steps=5", "method.layers=[a, b]"])
    out = tmp_path / "saved" / "config.yaml"
    out.parent.mkdir()
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert isinstance(again, RunConfig) and again.data.mean == (0.5, 0.5, 0.5)
    # saving the default config round-trips too (teacher: null, every tuple)
    save_config(RunConfig(), out)
    assert load_config(out) == RunConfig()


# ------------------------------------------------------------------------------------------- kwargs checks
def test_check_kwargs_names_the_unknown_option_and_suggests():
    def factory(*, temperature: float = 4.0, alpha: float = 0.9):
        return None

    check_kwargs(factory, {"temperature": 2.0}, "method 'kd'")  # accepted: no error
    with pytest.raises(ConfigError) as e:
        check_kwargs(factory, {"temprature": 2.0}, "method 'kd'")
    assert "'temprature'" in str(e.value) and "did you mean 'temperature'" in str(e.value)


def test_check_kwargs_accepts_anything_with_var_keyword():
    def factory(num_classes: int = 10, **kw):
        return None

    check_kwargs(factory, {"anything": 1}, "model")


def test_distill_rejects_a_misspelt_method_option(plain_loader):
    with pytest.raises(ConfigError) as e:
        kdforge.distill(tiny_net(1), tiny_net(2), plain_loader, method="kd", temprature=2, max_steps=1,
                        progress=False)
    assert "'temprature'" in str(e.value) and "did you mean 'temperature'" in str(e.value)


def test_distill_suggests_training_options_too(plain_loader):
    # `epoch` is neither a TrainConfig field nor a kd option: the nearest of both is suggested
    with pytest.raises(ConfigError) as e:
        kdforge.distill(tiny_net(1), tiny_net(2), plain_loader, method="kd", epoch=2, progress=False)
    assert "'epoch'" in str(e.value) and "'epochs'" in str(e.value)


# ------------------------------------------------------------------------------------------- registry
def test_unknown_model_suggests_the_closest():
    with pytest.raises(RegistryError) as e:
        MODELS.get("resnet57")
    msg = str(e.value)
    assert "unknown model 'resnet57'" in msg and "did you mean 'resnet56'" in msg
    assert isinstance(e.value, KeyError)  # callers may catch KeyError


def test_unknown_distiller_in_recipe_suggests():
    with pytest.raises(RegistryError, match="did you mean 'fitnet'"):
        kdforge.DISTILLERS.get("fitnets")


def test_duplicate_registration_raises_but_reregistering_the_same_object_is_fine():
    reg = Registry("widget")

    @reg.register("a")
    def a():
        return 1

    reg.register("a")(a)  # a module imported twice registers the same object again
    assert reg.get("a") is a and reg.names() == ["a"] and len(reg) == 1 and "a" in reg

    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        @reg.register("a")
        def other():
            return 2

    assert reg.get("a") is a  # the first registration is kept


def test_registry_builds_and_lists():
    reg = Registry("thing")
    reg.register()(dict)  # the object's own name when none is given
    assert reg.build("dict", x=1) == {"x": 1}
    assert list(reg) == ["dict"]


def test_explicit_kwargs_must_be_a_mapping():
    with pytest.raises(ConfigError, match="method.kwargs: expected a mapping"):
        load_config(None, ["method.kwargs=3"])
