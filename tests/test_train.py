"""simsearch train / eval: learning works, the checkpoint round-trips through index and query,
freezing is real, and bad data is refused before any training starts.

Everything runs a seeded random ResNet-18 on tiny generated images at a 64 px crop, so each test
takes seconds on a CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import SHAPES, make_image
from simsearch.cli import cli
from simsearch.errors import InputError, WeightsError
from simsearch.evaluate import evaluate_folder
from simsearch.models import Preprocessing, adapt_first_conv_to_gray, create_model
from simsearch.labelled import load_labelled, split_by_class, split_by_image
from simsearch.models.checkpoint import load_checkpoint
from simsearch.train import TrainCallback, TrainConfig, train


def make_labelled(root: Path, n: int = 12, seed: int = 0, size: tuple[int, int] = (72, 64), classes: int = 4) -> Path:
    """One folder per shape; every image has a random colour, so colour is the nuisance to unlearn."""
    rnd = random.Random(seed)
    for c, shape in enumerate(SHAPES[:classes]):
        for i in range(n):
            color = (rnd.randint(40, 255), rnd.randint(40, 255), rnd.randint(40, 255))
            make_image(root / shape / f"{i:02d}.png", size=size, color=color, shape=shape, seed=seed * 1000 + c * 100 + i)
    return root


def config(**kw: Any) -> TrainConfig:
    base = dict(
        model="resnet18", weights="random", dim=32, epochs=2, batch_size=16, workers=0, image_size=64,
        loss="supcon", head_init="random", val_fraction=0.25, patience=20,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_labelled(tmp_path_factory.mktemp("shapes") / "train", n=12, seed=0)


@pytest.fixture(scope="module")
def shapes_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_labelled(tmp_path_factory.mktemp("shapes_test") / "test", n=12, seed=1)


@pytest.fixture(scope="module")
def trained(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A head trained for 10 epochs on frozen random features (a few seconds)."""
    out = tmp_path_factory.mktemp("ckpt") / "model.pt"
    summary = train(shapes, out, config(dim=64, epochs=10, phases="head"))
    return out, summary


class Recorder(TrainCallback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_extract_start(self, total: int, what: str) -> None:
        self.events.append(f"extract:{total}")

    def on_phase_start(self, phase: str, epochs: int, steps_per_epoch: int) -> None:
        self.events.append(f"phase:{phase}")

    def on_epoch_end(self, record: Any) -> None:
        self.events.append(f"epoch:{record.phase}:{record.epoch}")


# -- learning ----------------------------------------------------------------------------------


def test_training_beats_the_untrained_model_on_unseen_images(trained: tuple[Path, Any], shapes_test: Path):
    out, summary = trained
    untrained = evaluate_folder(shapes_test, model="resnet18", weights="random", workers=0)
    tuned = evaluate_folder(shapes_test, weights=str(out), workers=0)
    # untrained (seeded random ResNet-18): colour dominates, about 0.81 R@1 and 0.42 MAP@R here;
    # the trained head learns shape: about 1.0 R@1 and 0.8 MAP@R on 48 new images.
    assert tuned.metrics.recall[1] >= untrained.metrics.recall[1] + 0.1
    assert tuned.metrics.map_at_r >= untrained.metrics.map_at_r + 0.2
    assert tuned.model["dim"] == 64 and tuned.model["weights"].startswith("checkpoint:model.pt:")
    # and the validation figures the loop tracked say the same
    assert summary.best_metrics["recall@1"] > summary.frozen_metrics["recall@1"]
    assert summary.best_phase == "head"


def test_checkpoint_is_self_describing(trained: tuple[Path, Any]):
    out, summary = trained
    state = load_checkpoint(out)
    assert state["format"] == "simsearch-checkpoint" and state["version"] == 1
    assert state["backbone"]["name"] == "resnet18" and state["backbone"]["weights"] == "random:seed=0"
    assert state["dim"] == 64 and state["head"]["config"]["dim"] == 64 and state["head"]["config"]["in_dim"] == 512
    assert state["class_names"] == sorted(SHAPES)
    assert state["preprocessing"]["crop_size"] == 64 and state["preprocessing"]["resize_size"] == 73
    assert state["config"]["loss"] == "supcon" and state["config"]["epochs"] == 10
    assert state["metrics"]["best"]["recall@1"] == summary.best_metrics["recall@1"]
    assert len(state["history"]) == len(summary.history)
    model = create_model("resnet50", str(out))  # the checkpoint's own backbone wins over the name
    assert model.model_name == "resnet18" and model.dim == 64 and model.head is not None
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 64)


def test_train_index_query_round_trip_and_model_mismatch(trained: tuple[Path, Any], shapes: Path, tmp_path: Path):
    out, _ = trained
    runner = CliRunner()
    index = tmp_path / "idx"
    r = runner.invoke(cli, ["index", str(shapes), "--index", str(index), "--weights", str(out), "--workers", "0", "-q", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["total_indexed"] == 48
    info = json.loads(runner.invoke(cli, ["info", "--index", str(index), "--json"]).output)
    assert info["model"] == "resnet18" and info["dim"] == 64 and info["weights"].startswith("checkpoint:model.pt:")
    query_img = shapes / "triangle" / "03.png"
    r = runner.invoke(cli, ["query", str(query_img), "--index", str(index), "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.output)[0]["results"]
    assert len(hits) == 3 and all("/triangle/" in h["path"] for h in hits)
    # vectors from any other model are refused: a plain backbone, or another checkpoint
    r = runner.invoke(cli, ["index", str(shapes), "--index", str(index), "--model", "resnet18", "--weights", "random", "-q"])
    assert r.exit_code == 1 and "was built with" in r.output
    other = tmp_path / "other.pt"
    other.write_bytes(out.read_bytes())
    r = runner.invoke(cli, ["index", str(shapes), "--index", str(index), "--weights", str(other), "-q"])
    assert r.exit_code == 1 and "was built with" in r.output


# -- freezing ----------------------------------------------------------------------------------


def _states(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> set[str]:
    keys = [k for k in before if k.startswith(prefix) and not k.endswith("num_batches_tracked")]
    assert keys, prefix
    return {k for k in keys if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("unfreeze, freeze_all_bn, cache_trunk", [(1, False, False), (2, True, False), (1, False, True)])
def test_finetune_changes_only_the_unfrozen_stages(
    shapes: Path, tmp_path: Path, unfreeze: int, freeze_all_bn: bool, cache_trunk: bool
):
    before = _states(create_model("resnet18", "random", seed=0))
    out = tmp_path / "ft.pt"
    summary = train(
        shapes, out,
        config(
            phases="finetune", epochs=1, unfreeze=unfreeze, freeze_all_bn=freeze_all_bn, val_fraction=0.0,
            lr_backbone=1e-3, cache_trunk=cache_trunk,
        ),
    )
    assert summary.best_phase == "finetune"
    after = {k: v for k, v in load_checkpoint(out)["backbone"]["state_dict"].items()}
    for frozen in ("conv1.", "bn1.", "layer1.", "layer2.") + (() if unfreeze == 2 else ("layer3.",)):
        assert _changed(before, after, frozen) == set(), frozen  # weights and BatchNorm statistics
    for trained_stage in ("layer4.",) + (("layer3.",) if unfreeze == 2 else ()):
        changed = _changed(before, after, trained_stage)
        assert f"{trained_stage}1.conv2.weight" in changed and f"{trained_stage}0.bn1.weight" in changed
        stats = {k for k in changed if "running_" in k}
        if freeze_all_bn:
            assert stats == set()  # statistics frozen everywhere, affine parameters still trained
        else:
            assert f"{trained_stage}1.bn2.running_mean" in stats


def test_finetune_that_does_not_help_keeps_the_head_phase_state(shapes: Path, tmp_path: Path):
    # a learning rate this large wrecks layer4; validation notices and the head-phase state is kept
    out = tmp_path / "m.pt"
    summary = train(shapes, out, config(phases="both", epochs=2, lr_backbone=1.0, lr_head=1e-3, dim=64))
    ft = [r for r in summary.history if r.phase == "finetune"]
    assert ft and not any(r.best for r in ft)
    assert summary.best_phase == "head"
    before = _states(create_model("resnet18", "random", seed=0))
    after = load_checkpoint(out)["backbone"]["state_dict"]
    assert _changed(before, after, "layer4.") == set()  # the initial layer4 was restored


# -- data and bad inputs -----------------------------------------------------------------------


def test_bad_inputs_are_reported_before_training(tmp_path: Path):
    data = make_labelled(tmp_path / "d", n=8, classes=3)
    (data / "empty").mkdir()
    make_image(data / "lonely" / "only.png", size=(72, 64), shape="ellipse", color=(9, 9, 9))
    (data / "ellipse" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (data / "triangle" / "empty.png").write_bytes(b"")
    rec = Recorder()
    summary = train(data, tmp_path / "m.pt", config(phases="head", epochs=1), callback=rec)
    assert summary.unreadable == 2
    assert summary.classes == 4  # ellipse, rectangle, triangle, lonely; "empty" skipped
    text = "\n".join(summary.warnings)
    assert "'empty' has no images" in text
    assert "single image ('lonely')" in text
    assert "2 unreadable image(s) skipped" in text
    assert rec.events[0] == "extract:27" and "phase:head" in rec.events


def test_single_class_and_too_large_dim_fail_before_any_work(tmp_path: Path):
    data = make_labelled(tmp_path / "one", n=4, classes=1)
    rec = Recorder()
    with pytest.raises(InputError, match="at least 2 classes"):
        train(data, tmp_path / "m.pt", config(), callback=rec)
    assert not any(e.startswith("phase:") for e in rec.events)
    assert not (tmp_path / "m.pt").exists()
    rec = Recorder()
    with pytest.raises(InputError, match="larger than resnet18's 512-d"):
        train(data, tmp_path / "m.pt", config(dim=1024), callback=rec)
    assert rec.events == []  # refused before even reading the images
    # a class whose only images are unreadable disappears; what is left is one class
    two = make_labelled(tmp_path / "two", n=3, classes=1)
    (two / "bad").mkdir()
    (two / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="at least 2 classes"):
        train(two, tmp_path / "m.pt", config())


def test_cli_train_errors_are_one_line(tmp_path: Path):
    data = make_labelled(tmp_path / "d", n=3, classes=2)
    r = CliRunner().invoke(
        cli, ["train", str(data), "--out", str(tmp_path / "m.pt"), "--model", "resnet18", "--weights", "random", "--dim", "4096", "-q"]
    )
    assert r.exit_code == 1 and "Error: --dim 4096 is larger than resnet18's 512-d" in r.output
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "nope"), "--out", str(tmp_path / "m.pt")])
    assert r.exit_code == 2


def test_csv_input_and_splits(tmp_path: Path):
    data = make_labelled(tmp_path / "d", n=6, classes=3)
    csv = tmp_path / "labels.csv"
    rows = ["path,label"] + [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(data.rglob("*.png"))]
    csv.write_text("\n".join(rows) + "\n")
    from_csv, from_dir = load_labelled(csv), load_labelled(data)
    assert from_csv.class_names == from_dir.class_names
    assert [Path(p).resolve() for p in from_csv.paths] == [Path(p).resolve() for p in from_dir.paths]
    assert list(from_csv.labels) == list(from_dir.labels)
    tr, va = split_by_image(from_dir.labels, 0.34, seed=0)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == 18
    assert all((from_dir.labels[va] == c).sum() == 2 for c in range(3))  # 2 of 6 per class
    tr, va, names = split_by_class(from_dir.labels, from_dir.class_names, "rectangle")
    assert names == ["rectangle"] and set(from_dir.labels[va]) == {from_dir.class_names.index("rectangle")}
    with pytest.raises(InputError):
        split_by_class(from_dir.labels, from_dir.class_names, "2")  # would leave 1 training class


def test_cli_train_then_eval_json(tmp_path: Path):
    data = make_labelled(tmp_path / "d", n=6, classes=3)
    out = tmp_path / "m.pt"
    runner = CliRunner()
    r = runner.invoke(
        cli,
        ["train", str(data), "--out", str(out), "--model", "resnet18", "--weights", "random", "--dim", "16",
         "--epochs", "1", "--phases", "both", "--loss", "arcface", "--image-size", "64", "--workers", "0",
         "--val-classes", "1", "--batch-size", "8", "-q", "--json"],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["val_images"] == 6 and len(summary["val_classes"]) == 1 and summary["classes"] == 3
    # the frozen backbone, the head's LDA start (epoch 0, competing with what training makes), 1 epoch each
    assert [(h["phase"], h["epoch"]) for h in summary["history"]] == [("frozen", 0), ("head", 0), ("head", 1), ("finetune", 1)]
    r = runner.invoke(cli, ["eval", str(data), "--weights", str(out), "--workers", "0", "-q", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["model"]["dim"] == 16 and res["n_images"] == 18 and res["classes"] == 3
    assert set(res["metrics"]) >= {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi"}
    r = runner.invoke(cli, ["eval", str(data), "--weights", str(out), "--gallery", str(data), "--workers", "0", "-q"])
    assert r.exit_code == 0 and "R@1" in r.output and "against" in r.output


# -- gray-level models -------------------------------------------------------------------------


def test_adapted_first_conv_sums_rgb_filters_and_matches_replication():
    rgb = create_model("resnet18", "random", seed=0)
    rgb.preprocessing = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # one mean: exact equality
    w = rgb.backbone.conv1.weight.detach().clone()
    gray = adapt_first_conv_to_gray(create_model("resnet18", "random", seed=0))
    assert gray.backbone.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.allclose(gray.backbone.conv1.weight, w.sum(1, keepdim=True))
    m = sum((0.485, 0.456, 0.406)) / 3
    assert gray.preprocessing.mean == pytest.approx((m, m, m))
    gray.preprocessing = rgb.preprocessing
    g = torch.rand(2, 1, 64, 64)
    x = (g.expand(-1, 3, -1, -1) - 0.5) / 0.25  # a gray image, replicated and normalised
    with torch.no_grad():
        assert torch.allclose(rgb(x), gray(x), atol=1e-5)


def test_train_gray_model_with_adapted_conv(tmp_path: Path):
    data = make_labelled(tmp_path / "d", n=6, classes=2)
    out = tmp_path / "gray.pt"
    train(data, out, config(in_chans=1, adapt_first_conv=True, phases="both", epochs=1, val_fraction=0.0))
    model = create_model("resnet18", str(out))
    assert model.in_chans == 1 and model.conv_in == 1 and model.backbone.conv1.in_channels == 1
    img = Image.open(next(data.rglob("*.png"))).convert("RGB")
    gray = img.convert("L").convert("RGB")
    from simsearch.embed import Embedder

    e = Embedder(model, device="cpu", workers=0)
    a, b = e.embed_images([img, gray])
    assert float(a @ b) > 0.999  # a colour image embeds (almost) as its gray version
    with pytest.raises(InputError, match="--adapt-first-conv needs --in-chans 1"):
        train(data, tmp_path / "x.pt", config(adapt_first_conv=True))


def test_damaged_checkpoint_is_a_weights_error(trained: tuple[Path, Any], tmp_path: Path):
    out, _ = trained
    state = torch.load(out, weights_only=True)
    del state["head"]
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(WeightsError, match="damaged or incompatible"):
        create_model("resnet18", str(bad))
    state = torch.load(out, weights_only=True)
    state["backbone"]["name"] = "no_such_net"
    torch.save(state, bad)
    with pytest.raises(WeightsError, match="not available here"):
        create_model("resnet18", str(bad))


def test_seeded_training_is_reproducible(shapes: Path, tmp_path: Path):
    a = train(shapes, tmp_path / "a.pt", config(phases="head", epochs=2, loss="triplet"))
    b = train(shapes, tmp_path / "b.pt", config(phases="head", epochs=2, loss="triplet"))
    assert [r.loss for r in a.history] == [r.loss for r in b.history]
    ha = load_checkpoint(tmp_path / "a.pt")["head"]["state_dict"]
    hb = load_checkpoint(tmp_path / "b.pt")["head"]["state_dict"]
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    assert np.isfinite([r.loss for r in a.history if r.loss is not None]).all()


# -- cached augmented views, warm-up and layer-wise learning rates ------------------------------


def test_cached_views_are_augmented_trunk_activations(shapes: Path):
    from simsearch.labelled import load_labelled
    from simsearch.models import split_backbone
    from simsearch.train.callbacks import TrainCallback
    from simsearch.train.feature_cache import augmented_views, scan

    cfg = config(cache_trunk=True, views=3, unfreeze=1)
    model = create_model("resnet18", "random", seed=0)
    model.preprocessing = Preprocessing(resize_size=72, crop_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    trunk, top = split_backbone(model, 1)
    data = load_labelled(shapes)
    centre, bad = scan(model, trunk, top, data, torch.device("cpu"), cfg, 0, TrainCallback(), features=True, trunk_acts=True)
    assert centre is not None and centre.trunk is not None and not bad
    views = augmented_views(model, trunk, data, torch.device("cpu"), cfg, 0, TrainCallback())
    assert views.shape == (len(data), 3, *centre.trunk.shape[1:]) and views.dtype == torch.float16
    # every view is another draw of the augmentation: none equals the centre crop or another view
    for v in range(3):
        assert not torch.equal(views[:, v], centre.trunk)
    assert not torch.equal(views[:, 0], views[:, 1])
    # and each is what the trunk computes for an image: pooled by the top it gives features of the
    # same scale as the centre crops' (a view is a real input, not noise)
    with torch.no_grad():
        f = top(views[:, 0].float())
    ratio = float(f.norm(dim=1).mean() / centre.features.norm(dim=1).mean())
    assert 0.5 < ratio < 2.0


def test_finetune_on_cached_views_changes_only_the_top(shapes: Path, tmp_path: Path):
    before = _states(create_model("resnet18", "random", seed=0))
    out = tmp_path / "views.pt"
    summary = train(
        shapes, out,
        config(phases="both", epochs=2, unfreeze=1, lr_backbone=1e-3, cache_trunk=True, views=2, warmup=1.0, lr_decay=0.5),
    )
    assert "views" in summary.phase_seconds and summary.phase_seconds["views"] > 0
    assert any(r.phase == "finetune" and r.loss is not None for r in summary.history)
    after = load_checkpoint(out)["backbone"]["state_dict"]
    for frozen in ("conv1.", "layer1.", "layer2.", "layer3."):
        assert _changed(before, after, frozen) == set(), frozen


def test_optimizer_warmup_cosine_and_layerwise_rates():
    from torch import nn

    from simsearch.train.losses import make_loss
    from simsearch.train.phases import make_optimizer

    cfg = config(lr_head=1e-3, lr_backbone=1e-4, lr_decay=0.5, weight_decay=0.0)
    head = nn.Linear(4, 4)
    top, below = nn.Linear(4, 4), nn.Linear(4, 4)
    opt, sched = make_optimizer(cfg, head, make_loss("supcon", 3, 4), [list(top.parameters()), list(below.parameters())], 20, 4)
    base = [g["initial_lr"] for g in opt.param_groups]
    assert base == pytest.approx([1e-3, 1e-4, 5e-5])
    seen = []
    for _ in range(20):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    expect = []
    for step in range(20):
        ramp = (step + 1) / 5 if step < 4 else 1.0
        cosine = 0.5 * (1 + np.cos(np.pi * max(step - 4, 0) / 16))
        expect.append([b * ramp * cosine for b in base])
    assert np.allclose(seen, expect, rtol=1e-9, atol=0)
    assert seen[4] == pytest.approx(base)  # the peak, right after the warm-up
    assert max(s[1] for s in seen) == pytest.approx(1e-4)


def test_bad_views_warmup_and_decay_are_refused(shapes: Path, tmp_path: Path):
    for bad in (dict(views=-1), dict(warmup=5.0, epochs=2), dict(lr_decay=0.0), dict(lr_decay=1.5)):
        with pytest.raises(InputError):
            train(shapes, tmp_path / "m.pt", config(**bad))


def test_a_later_phase_must_win_by_two_standard_errors_and_patience_counts_within_a_phase():
    from torch import nn

    from simsearch.train.early_stopping import SWITCH_SE, BestState, EarlyStopping

    head, top = nn.Linear(2, 2), nn.Linear(2, 2)
    best = BestState(head, top, per_phase=True)
    stop = EarlyStopping(patience=2)

    def m(map_r: float, se: float = 0.01, r1: float = 0.9) -> dict[str, float]:
        return {"recall@1": r1, "map@r": map_r, "map@r_se": se}

    assert best.consider("head", 0, m(0.80)) and best.phase == "head"
    assert best.consider("head", 1, m(0.805))  # within a phase any gain counts
    best.start_finetuning()
    # below the head's state: not kept, but the phase's first epoch is its own best so far
    assert not best.consider("finetune", 1, m(0.79)) and best.phase_improved
    assert not stop.should_stop("finetune", best.phase_improved)
    # better than the head by less than SWITCH_SE standard errors: still not kept
    assert not best.consider("finetune", 2, m(0.805 + (SWITCH_SE - 0.5) * 0.01)) and best.phase_improved
    assert not stop.should_stop("finetune", best.phase_improved)
    # a clear win takes over; from then on the fine-tuning phase compares with itself
    assert best.consider("finetune", 3, m(0.805 + (SWITCH_SE + 0.5) * 0.01)) and best.phase == "finetune"
    assert best.consider("finetune", 4, m(0.831)) and best.epoch == 4
    assert not best.consider("finetune", 5, m(0.82)) and not best.phase_improved
    assert not stop.should_stop("finetune", best.phase_improved)
    assert not best.consider("finetune", 6, m(0.83)) and not best.phase_improved
    assert stop.should_stop("finetune", best.phase_improved)  # two epochs without a gain in the phase
    assert best.metrics is not None and best.metrics["map@r"] == 0.831


def test_map_at_r_standard_error_matches_numpy():
    from simsearch.evaluate import retrieval_metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 60)
    x = rng.normal(size=(60, 8)) + 2.0 * np.eye(8)[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    m = retrieval_metrics(x.astype(np.float32), labels, nmi=False)
    aps = []
    for i in range(60):
        sims = x @ x[i]
        sims[i] = -np.inf
        order = np.argsort(-sims, kind="stable")
        r = int((labels == labels[i]).sum()) - 1
        rel = labels[order[:r]] == labels[i]
        prec = np.cumsum(rel) / np.arange(1, r + 1)
        aps.append(float((prec * rel).sum()) / r)
    assert m.map_at_r == pytest.approx(np.mean(aps), abs=1e-9)
    assert m.map_at_r_se == pytest.approx(np.std(aps, ddof=1) / np.sqrt(60), rel=1e-6)


# -- the joined (ensemble) model -----------------------------------------------------------------


def test_both_phases_keep_the_fine_tuned_model_joined_with_the_head_only_one(shapes: Path, tmp_path: Path):
    """No validation set: the pair is kept. Its embedding is the two phase models' embeddings,
    weighted and concatenated, whether computed in one pass (the twin on the shared trunk) or by
    the two phase checkpoints; index and classify see its full dim."""
    from simsearch.models.checkpoint import head_classes

    out = tmp_path / "m.pt"
    summary = train(shapes, out, config(phases="both", epochs=1, val_fraction=0.0, unfreeze=1, ensemble=0.6,
                                        phase_checkpoints=True))
    assert summary.best_phase == "ensemble" and summary.dim == 64
    state = load_checkpoint(out)
    assert state["dim"] == 64 and state["twin"]["weight"] == 0.6 and state["twin"]["stages"] == 1
    names, proxies, _ = head_classes(state, out)
    assert proxies.shape == (len(names), 64)
    np.testing.assert_allclose(np.linalg.norm(proxies, axis=1), 1.0, atol=1e-5)

    joined = create_model("resnet18", str(out))
    head_only = create_model("resnet18", summary.head_checkpoint)
    tuned = create_model("resnet18", summary.finetune_checkpoint)
    assert joined.dim == 64 and joined.describe()["dim"] == 64
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        got = joined(x)
        want = torch.cat([tuned(x) * 0.6**0.5, head_only(x) * 0.4**0.5], dim=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    # the twin's top is the pretrained one (as the head phase had it); the main top was fine-tuned
    from simsearch.models import split_backbone

    pretrained = split_backbone(create_model("resnet18", "random", seed=0), 1)[1].state_dict()
    assert state["twin"]["top"].keys() == pretrained.keys()
    assert all(torch.equal(state["twin"]["top"][k], pretrained[k]) for k in pretrained)
    fine = split_backbone(tuned, 1)[1].state_dict()
    assert any(not torch.equal(fine[k], pretrained[k]) for k in pretrained if k.endswith("conv1.weight"))


def test_ensemble_zero_keeps_one_model(shapes: Path, tmp_path: Path):
    summary = train(shapes, tmp_path / "m.pt", config(phases="both", epochs=1, val_fraction=0.0, unfreeze=1, ensemble=0.0))
    assert summary.best_phase in ("head", "finetune") and summary.dim == 32
    assert "twin" not in load_checkpoint(tmp_path / "m.pt")
    with pytest.raises(InputError, match="--ensemble"):
        TrainConfig(model="resnet18", ensemble=1.0).check()
