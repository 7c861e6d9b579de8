"""Tests for kdforge.models: every registered model, external resolution, weight loading."""

from __future__ import annotations

import inspect
import os
import sys
import tarfile
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdforge.models  # noqa: F401  (registers every model)
from kdforge.models import MODELS, build_model, load_weights
from kdforge.models.cifar_resnet import PadShortcut
from kdforge.registry import RegistryError

SHARED_DATA = Path(os.environ.get("KDFORGE_SHARED_DATA", Path(__file__).parents[2] / "shared/data"))
RESNET_DIR = SHARED_DATA / "cifar10-resnets"


def _build(name: str, **kw) -> nn.Module:
    """Build a registered model with 10 classes, using the 32px stem where the factory offers one."""
    if "small_input" in inspect.signature(MODELS.get(name)).parameters:
        kw.setdefault("small_input", True)
    return build_model(name, num_classes=10, **kw)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _out_shape(model: nn.Module, module_name: str, x: torch.Tensor) -> tuple[int, ...]:
    """Shape of a named submodule's output, taken with a forward hook as distillers do."""
    seen: dict[str, torch.Size] = {}
    handle = model.get_submodule(module_name).register_forward_hook(lambda m, i, o: seen.update(s=o.shape))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return tuple(seen["s"])


# ---------------------------------------------------------------- every registered model


# generators, discriminators and energy nets do not classify: their shapes and gradients are tested in
# tests/test_mosaic.py and tests/test_vem.py
# image generators, critics, flows and their students: not classifiers (each has its own tests)
GAN_PARTS = ("mosaic_generator", "patch_discriminator", "image_discriminator",
             "unet_generator", "patchgan_discriminator", "dcgan_generator", "sn_discriminator", "energy_net",
             "glow", "rdb_encoder", "rdb_decoder", "flow_student")


@pytest.mark.parametrize("name", [n for n in MODELS.names() if n not in GAN_PARTS])
def test_registered_model_trains_and_state_dict_round_trips(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = _build(name).train()
    out = model(x)
    assert out.shape == (2, 10)
    F.cross_entropy(out, torch.tensor([1, 7])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())

    torch.manual_seed(1)
    fresh = _build(name).eval()
    model.eval()
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x)), "different seeds should give different models"
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("resnet20", 0.27e6),
        ("resnet56", 0.85e6),
        ("resnet110", 1.7e6),
        ("wrn_40_2", 2.2e6),
        ("wrn_16_2", 0.7e6),
    ],
)
def test_parameter_counts_match_published(name: str, published: float) -> None:
    n = _n_params(build_model(name, num_classes=10))
    assert abs(n - published) / published < 0.02, f"{name}: {n} parameters vs published {published:.0f}"


def test_resnet20_parameter_count_is_exact() -> None:
    # 269,722 = the number of weights in the pretrained ResNet-20 file (no shortcut parameters: option A).
    assert _n_params(build_model("resnet20")) == 269_722


# ---------------------------------------------------------------- CIFAR ResNets


def test_option_a_shortcut_subsamples_and_zero_pads_channels() -> None:
    model = build_model("resnet20")
    block = model.layer2[0]
    assert isinstance(block.shortcut, PadShortcut)
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    x = torch.randn(2, 16, 32, 32)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, :8], torch.zeros(2, 8, 16, 16))
    assert torch.equal(out[:, 24:], torch.zeros(2, 8, 16, 16))
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    out3 = model.layer3[0].shortcut(torch.randn(2, 32, 16, 16))
    assert out3.shape == (2, 64, 8, 8) and out3[:, :16].abs().sum() == 0 and out3[:, 48:].abs().sum() == 0


def test_resnet_depth_and_hookable_features() -> None:
    model = build_model("resnet56")
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [9, 9, 9]
    x = torch.randn(2, 3, 32, 32)
    assert _out_shape(model, "layer3.8", x) == (2, 64, 8, 8)
    assert _out_shape(model, "layer1", x) == (2, 16, 32, 32)
    with pytest.raises(ValueError, match="57"):
        build_model("resnet20").__class__(57)


# ---------------------------------------------------------------- WRN, MFD CNN, torchvision nets


def test_wrn_structure() -> None:
    model = build_model("wrn_40_2", dropout=0.3)
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [6, 6, 6]
    assert model.layer1[0].dropout.p == 0.3
    assert model.layer1[0].shortcut is not None and model.layer1[1].shortcut is None  # 16 -> 32 channels
    assert _out_shape(model, "relu", torch.randn(2, 3, 32, 32)) == (2, 128, 8, 8)
    generic = build_model("wide_resnet", depth=16, widen_factor=1)
    assert _n_params(generic) == _n_params(build_model("wrn_16_1"))


def test_mfd_cnn_matches_the_supplement() -> None:
    model = build_model("mfd_cnn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.25, 0.25, 0.25]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    x = torch.randn(2, 3, 32, 32)
    assert model.fc1.in_features == 2048
    assert _out_shape(model, "relu_fc1", x) == (2, 256)
    assert _out_shape(model, "relu6", x) == (2, 128, 8, 8)
    two = build_model("mfd_cnn", hidden=(256, 256))
    assert _out_shape(two, "relu_fc2", x) == (2, 256) and two.fc.in_features == 256


@pytest.mark.parametrize(
    ("name", "feature", "small", "large"),
    [
        ("resnet18", "layer4", (2, 512, 4, 4), (2, 512, 1, 1)),
        ("shufflenet_v2", "conv5", (2, 1024, 4, 4), (2, 1024, 1, 1)),
        ("mobilenet_v2", "features", (2, 1280, 2, 2), (2, 1280, 1, 1)),
    ],
)
def test_small_input_stem(name: str, feature: str, small: tuple, large: tuple) -> None:
    x = torch.randn(2, 3, 32, 32)
    assert _out_shape(build_model(name, small_input=True), feature, x) == small
    assert _out_shape(build_model(name, small_input=False), feature, x) == large


# ---------------------------------------------------------------- external models


def test_torchvision_model_by_name() -> None:
    factory = MODELS.get("torchvision:mobilenet_v3_small")
    model = factory(num_classes=10)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(build_model("torchvision:resnet18", num_classes=3), nn.Module)


def test_unknown_torchvision_model_suggests() -> None:
    with pytest.raises(RegistryError) as e:
        MODELS.get("torchvision:resnet1888")
    assert "resnet1888" in str(e.value) and "did you mean" in str(e.value) and "'resnet18'" in str(e.value)


def test_timm_missing_says_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # None in sys.modules makes `import timm` fail
    with pytest.raises(ImportError, match="pip install timm") as e:
        MODELS.get("timm:resnet18")
    assert "timm:resnet18" in str(e.value)


def test_timm_model_through_fake_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def create_model(name, **kw):
        calls.append((name, kw))
        if name != "tiny_vit":
            raise RuntimeError(f"Unknown model ({name})")
        return nn.Linear(4, kw.get("num_classes", 1000))

    fake = types.ModuleType("timm")
    fake.create_model = create_model
    fake.list_models = lambda: ["tiny_vit", "resnet18"]
    monkeypatch.setitem(sys.modules, "timm", fake)

    model = build_model("timm:tiny_vit", num_classes=7)
    assert isinstance(model, nn.Linear) and model.out_features == 7
    assert calls == [("tiny_vit", {"num_classes": 7, "pretrained": False})]
    with pytest.raises(RegistryError, match="did you mean 'tiny_vit'"):
        build_model("timm:tiny_vitt")


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    name = "kdforge_test_usernets"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent("""
        from torch import nn

        def build_net(width=4, num_classes=10):
            return nn.Sequential(nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(width, num_classes))

        class Zoo:
            @staticmethod
            def small(num_classes=10):
                return nn.Linear(3, num_classes)

        def not_a_model():
            return 42

        CONSTANT = 3
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_factory_by_import_path(user_module: str) -> None:
    model = MODELS.get(f"{user_module}:build_net")(width=8)
    assert model[0].out_channels == 8
    assert build_model(f"{user_module}:Zoo.small", num_classes=5).out_features == 5


def test_user_factory_errors_name_the_spec(user_module: str) -> None:
    with pytest.raises(RegistryError, match="'build_nett'.*did you mean 'build_net'"):
        MODELS.get(f"{user_module}:build_nett")
    with pytest.raises(ModuleNotFoundError, match="no_such_pkg_xyz.mod:net"):
        MODELS.get("no_such_pkg_xyz.mod:net")
    with pytest.raises(TypeError, match="CONSTANT"):
        MODELS.get(f"{user_module}:CONSTANT")
    with pytest.raises(TypeError, match="not_a_model.*returned a int"):
        build_model(f"{user_module}:not_a_model")


# ---------------------------------------------------------------- load_weights


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("layout", ["plain", "module", "kdforge", "akamaster", "memory"])
def test_load_weights_layouts(layout: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = build_model("resnet20")
    sd = src.state_dict()
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    obj = {
        "plain": sd,
        "module": wrapped,
        "kdforge": {"model": sd, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}},
        "akamaster": {"state_dict": wrapped, "best_prec1": 91.7},
        "memory": wrapped,
    }[layout]
    torch.manual_seed(1)
    dst = build_model("resnet20")
    assert not _same(src, dst)
    if layout == "memory":
        out = load_weights(dst, obj)
    else:
        torch.save(obj, tmp_path / "w.pt")
        out = load_weights(dst, tmp_path / "w.pt")
    assert out is dst and _same(src, dst)


def test_load_weights_key_and_errors(tmp_path: Path) -> None:
    src = build_model("resnet20")
    torch.save({"ema": src.state_dict(), "model": build_model("resnet20").state_dict()}, tmp_path / "c.pt")
    assert _same(load_weights(build_model("resnet20"), tmp_path / "c.pt", key="ema"), src)
    with pytest.raises(ValueError, match="'teacher'.*ema, model"):
        load_weights(build_model("resnet20"), tmp_path / "c.pt", key="teacher")

    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_weights(src, missing)

    torch.save(build_model("resnet20", num_classes=100).state_dict(), tmp_path / "c100.pt")
    shape_msg = r"c100\.pt.*linear\.weight: checkpoint \(100, 64\) vs model \(10, 64\)"
    with pytest.raises(ValueError, match=shape_msg):
        load_weights(build_model("resnet20"), tmp_path / "c100.pt")

    partial = {k: v for k, v in src.state_dict().items() if not k.startswith("linear.")}
    with pytest.raises(ValueError, match=r"2 missing key\(s\): linear\.weight, linear\.bias"):
        load_weights(build_model("resnet20"), partial)
    dst = load_weights(build_model("resnet20"), {**partial, "extra.w": torch.zeros(1)}, strict=False)
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\): extra\.w"):
        load_weights(build_model("resnet20"), {**src.state_dict(), "extra.w": torch.zeros(1)})


# ---------------------------------------------------------------- pretrained CIFAR-10 ResNets (shared data)

needs_resnets = pytest.mark.skipif(
    not RESNET_DIR.is_dir(),
    reason=f"pretrained CIFAR ResNets not found at {RESNET_DIR} (set KDFORGE_SHARED_DATA)",
)


def _pretrained(depth: int) -> Path:
    (path,) = RESNET_DIR.glob(f"resnet{depth}-*.th")
    return path


@pytest.mark.slow
@needs_resnets
@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_pretrained_cifar_resnets_load_strictly(depth: int) -> None:
    path = _pretrained(depth)
    model = load_weights(build_model(f"resnet{depth}"), path, strict=True)
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.linear.weight, raw["module.linear.weight"])
    # torch's own strict check agrees once `module.` is stripped: the attribute names match the file.
    build_model(f"resnet{depth}").load_state_dict({k.removeprefix("module."): v for k, v in raw.items()})


@pytest.mark.slow
@needs_resnets
@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpeg.tar.gz").is_file(), reason="CIFAR-10 JPEG tar not found")
def test_pretrained_resnet20_classifies_cifar10_jpegs() -> None:
    # Strict loading checks names and shapes; this checks the forward pass (shortcut padding, pooling) too.
    import numpy as np
    from PIL import Image

    images, labels, per_class = [], [], {}
    with tarfile.open(SHARED_DATA / "cifar10-jpeg.tar.gz") as tf:
        for member in tf:  # test/ comes first in the archive: stop at the first train/ entry
            parts = member.name.split("/")
            if len(parts) < 4:
                continue
            if parts[1] != "test":
                break
            if per_class.get(parts[2], 0) < 20:
                per_class[parts[2]] = per_class.get(parts[2], 0) + 1
                with Image.open(tf.extractfile(member)) as im:
                    images.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
                labels.append(parts[2])
    classes = sorted(per_class)
    assert len(classes) == 10 and len(images) == 200
    x = torch.stack(images).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    y = torch.tensor([classes.index(c) for c in labels])
    model = load_weights(build_model("resnet20"), _pretrained(20)).eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.7, f"pretrained ResNet-20 scored {acc:.2f} on 200 JPEG test images (expected about 0.8)"
