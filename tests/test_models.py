"""The backbone registry: dims, normalisation, weights from a file, and the offline ImageNet error."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

from conftest import make_collection
from simsearch.cli import cli
from simsearch.errors import InputError, WeightsError
from simsearch.models import available_models, create_model, get_spec

RESNET_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}


def test_registry_advertises_resnets() -> None:
    for name, dim in RESNET_DIMS.items():
        assert name in available_models()
        assert get_spec(name).dim == dim
        assert get_spec(name).preprocessing.crop_size == 224
    with pytest.raises(InputError, match="resnet18"):
        get_spec("resnet9000")


@pytest.mark.parametrize("name", available_models())
def test_embedding_width_equals_advertised_dim_and_is_normalised(name: str) -> None:
    model = create_model(name, "random", seed=0)
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert out.dtype == torch.float32
    assert tuple(out.shape) == (2, get_spec(name).dim) == (2, model.dim)
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, atol=1e-5)
    description = model.describe()
    assert (description["model"], description["dim"], description["weights"]) == (name, model.dim, "random:seed=0")


def test_random_weights_are_seeded(tiny_model) -> None:
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        again = create_model("resnet18", "random", seed=0)(x)
        other = create_model("resnet18", "random", seed=1)(x)
        reference = tiny_model(x)
    torch.testing.assert_close(again, reference)
    assert not torch.allclose(other, reference)


@pytest.mark.parametrize("name", list(RESNET_DIMS))
def test_resnets_are_torchvision_s_networks_without_torchvision(name: str) -> None:
    """Same modules, keys and seeded initialisation as torchvision's, the same ImageNet entry and preset."""
    from simsearch.models.resnet import IMAGENET_WEIGHTS, build_resnet

    torch.manual_seed(11)
    ours = build_resnet(name)
    torch.manual_seed(11)
    theirs = torchvision.models.get_model(name, weights=None)
    theirs.fc = torch.nn.Identity()
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if name in ("resnet18", "resnet50"):  # one of each block type: the forward passes agree too
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        with torch.inference_mode():
            torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), atol=0, rtol=0)
    enum = torchvision.models.get_model_weights(name).DEFAULT
    assert IMAGENET_WEIGHTS[name].url == enum.url
    assert IMAGENET_WEIGHTS[name].label == f"{type(enum).__name__}.{enum.name}"
    t = enum.transforms()
    prep = get_spec(name).preprocessing
    assert (prep.resize_size, prep.crop_size) == (t.resize_size[0], t.crop_size[0])
    assert (list(prep.mean), list(prep.std), prep.interpolation) == (list(t.mean), list(t.std), t.interpolation.value)


def _torchvision_embedding(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.fc = torch.nn.Identity()
    net.eval()
    with torch.inference_mode():
        return torch.nn.functional.normalize(net(x), dim=1)


@pytest.mark.parametrize("keep_fc", [True, False], ids=["with-fc", "without-fc"])
def test_create_model_loads_a_torchvision_state_dict(tmp_path: Path, keep_fc: bool) -> None:
    torch.manual_seed(123)
    net = torchvision.models.resnet18(weights=None)
    state = net.state_dict()
    if not keep_fc:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    model = create_model("resnet18", path)
    assert model.weights_id.startswith("file:weights.pth:")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got, _torchvision_embedding(net, x), atol=1e-5, rtol=1e-4)


def test_state_dict_errors(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit resnet34"):
        create_model("resnet34", path)
    with pytest.raises(WeightsError, match="imagenet"):
        create_model("resnet18", tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="could not read"):
        create_model("resnet18", junk)


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch) -> Path:
    """torchvision's cache pointed at an empty folder: no ImageNet weights anywhere."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch" / "hub"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def expected_file(checkpoints: Path, name: str = "resnet18") -> Path:
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return checkpoints / os.path.basename(url)


def _no_network(*args, **kwargs):
    raise AssertionError("must not try to download when SIMSEARCH_OFFLINE is set")


def test_offline_imagenet_error_names_the_file(empty_torch_home: Path, monkeypatch) -> None:
    monkeypatch.setenv("SIMSEARCH_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    with pytest.raises(WeightsError) as err:
        create_model("resnet18", "imagenet")
    message = str(err.value)
    assert str(expected_file(empty_torch_home)) in message
    assert "--weights random" in message
    assert "SIMSEARCH_OFFLINE" in message
    assert "\n" not in message


def test_download_failure_gives_the_same_clear_error(empty_torch_home: Path, monkeypatch) -> None:
    monkeypatch.delenv("SIMSEARCH_OFFLINE", raising=False)

    def unreachable(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(WeightsError) as err:
        create_model("resnet18", "imagenet")
    message = str(err.value)
    assert str(expected_file(empty_torch_home)) in message
    assert "--weights random" in message and "name resolution" in message


def test_imagenet_weights_are_read_from_torchvision_cache(empty_torch_home: Path, monkeypatch) -> None:
    monkeypatch.setenv("SIMSEARCH_OFFLINE", "1")
    torch.manual_seed(5)
    net = torchvision.models.resnet18(weights=None)
    cached = expected_file(empty_torch_home)
    cached.parent.mkdir(parents=True)
    torch.save(net.state_dict(), cached)  # stands in for the real download
    model = create_model("resnet18", "imagenet")
    assert model.weights_id.startswith("imagenet:")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), _torchvision_embedding(net, x), atol=1e-5, rtol=1e-4)
    cached.write_bytes(b"half a download")
    with pytest.raises(WeightsError, match="could not load cached"):
        create_model("resnet18", "imagenet")


def test_cli_index_offline_imagenet_is_one_line_exit_1(tmp_path: Path, empty_torch_home: Path, monkeypatch) -> None:
    make_collection(tmp_path / "photos", n=1)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    result = CliRunner().invoke(
        cli,
        ["index", str(tmp_path / "photos"), "--model", "resnet18", "--index", str(tmp_path / "idx"), "-q"],
        env={"SIMSEARCH_OFFLINE": "1", "SIMSEARCH_INDEX": None},
        catch_exceptions=False,
    )
    assert result.exit_code == 1
    err = result.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err and "Traceback" not in result.stderr
    assert str(expected_file(empty_torch_home)) in err and "--weights random" in err
    assert not (tmp_path / "idx").exists()  # no half-made index left behind
