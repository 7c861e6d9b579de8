"""Every registered method on tiny models; models from torchvision and from user code; errors that name the
offending layer; the feature taps and the teacher cache the methods are built on."""
from __future__ import annotations

import inspect
import re
import sys
import textwrap

import pytest
import torch
from conftest import BATCH, assert_states_equal, state_copy, tiny_net
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kdforge
from kdforge.api import build_distiller
from kdforge.config import ConfigError, TrainConfig, load_config
from kdforge.data.loader import BatchLoader
from kdforge.data.synthetic import make_synthetic
from kdforge.distillers.base import Distiller, FeatureTaps, TeacherCache
from kdforge.distillers.fitnet import FitNet
from kdforge.engine.logging import read_metrics
from kdforge.losses import hint_mse, kd_div, vid_loss
from kdforge.registry import DISTILLERS, MODELS, RegistryError

pytestmark = pytest.mark.usefixtures("single_thread")

#: The loss terms each method returns in its first steps (FitNet: its hint stage). A new method must add
#: itself here: the test below fails for a registered name without an entry.
EXPECTED_LOSSES = {
    "ad": {"ce", "adv"},
    "at": {"ce", "at"},
    "crd": {"ce", "crd"},
    "dafl": {"oh", "activation", "balance", "kd"},
    "dfad": {"mae", "adv"},
    "fitnet": {"hint"},
    "kd": {"ce", "kd"},
    "mfd": {"ce", "mfd"},
    "mosaic": {"disc", "adv", "align", "local", "balance", "kd"},
    "nst": {"ce", "nst"},
    "pkt": {"ce", "pkt"},
    "rkd": {"ce", "rkd_dist", "rkd_angle"},
    "scratch": {"ce"},
    "vid": {"ce", "vid"},
}
LOG_KEYS = {"kind", "step", "epoch", "lr", "loss"}
FAST = dict(device="cpu", progress=False, log_every=1, lr=0.05)


def _teacher_for(name: str):
    """MFD compares features directly, so its teacher has the student's width (as in the paper: same net)."""
    return tiny_net(2, width=4) if name == "mfd" else tiny_net(2)


def _two_steps(name: str, loader, run_dir):
    epochs = 2 if name == "fitnet" else 1  # two-stage FitNet needs an epoch per stage
    teacher = _teacher_for(name)
    return kdforge.distill(tiny_net(1, width=4), teacher, loader, method=name, epochs=epochs, max_steps=2,
                           run_dir=run_dir, **FAST), teacher


# the methods over image generators (GAN training, generator distillation) take generators, not these classifiers:
# tests/test_gan_kd.py and tests/test_gan_training.py hold the same checks for them
CLASSIFIER_METHODS = [n for n in DISTILLERS.names() if DISTILLERS.get(n).model_kind == "classifier"]


@pytest.mark.parametrize("name", CLASSIFIER_METHODS)
def test_every_method_trains_the_student_only(name, aug_loader, tmp_path):
    assert name in EXPECTED_LOSSES, f"add the loss names of method {name!r} to EXPECTED_LOSSES"
    student0, teacher0 = state_copy(tiny_net(1, width=4)), state_copy(_teacher_for(name))
    result, teacher = _two_steps(name, aug_loader, tmp_path / "a")

    after = state_copy(result.student)
    changed = [k for k, v in result.student.named_parameters() if not torch.equal(v, student0[k])]
    assert changed, f"{name}: no student parameter changed"
    assert_states_equal(teacher0, state_copy(teacher))  # weights and BN statistics
    if DISTILLERS.get(name).needs_teacher:  # (scratch ignores the teacher it is given)
        assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training

    steps = [r for r in read_metrics(tmp_path / "a") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert {k for k in set(r) - LOG_KEYS if not k.startswith("lr_")} == EXPECTED_LOSSES[name]
        assert all(isinstance(r[k], float) and r[k] == r[k] for k in EXPECTED_LOSSES[name])  # finite, not NaN

    again, _ = _two_steps(name, aug_loader, tmp_path / "b")  # same seed: the same run, extra modules included
    assert_states_equal(state_copy(result.distiller), state_copy(again.distiller))
    assert_states_equal(after, state_copy(again.student))


def test_fitnet_loss_terms_per_stage(aug_loader):
    batch = aug_loader.get_batch(0)
    two = FitNet(tiny_net(1, width=4), tiny_net(2), input_shape=(3, 16, 16))
    assert [s.name for s in two.stages(4)] == ["hint", "kd"] and [s.epochs for s in two.stages(4)] == [2, 2]
    two.set_stage("hint")
    assert set(two.training_step(batch)) == {"hint"}
    two.set_stage("kd")
    assert set(two.training_step(batch)) == {"ce", "kd"}
    assert "regressor" not in two.trainable_modules()
    one = FitNet(tiny_net(1, width=4), tiny_net(2), two_stage=False, input_shape=(3, 16, 16))
    assert [s.name for s in one.stages(4)] == ["main"] and set(one.training_step(batch)) == {"ce", "hint"}
    with pytest.raises(ValueError, match="hint_epochs=0.5 leaves no epochs"):
        two.stages(1)


def test_kd_loss_is_the_weighted_sum_of_its_terms(aug_loader):
    """ce_weight * CE + kd_weight * T^2 KL, both additive: each term scales with its own weight only."""
    batch = aug_loader.get_batch(0)
    d = DISTILLERS.get("kd")(tiny_net(1, width=4), tiny_net(2), ce_weight=0.3, kd_weight=2.0, temperature=2.0)
    out = d.training_step(batch)
    t_logits, _ = d.run_teacher(batch)
    s_logits, _ = d.run_student(batch["image"])
    torch.testing.assert_close(out["ce"], 0.3 * torch.nn.functional.cross_entropy(s_logits, batch["label"]))
    torch.testing.assert_close(out["kd"], 2.0 * kd_div(s_logits, t_logits, 2.0))
    with pytest.raises(ValueError, match="temperature > 0"):
        DISTILLERS.get("kd")(tiny_net(1), tiny_net(2), temperature=0)
    with pytest.raises(ValueError, match=r"kd_weight=-1\.0"):
        DISTILLERS.get("kd")(tiny_net(1), tiny_net(2), kd_weight=-1.0)


def _stage_outputs(name: str, loader, batch, **options) -> list[dict[str, torch.Tensor]]:
    """The loss dict of one step in each of the method's stages (FitNet: hint, then KD), built afresh."""
    torch.manual_seed(0)  # regressors and embedders are initialised from the global RNG
    d = build_distiller(name, tiny_net(1, width=4), _teacher_for(name), loader, **options)
    outs = []
    for stage in d.stages(4):
        d.set_stage(stage.name)
        # games step their own optimisers inside the step (AD's adversary), as a Trainer would set them up
        d.optimizers = {k: v[0] if isinstance(v, tuple) else v
                        for k, v in d.configure_optimizers(stage.name, TrainConfig(), 1).items()}
        torch.manual_seed(1)  # CRD draws its negatives from the global RNG
        outs.append({k: v.detach() for k, v in d.training_step(batch).items()})
    return outs


# Games step their networks in turn inside one training step, so a weight changes every later term through the
# updated networks; their weights are checked on their pure loss functions instead (tests/test_mosaic.py).
# (DFAD's student steps change the networks its generator's term sees; DAFL computes every term before it steps
# anything, so it is checked here.)
GAMES = {"mosaic", "dfad"}
WEIGHT_CASES = [(name, {}) for name in CLASSIFIER_METHODS if name not in GAMES] + [("fitnet", {"two_stage": False})]


@pytest.mark.parametrize("name, extra", WEIGHT_CASES, ids=[n + ("_one_stage" if e else "") for n, e in WEIGHT_CASES])
def test_every_loss_term_is_weighed_by_its_own_option(name, extra, aug_loader):
    """Term X of training_step (as logged in metrics.jsonl) is weighed by option X_weight, additively: scaling
    X_weight scales X and nothing else, 0 removes X, and every *_weight option weighs a term of that name."""
    params = inspect.signature(DISTILLERS.get(name).__init__).parameters
    assert not {"alpha", "beta"} & set(params), f"{name}: weights are named for what they weigh"
    batch = aug_loader.get_batch(0)
    base = _stage_outputs(name, aug_loader, batch, **extra)
    for key in set().union(*base):
        option = f"{key}_weight"
        assert option in params, f"{name}: loss term {key!r} has no {option!r} option"
        one = _stage_outputs(name, aug_loader, batch, **extra, **{option: 1.0})
        three = _stage_outputs(name, aug_loader, batch, **extra, **{option: 3.0})
        for o1, o3 in zip(one, three):
            assert set(o1) == set(o3)
            for k in o1:
                torch.testing.assert_close(o3[k], 3.0 * o1[k] if k == key else o1[k])
        if any(set(o) == {key} for o in base):  # the only term of a stage: weight 0 would train nothing
            with pytest.raises(ValueError, match=f"{option}=0"):
                _stage_outputs(name, aug_loader, batch, **extra, **{option: 0.0})
            continue
        zero = _stage_outputs(name, aug_loader, batch, **extra, **{option: 0.0})
        for o0, o1 in zip(zero, one):
            assert key not in o0 or float(o0[key]) == 0.0
            for k in set(o1) - {key}:
                torch.testing.assert_close(o0[k], o1[k])
    for option in (p for p in params if p.endswith("_weight")):
        on = _stage_outputs(name, aug_loader, batch, **extra, **{option: 2.0})
        assert option.removesuffix("_weight") in set().union(*on), f"{name}: {option} weighs no loss term"


@pytest.mark.parametrize("name, old", [("kd", "alpha"), ("at", "beta"), ("fitnet", "alpha"), ("pkt", "beta"),
                                       ("rkd", "w_dist")])
def test_old_weight_names_fail_naming_the_option(name, old, aug_loader):
    with pytest.raises(ConfigError, match=f"unknown option '{old}' for method '{name}'"):
        kdforge.distill(tiny_net(1), tiny_net(2), aug_loader, method=name, max_steps=1, **FAST, **{old: 0.5})


def test_one_stage_fitnet_takes_every_weight_from_a_recipe(aug_loader):
    """CE, KD and hint terms of one-stage FitNet, each with its own weight, all settable from a recipe."""
    cfg = load_config(None, base={"method": {"name": "fitnet", "two_stage": False, "ce_weight": 0.5,
                                             "kd_weight": 0.25, "hint_weight": 10.0, "temperature": 2.0}})
    d = build_distiller("fitnet", tiny_net(1, width=4), tiny_net(2), aug_loader, **cfg.method.kwargs)
    batch = aug_loader.get_batch(0)
    out = d.training_step(batch)
    t_logits, (t_feat,) = d.run_teacher(batch)
    s_logits, (s_feat,) = d.run_student(batch["image"])
    assert set(out) == {"ce", "kd", "hint"}
    torch.testing.assert_close(out["ce"], 0.5 * torch.nn.functional.cross_entropy(s_logits, batch["label"]))
    torch.testing.assert_close(out["kd"], 0.25 * kd_div(s_logits, t_logits, 2.0))
    torch.testing.assert_close(out["hint"], 10.0 * hint_mse(d.regressor(s_feat), t_feat))


def test_regressed_features_pool_the_larger_map_down(aug_loader):
    """FitNet and VID compare a regressed student map with a teacher map of another size by the one rule of
    kdforge.losses.features.match_spatial: the larger map is adaptive-average-pooled to the smaller."""
    batch = aug_loader.get_batch(0)
    layers = {"student_layer": "layer3", "teacher_layer": "layer2"}  # 4x4 student map, 8x8 teacher map
    fit = FitNet(tiny_net(1, width=4), tiny_net(2), two_stage=False, input_shape=(3, 16, 16), **layers)
    _, (t_feat,) = fit.run_teacher(batch)
    _, (s_feat,) = fit.run_student(batch["image"])
    pooled_t = torch.nn.functional.adaptive_avg_pool2d(t_feat, 4)
    torch.testing.assert_close(fit.hint(s_feat, t_feat), hint_mse(fit.regressor(s_feat), pooled_t))
    vid = DISTILLERS.get("vid")(tiny_net(1, width=4), tiny_net(2), student_layers=["layer3"],
                                teacher_layers=["layer2"], input_shape=(3, 16, 16), ce_weight=0.0, vid_weight=1.0)
    out = vid.training_step(batch)
    _, (s_feat,) = vid.run_student(batch["image"])
    pred = vid.predictors[0]
    torch.testing.assert_close(out["vid"], vid_loss(pred(s_feat), pooled_t, pred.log_scale, vid.eps))


# ------------------------------------------------------------------------------------------ external models
USER_MODULE = '''
from collections import OrderedDict
from torch import nn


def small_cnn(num_classes: int = 10, width: int = 8) -> nn.Module:
    """A user's own model: a plain Sequential, with its own module names (features, pool, fc)."""
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(3, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(),
                               nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU()),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(2 * width, num_classes)))
'''


@pytest.fixture
def user_factory(tmp_path, monkeypatch) -> str:
    (tmp_path / "kdf_user_models.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kdf_user_models", raising=False)
    return "kdf_user_models:small_cnn"


@pytest.fixture(scope="module")
def loader32():
    data = make_synthetic(32, 8, num_classes=10, size=32, seed=0)
    return BatchLoader(data["train"], BATCH, drop_last=True, seed=0, prefetch=0)


def _model(spec: str) -> nn.Module:
    torch.manual_seed(0)
    if spec == "shufflenet_v2":
        return MODELS.build("shufflenet_v2", num_classes=10, small_input=True)
    return MODELS.get(spec)(num_classes=10)


@pytest.mark.parametrize("method, teacher_spec, student_spec, layers", [
    ("kd", "torchvision:resnet18", "USER", {}),
    ("at", "USER", "torchvision:resnet18", {"teacher_layers": ["features"], "student_layers": ["layer2"]}),
    ("at", "torchvision:resnet18", "shufflenet_v2",
     {"teacher_layers": ["layer2"], "student_layers": ["stage2"]}),
    ("kd", "USER", "shufflenet_v2", {}),
])
def test_models_by_name_and_by_import_path(method, teacher_spec, student_spec, layers, user_factory,
                                           loader32):
    teacher = _model(user_factory if teacher_spec == "USER" else teacher_spec)
    student = _model(user_factory if student_spec == "USER" else student_spec)
    t0, s0 = state_copy(teacher), state_copy(student)
    r = kdforge.distill(student, teacher, loader32, method=method, max_steps=2, **FAST, **layers)
    assert r.student is student
    assert any(not torch.equal(v, s0[k]) for k, v in student.named_parameters())
    assert_states_equal(t0, state_copy(teacher))


def test_user_factory_typo_names_the_attribute(user_factory):
    with pytest.raises(RegistryError, match="has no attribute 'small_cn'.*did you mean 'small_cnn'"):
        MODELS.get("kdf_user_models:small_cn")


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_feature_module_names_it_and_suggests(aug_loader):
    with pytest.raises(KeyError) as e:
        kdforge.distill(tiny_net(1), tiny_net(2), aug_loader, method="at", student_layers=["layer9"],
                        teacher_layers=["layer3"], max_steps=1, **FAST)
    msg = str(e.value)
    assert "'layer9'" in msg and "student" in msg and re.search(r"did you mean 'layer[123]'", msg)
    assert not msg.startswith('"')  # read as a sentence, not as a quoted repr
    with pytest.raises(KeyError, match=r"'layer3\.9' in teacher.*did you mean 'layer3\.[0-9]'"):
        DISTILLERS.get("at")(tiny_net(1), tiny_net(2), student_layers=["layer3"], teacher_layers=["layer3.9"])


def test_fitnet_unmatched_feature_ranks_name_both_layers(aug_loader):
    with pytest.raises(ValueError) as e:
        kdforge.distill(tiny_net(1), tiny_net(2), aug_loader, method="fitnet", student_layer="linear:in",
                        teacher_layer="layer2", epochs=2, max_steps=1, **FAST)
    msg = str(e.value)
    assert "'linear:in'" in msg and "'layer2'" in msg and "ranks" in msg


def test_feature_layer_lists_must_pair_up():
    with pytest.raises(ValueError, match=r"\['layer1', 'layer2'\].*\['layer3'\]"):
        DISTILLERS.get("at")(tiny_net(1), tiny_net(2), student_layers=["layer1", "layer2"],
                             teacher_layers=["layer3"])


def test_vid_needs_feature_maps():
    with pytest.raises(ValueError, match="vid: feature 'linear:in' must be a 4-d map"):
        DISTILLERS.get("vid")(tiny_net(1), tiny_net(2), student_layers=["linear:in"],
                              teacher_layers=["linear:in"], input_shape=(3, 16, 16))


def test_crd_without_batch_indices_names_index(synth):
    d = synth["train"]
    x = torch.from_numpy(d.images).permute(0, 3, 1, 2).float() / 255.0
    loader = DataLoader(TensorDataset(x, torch.from_numpy(d.labels)), batch_size=BATCH)  # (image, label) only
    with pytest.raises(ValueError, match="index"):
        kdforge.distill(tiny_net(1), tiny_net(2), loader, method="crd", max_steps=1, **FAST)


def test_crd_needs_the_dataset_size():
    batches = [{"image": torch.zeros(4, 3, 16, 16), "label": torch.zeros(4, dtype=torch.long)}]
    with pytest.raises(ValueError, match="needs n_data"):
        kdforge.distill(tiny_net(1), tiny_net(2), batches, method="crd", **FAST)


def test_methods_with_a_teacher_refuse_none(aug_loader):
    with pytest.raises(ValueError, match="HintonKD needs a teacher model"):
        kdforge.distill(tiny_net(1), None, aug_loader, method="kd", **FAST)
    assert DISTILLERS.get("scratch")(tiny_net(1), tiny_net(2)).teacher is None  # scratch ignores a teacher


def test_input_shape_comes_from_the_batchloader(synth):
    """Extra modules are sized by probing the models with the loader's image size (16 px here): a model
    that only accepts 16 px inputs must work."""

    class Fixed16(nn.Module):  # no adaptive pooling: 32 px probes would fail in `linear`
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 2, 1)
            self.linear = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            return self.linear(self.conv(x).flatten(1))

    loader = BatchLoader(synth["train"], BATCH, drop_last=True, seed=0)
    torch.manual_seed(0)
    r = kdforge.distill(Fixed16(), Fixed16(), loader, method="vid", student_layers=["conv"],
                        teacher_layers=["conv"], max_steps=1, **FAST)
    assert r.distiller.predictors[0].net[0].in_channels == 4


# ------------------------------------------------------------------------------------------ taps and cache
def test_feature_taps_outputs_inputs_and_auto():
    net = tiny_net(0)
    taps = FeatureTaps(net, ["layer2", "linear:in", "auto:in", "layer3:out"])
    x = torch.randn(2, 3, 16, 16)
    net.eval()
    logits = net(x)
    l2, pooled, auto, l3 = taps.take()
    assert l2.shape == (2, 16, 8, 8) and l3.shape == (2, 32, 4, 4)
    assert pooled.shape == (2, 32) and torch.equal(pooled, auto)
    assert torch.allclose(net.linear(pooled), logits)  # `linear:in` is exactly what the head saw
    taps.remove()
    taps.outputs.clear()
    net(x)
    with pytest.raises(RuntimeError, match="'layer2' was not produced"):
        taps["layer2"]
    with pytest.raises(KeyError, match="'layer2:inside'"):
        FeatureTaps(net, ["layer2:inside"])
    with pytest.raises(ValueError, match="no nn.Linear head"):
        FeatureTaps(nn.Sequential(nn.Conv2d(3, 3, 1)), ["auto:in"])


def test_teacher_cache_stores_and_misses():
    cache = TeacherCache()
    assert cache.lookup(torch.tensor([0, 1])) is None
    cache.insert(torch.tensor([3, 1]), {"logits": torch.tensor([[3.0], [1.0]])})
    hit = cache.lookup(torch.tensor([1, 3]))
    assert hit is not None and hit["logits"].flatten().tolist() == [1.0, 3.0]
    assert cache.lookup(torch.tensor([1, 2])) is None  # index 2 never stored
    assert cache.lookup(torch.tensor([1, 50])) is None  # beyond what was stored
    cache.insert(torch.tensor([50]), {"logits": torch.tensor([[50.0]])})  # grows, keeps old entries
    assert cache.lookup(torch.tensor([50, 3]))["logits"].flatten().tolist() == [50.0, 3.0]


def test_distiller_train_keeps_teacher_in_eval():
    d = Distiller.__new__(Distiller)  # the base contract alone, without a method
    Distiller.__init__(d, tiny_net(1), tiny_net(2))
    d.teacher.train()
    d.train()
    assert d.training and d.student.training and not d.teacher.training
    assert "teacher" not in d.trainable_modules()
    assert not any(k.startswith("teacher.") for k in d.state_for_checkpoint())
