"""PyTorch-pretrained weights in jaxcnn's models, against torchvision and timm themselves.

References: the PyTorch models (random weights and random BatchNorm statistics) give the logits the imported
jaxcnn models must reproduce; torchvision's own ImageNet transform and its top-5; PyTorch's meta-device state dicts
give every key and shape of every supported architecture. Tests that need PyTorch skip where it cannot be installed
(Python 3.12 here); the safetensors-only parts run everywhere (NumPy references).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_reference as ref
from jaxcnn import cli
from jaxcnn.models import create_model
from jaxcnn.pretrained import (
    TIMM_ARCHS,
    TORCHVISION_ARCHS,
    WeightsMismatchError,
    check_state_dict,
    convert_state_dict,
    load_weights,
    parse_spec,
    read_state_dict,
)
from jaxcnn.pretrained.imagenet import class_names, eval_transform
from jaxcnn.pretrained.predict import transform_for
from jaxcnn.train import transfer

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed: ./setup.sh --tests")


def jax_logits(model, variables, x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x)))


def assert_same_logits(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Max |difference| relative to the largest logit; asserts it is below 1e-4 and returns it."""
    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    assert rel < 1e-4, f"logits differ by {rel:.2e} (relative)"
    return rel


# ---------------------------------------------------------------------------------------------------------
# Name maps: every key of every supported architecture, from PyTorch's own models (meta device: shapes only)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source,arch", [("torchvision", a) for a in TORCHVISION_ARCHS] + [("timm", a) for a in TIMM_ARCHS])
def test_name_map_covers_every_key_with_matching_shapes(source, arch):
    torch, torchvision, timm = ref.import_torch()
    with torch.device("meta"):
        model = (torchvision.models.get_model(arch) if source == "torchvision"
                 else timm.create_model(arch, pretrained=False))
    check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, arch, source)  # raises on any gap


# ---------------------------------------------------------------------------------------------------------
# The same function: logits of the imported model equal PyTorch's
# ---------------------------------------------------------------------------------------------------------

LOGIT_CASES = [  # (source, arch, input size, file format): small inputs where the architecture allows
    ("torchvision", "resnet18", 64, ".pth"),
    ("torchvision", "resnet50", 64, ".safetensors"),
    ("torchvision", "resnext50_32x4d", 64, ".safetensors"),
    ("torchvision", "wide_resnet50_2", 64, ".pth"),
    ("torchvision", "vgg11", 32, ".safetensors"),
    ("torchvision", "vgg11_bn", 40, ".pth"),
    ("torchvision", "alexnet", 67, ".safetensors"),
    ("timm", "resnet18", 65, ".safetensors"),
    ("timm", "resnet50", 64, ".pth"),
]


@pytest.mark.parametrize("source,arch,size,suffix", LOGIT_CASES)
def test_imported_model_gives_pytorchs_logits(tmp_path, source, arch, size, suffix):
    torch_model = ref.build(source, arch, num_classes=10)
    path = tmp_path / f"{arch}{suffix}"
    ref.save(torch_model, path)
    x = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
    theirs = ref.logits(torch_model, x)
    del torch_model
    model, variables = load_weights(f"{source}:{arch}={path}")
    assert model.num_classes == 10
    assert_same_logits(jax_logits(model, variables, x), theirs)


# ---------------------------------------------------------------------------------------------------------
# Errors, specs, formats
# ---------------------------------------------------------------------------------------------------------


def test_unmapped_missing_and_misshapen_keys_are_one_error(tmp_path):
    torch, torchvision, _ = ref.import_torch()
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in torchvision.models.resnet18().state_dict().items()}
    shapes["layer5.0.conv1.weight"] = (64, 64, 3, 3)
    del shapes["layer2.1.bn2.running_var"]
    shapes["layer3.0.conv2.weight"] = (256, 256, 1, 1)
    with pytest.raises(WeightsMismatchError) as e:
        check_state_dict(shapes, "resnet18")
    message = str(e.value)
    for expected in ("keys with no place in the model (1)", "layer5.0.conv1.weight",
                     "keys the model needs, missing (1)", "layer2.1.bn2.running_var",
                     "shape mismatches (1)", "layer3.0.conv2.weight: shape (256, 256, 1, 1)"):
        assert expected in message
    assert "model variables no key fills" not in message  # the missing key is listed once, by its PyTorch name


def test_a_state_dict_of_another_architecture_lists_what_does_not_fit(tmp_path):
    arrays = {"fc.weight": np.zeros((10, 512), np.float32), "fc.bias": np.zeros(10, np.float32)}
    path = tmp_path / "head_only.safetensors"
    safetensors_numpy.save_file(arrays, str(path))
    with pytest.raises(WeightsMismatchError, match=r"keys the model needs, missing \(100\)"):
        load_weights(f"timm:resnet18={path}")


@pytest.mark.parametrize("text,message", [
    ("torchvision:resnet50", "torchvision:ARCH=PATH"),
    ("torchvision:resnet9=/x.pth", "no name map for this architecture"),
    ("timm:vgg16=/x.pth", "timm weights load for resnet18"),
    ("hf-hub:resnet50", "OWNER/NAME"),
    ("hf-hub:timm/vit_base_patch16_224.augreg_in21k", "'vit_base_patch16_224' has no name map"),
    ("pytorch:resnet50=/x.pth", "is not a weights spec"),
])
def test_bad_specs_say_what_is_accepted(text, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(text)


def test_specs_parse():
    assert parse_spec("torchvision:resnet50=/p/r50.pth").location == "/p/r50.pth"
    spec = parse_spec("hf-hub:timm/resnet50.a1_in1k")
    assert (spec.source, spec.arch, spec.location, spec.key_names) == ("hf-hub", "resnet50", "timm/resnet50.a1_in1k",
                                                                       "timm")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="docs/pretrained.md"):
        load_weights(f"torchvision:resnet18={tmp_path / 'absent.pth'}")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown weights format '.npz'"):
        read_state_dict(tmp_path / "w.npz")


def test_safetensors_layouts_against_numpy(tmp_path):
    """Without PyTorch: a .safetensors file read back, conv weights to HWIO and AlexNet's channel-first flatten,
    checked against NumPy computations in the PyTorch layout."""
    from jaxcnn.pretrained import name_map
    from jaxcnn.pretrained.convert import model_shapes

    rng = np.random.default_rng(0)
    shapes = model_shapes("alexnet", 10)
    state_dict = {}
    for key, target in name_map("alexnet").items():
        shape = shapes[target.name]
        torch_shape = {"conv": lambda s: (s[3], s[2], s[0], s[1]), "vector": lambda s: s}.get(
            target.layout, lambda s: s[::-1])(shape)  # linear: [out, in]
        random = key in ("features.0.weight", "classifier.1.weight")
        state_dict[key] = (rng.standard_normal(torch_shape) if random else np.zeros(torch_shape)).astype(np.float32)
    path = tmp_path / "alexnet.safetensors"
    safetensors_numpy.save_file(state_dict, str(path))
    read = read_state_dict(path)
    assert read.keys() == state_dict.keys() and all(np.array_equal(read[k], v) for k, v in state_dict.items())
    variables = convert_state_dict(read, "alexnet")
    w = state_dict["features.0.weight"]  # [out, in, kh, kw]
    kernel = variables["params"]["block1_conv"]["conv"]["kernel"]  # [kh, kw, in, out]
    assert kernel.shape == (11, 11, 3, 64) and kernel[1, 7, 2, 5] == w[5, 2, 1, 7]
    # PyTorch's first classifier layer on a [C, 6, 6] map flattened channel-first equals jaxcnn's on the same map
    # flattened [6, 6, C]
    fmap = rng.standard_normal((256, 6, 6)).astype(np.float32)
    theirs = state_dict["classifier.1.weight"] @ fmap.reshape(-1)
    ours = fmap.transpose(1, 2, 0).reshape(-1) @ variables["params"]["head"]["fc1"]["kernel"]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# The hub: cached files load offline; a missing one is one error saying what to put where
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants", reason="huggingface_hub is not installed")
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_hub_cache(cache: Path, repo: str, filename: str, write) -> None:
    """huggingface_hub's cache layout: refs/main names a snapshot folder holding the file."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    (folder / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
    write(folder / "snapshots" / revision / filename)


def test_hub_weights_load_from_the_cache(offline_hub):
    torch_model = ref.build("timm", "resnet18", num_classes=1000, seed=3)
    put_in_hub_cache(offline_hub, "timm/resnet18.a1_in1k", "model.safetensors", lambda p: ref.save(torch_model, p))
    x = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype(np.float32)
    model, variables = load_weights("hf-hub:timm/resnet18.a1_in1k")
    assert_same_logits(jax_logits(model, variables, x), ref.logits(torch_model, x))


def test_hub_predictions_use_timms_evaluation_transform(offline_hub, tmp_path):
    _, _, timm = ref.import_torch()
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    cfg = timm.models.get_pretrained_cfg("resnet50.a1_in1k").to_dict()  # bicubic, crop_pct 0.95
    config = {"architecture": "resnet50", "num_classes": 1000, "pretrained_cfg": cfg}
    put_in_hub_cache(offline_hub, "timm/resnet50.a1_in1k", "config.json", lambda p: p.write_text(json.dumps(config)))
    spec = parse_spec("hf-hub:timm/resnet50.a1_in1k")
    transform = transform_for(spec)
    assert (transform["resize"], transform["crop"], transform["interpolation"]) == (235, 224, "bicubic")
    theirs_fn = create_transform(**resolve_data_config(pretrained_cfg=cfg))
    with Image.open(photo(tmp_path / "img.png", (320, 250))) as img:
        np.testing.assert_allclose(eval_transform(img, **transform), theirs_fn(img).numpy().transpose(1, 2, 0),
                                   atol=1e-3)
    assert transform_for(spec, resize=256, crop=None)["resize"] == 256  # given options win
    assert transform_for(parse_spec("hf-hub:timm/resnet18.a1_in1k")) == {}  # no config cached: torchvision's


def test_hub_weights_offline_and_not_cached_say_what_to_put_where(offline_hub):
    with pytest.raises(FileNotFoundError) as e:
        load_weights("hf-hub:timm/resnet50.a1_in1k")
    message = str(e.value)
    assert str(offline_hub) in message and "models--timm--resnet50.a1_in1k" in message
    assert "timm:resnet50=/path/to/model.safetensors" in message


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning: transfer.init_from takes a spec; the new head is re-initialised and listed
# ---------------------------------------------------------------------------------------------------------


def test_init_from_a_spec_loads_the_backbone_and_reinitialises_the_head(tmp_path):
    torch_model = ref.build("torchvision", "resnet18", num_classes=1000)
    ref.save(torch_model, tmp_path / "r18.pth")
    model = create_model("resnet18", num_classes=10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    fresh = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes)  # "fresh" values, told apart
    variables, report = transfer.load_pretrained(fresh, f"torchvision:resnet18={tmp_path / 'r18.pth'}")
    assert sorted(name for name, _ in report.reinitialised) == ["params/head/logits/bias", "params/head/logits/kernel"]
    assert "(512, 10) here, (512, 1000) in the source" in report.describe()
    assert len(report.loaded) == 62 + 40 - 2 and not report.ignored
    sd = torch_model.state_dict()
    np.testing.assert_array_equal(variables["batch_stats"]["stage4_block2"]["norm2"]["var"],
                                  sd["layer4.1.bn2.running_var"].numpy())
    assert np.all(np.asarray(variables["params"]["head"]["logits"]["kernel"]) == 0.5)  # kept, not loaded


# ---------------------------------------------------------------------------------------------------------
# Prediction: torchvision's transform, top-5 through the command line
# ---------------------------------------------------------------------------------------------------------


def photo(path: Path, size=(300, 230), seed: int = 0) -> Path:
    """A smooth random RGB image (a blurred noise field), saved as PNG."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 256, (size[1] // 10, size[0] // 10, 3), dtype=np.uint8))
    noise.resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2)).save(path)
    return path


@pytest.mark.parametrize("weights,size", [("IMAGENET1K_V1", (300, 230)), ("IMAGENET1K_V2", (180, 333))])
def test_eval_transform_matches_torchvisions(tmp_path, weights, size):
    _, torchvision, _ = ref.import_torch()
    from PIL import Image

    preset = torchvision.models.ResNet50_Weights[weights].transforms()
    with Image.open(photo(tmp_path / "img.png", size)) as img:
        theirs = preset(img).numpy().transpose(1, 2, 0)
        ours = eval_transform(img, resize=preset.resize_size[0], crop=preset.crop_size[0])
    assert ours.shape == theirs.shape == (224, 224, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)


def test_class_names_are_torchvisions():
    _, torchvision, _ = ref.import_torch()
    assert list(class_names()) == torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


def test_predict_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["predict", "--weights", "torchvision:resnet18", "x.png"]) == 1
    assert "torchvision:ARCH=PATH" in capsys.readouterr().err


def test_predict_command_gives_torchvisions_top5(tmp_path, capsys):
    _, torchvision, _ = ref.import_torch()
    from PIL import Image

    torch_model = ref.build("torchvision", "resnet18", num_classes=1000, seed=5)
    ref.save(torch_model, tmp_path / "r18.pth")
    image = photo(tmp_path / "img.png")
    with Image.open(image) as img:
        x = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()(img).numpy().transpose(1, 2, 0)[None]
    theirs = ref.logits(torch_model, x)[0]
    top5 = np.argsort(-theirs)[:5]
    # `python -m jaxcnn predict --weights SPEC IMAGE`, in this process (the command line's own entry point)
    assert cli.main(["predict", "--weights", f"torchvision:resnet18={tmp_path / 'r18.pth'}", str(image)]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.strip().splitlines()
    assert lines[0] == str(image) and len(lines) == 6
    indices = [int(line.split("(")[1].split(")")[0]) for line in lines[1:]]
    assert indices == top5.tolist(), (stdout, theirs[top5])
    assert lines[1].endswith(class_names()[top5[0]])
    p = np.exp(theirs - theirs.max())
    p /= p.sum()
    assert float(lines[1].split()[1]) == pytest.approx(p[top5[0]], abs=2e-4)


# ---------------------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------------------


def test_finetune_experiment_plans_four_starts_on_grey_images():
    from jaxcnn.config import load_experiment_module
    from jaxcnn.results.sweep import plan_sweep

    path = Path(__file__).resolve().parents[2] / "experiments" / "finetune_pretrained.py"
    doc = load_experiment_module(path).__doc__
    assert all(field in doc for field in ("Command:", "Question:", "Runtime:", "Expected:"))
    plan = {r.variant: cfg for r, cfg in plan_sweep(path)}
    assert list(plan) == ["frozen", "frozen-batchstats", "finetune", "scratch"]
    assert plan["scratch"].transfer.init_from is None and plan["finetune"].transfer.init_from
    assert plan["frozen"].transfer.freeze == plan["frozen-batchstats"].transfer.freeze == ("^stem", "^stage")
    assert plan["frozen"].model["bn_eval"] and "bn_eval" not in plan["frozen-batchstats"].model
    cfg = plan["finetune"]
    model = create_model(cfg.model["name"], **{k: v for k, v in cfg.model.items() if k != "name"})
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1))))
    assert variables["params"]["stem"]["conv"]["kernel"].shape == (7, 7, 3, 64)  # the pretrained stem fits
    assert jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 28, 28, 1))), variables).shape == (2, 10)
    # bn_eval: the frozen backbone's BatchNorm normalises training batches with the running statistics, as
    # evaluation does, and leaves them unchanged
    probe = create_model(cfg.model["name"], bn_eval=True)
    v = jax.tree_util.tree_map(lambda s: jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, s.shape), s.dtype),
                               variables)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 28, 28, 1)), jnp.float32)
    trained, updates = probe.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(trained, probe.apply(v, x, train=False), rtol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(updates["batch_stats"]),
                                                    jax.tree_util.tree_leaves(v["batch_stats"])))


# ---------------------------------------------------------------------------------------------------------
# Training-mode dropout where torchvision's AlexNet has it
# ---------------------------------------------------------------------------------------------------------


def test_alexnet_dropout_before_hidden_layers_as_torchvision():
    """torchvision's AlexNet classifier: dropout, fc1, relu, dropout, fc2, relu, logits. With one hidden layer and
    head_dropout_position='before_hidden', the hidden features (pre_logits) are drawn with dropout and the logits
    are their exact affine image; with the default the hidden features are dropout-free and the logits are not."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 67, 67, 3)), jnp.float32)
    for position in ("before_hidden", "after_hidden"):
        model = create_model("alexnet", num_classes=10, head_hidden=(32,), head_dropout_position=position)
        v = model.init(jax.random.key(0), x)
        trained = model.apply(v, x, train=True, return_features=True, rngs={"dropout": jax.random.key(1)})
        evaluated = model.apply(v, x, return_features=True)
        logits = v["params"]["head"]["logits"]
        affine = trained["pre_logits"] @ logits["kernel"] + logits["bias"]
        dropped_features = not np.allclose(trained["pre_logits"], evaluated["pre_logits"])
        assert dropped_features == (position == "before_hidden")
        assert np.allclose(trained["logits"], affine, rtol=1e-5, atol=1e-6) == (position == "before_hidden")
    default = create_model("alexnet")
    assert default.head_dropout_position == "after_hidden"  # the registered model's default is unchanged
