"""Combining the head-only and the fine-tuned model of one ``bench_train.py`` run, without training.

``bench_train.py`` writes the head phase's model (``model.head.pt``) and the fine-tuned one
(``model.finetune.pt``) of a run. Fine-tuning gains on the classes it was trained on and loses on
classes it never saw. Two ways to combine the two, measured on the run's own evaluation set:

* **weight interpolation** (WiSE-FT, Wortsman et al. 2022): one model whose trained weights (the
  fine-tuned top stages, their head) are ``(1 - a) * head-phase + a * fine-tuned``; ``a`` = 0 is the
  head-only model, 1 the fine-tuned one. Same cost and dim as either.
* **output ensemble**: both models' L2-normalised embeddings, concatenated with weights
  ``sqrt(1 - w)`` and ``sqrt(w)`` (a unit vector whose cosine is ``(1 - w) * head + w * fine-tuned``
  cosine). Twice the dim; the frozen trunk is shared, so the cost is the top stages twice.

    python benchmarks/bench_ensemble.py RUN_DIR... [--instance CALTECH_ROOT] [--cache DIR] [--on dev]

``RUN_DIR`` is a ``bench_train.py --out`` folder: its ``results.json`` says the protocol, data and
stages. ``--cache DIR`` keeps the frozen pass over the evaluation images (one per protocol; the
seeds of a protocol share it). Prints Recall@1/2/4/8, MAP@R (with its standard error), NMI and the
instance-level Recall@1 of each setting.

``--on dev`` measures the joined model's weight on the run's **development** data instead of its
test data, to choose the weight without looking at the test: for ``grocery-seen``, the Grocery
``val.txt`` photos (never trained on, not in the test) as queries against the ``train.txt`` photos;
for ``grocery-unseen`` and ``caltech``, the run's held-out validation classes, leave-one-out (never
trained on; they chose the epochs kept). The weights run from 0 (the head-only model) to 1 (the
fine-tuned one) in steps of 0.1 (``--weights`` to change). Given several runs, it also prints each
weight's Recall@1 and MAP@R averaged over them, and the weight each average prefers: how the
default ``--ensemble`` was chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_train as bt  # noqa: E402

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
WEIGHTS = (0.3, 0.5, 0.6, 0.7)
DEV_WEIGHTS = tuple(i / 10 for i in range(11))  # 0: the head-only model, 1: the fine-tuned one


def dev_set(args: dict[str, Any], summary: dict[str, Any]) -> Any:
    """The run's development data: images no phase trained on and the test never uses."""
    proto = args["protocol"]
    if proto == "grocery-seen":
        root = bt.grocery_root(Path(args["data"]))
        return bt.EvalSet(bt.grocery_list(root, "val"), bt.grocery_list(root, "train"))
    held = set(summary["val_classes"])
    if not held:
        raise SystemExit(f"{proto} run without held-out validation classes: no development set")
    train_items = bt.PROTOCOLS[proto](Path(args["data"]), args.get("limit_per_class"))[0]
    return bt.EvalSet([it for it in train_items if it[1] in held])


def frozen_passes(name: str, eval_set: Any, base: Any, cut: int, cache: Path | None) -> dict[str, Any]:
    import torch

    path = cache / f"{name}.pt" if cache else None
    if path is not None and path.exists():
        return torch.load(path, weights_only=False)
    args = argparse.Namespace(device="cpu", workers=2)
    out = {}
    for side, items in (("queries", eval_set.queries), ("gallery", eval_set.gallery)):
        if items is not None:
            out[side] = bt.frozen_pass(base, cut, items, args, f"{name} {side}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


def interpolated(head_path: str, ft_path: str, a: float, dst: Path) -> str:
    """A checkpoint whose floating-point weights are ``(1 - a) * head-phase + a * fine-tuned``."""
    import torch

    h = torch.load(head_path, map_location="cpu", weights_only=False)
    ft = torch.load(ft_path, map_location="cpu", weights_only=False)

    def mix(x: dict[str, Any], y: dict[str, Any]) -> dict[str, Any]:
        return {k: ((1 - a) * x[k].float() + a * y[k].float()).to(y[k].dtype) if y[k].is_floating_point()
                else (y[k] if a >= 0.5 else x[k]) for k in y}

    out = dict(ft)
    out["backbone"] = dict(ft["backbone"], state_dict=mix(h["backbone"]["state_dict"], ft["backbone"]["state_dict"]))
    out["head"] = dict(ft["head"], state_dict=mix(h["head"]["state_dict"], ft["head"]["state_dict"]))
    torch.save(out, dst)
    return str(dst)


def metrics(embed: Any, passes: dict[str, Any], nmi: bool) -> dict[str, float]:
    from simsearch.evaluate import retrieval_metrics

    q = embed("queries")
    if "gallery" in passes:
        m = retrieval_metrics(q, passes["queries"][2], embed("gallery"), passes["gallery"][2], nmi=nmi, seed=0)
    else:
        m = retrieval_metrics(q, passes["queries"][2], nmi=nmi, seed=0)
    return m.to_dict()


def measure(run: Path, a: argparse.Namespace) -> tuple[str, dict[str, dict[str, Any]]]:
    """One run's rows (setting -> set name -> metrics), printed as a table; the evaluated set's name."""
    import torch

    from simsearch.models import create_model, join_embeddings

    info = json.loads((run / "results.json").read_text())
    args, cut = info["args"], int(info["unfreeze"])
    dev = a.on == "dev"
    if dev:
        eval_set = dev_set(args, info["train_summary"])
        proto = f"{args['protocol']}-dev" + ("" if args["protocol"] == "grocery-seen" else f"-seed{args['seed']}")
    else:
        eval_set = bt.PROTOCOLS[args["protocol"]](Path(args["data"]), args.get("limit_per_class"))[1]
        proto = args["protocol"]
    weights = tuple(a.weights) if a.weights else DEV_WEIGHTS if dev else WEIGHTS
    base = create_model(args["model"], args["weights"], seed=args["seed"])
    sets = {proto: eval_set}
    if a.instance:
        sets["instance"] = bt.instance_set(a.instance)
    passes = {name: frozen_passes(name, es, base, cut, a.cache) for name, es in sets.items()}
    head_ck, ft_ck = str(run / "model.head.pt"), str(run / "model.finetune.pt")

    def embedding(ck: str) -> dict[str, dict[str, Any]]:
        return {name: {side: bt.apply_checkpoint(ck, cut, *ps[side][:2], "cpu", True).numpy() for side in ps}
                for name, ps in passes.items()}

    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for alpha in (0.0, 1.0) if dev else ALPHAS:
            # the ends are the phase models themselves (what interpolating would write again)
            ck = {0.0: head_ck, 1.0: ft_ck}.get(alpha) or interpolated(head_ck, ft_ck, alpha, Path(tmp) / f"a{alpha}.pt")
            emb = embedding(ck)
            if alpha == 0.0:
                head_emb = emb
            if alpha == 1.0:
                ft_emb = emb
            if not dev:
                rows[f"interpolation a={alpha:g}"] = {
                    name: metrics(lambda side, n=name, e=emb: e[n][side], passes[name], nmi=name != "instance")
                    for name in passes
                }
    for w in weights:
        def joined(side: str, n: str, w: float = w) -> Any:  # what a trained model.pt computes (models.Twin)
            return join_embeddings(torch.from_numpy(ft_emb[n][side]), torch.from_numpy(head_emb[n][side]), w).numpy()

        rows[f"ensemble w={w:g}"] = {
            name: metrics(lambda side, n=name: joined(side, n), passes[name], nmi=name != "instance") for name in passes
        }
    print(f"{proto}, seed {args['seed']}, {run.name}: {len(eval_set.queries)} queries"
          + (f" against {len(eval_set.gallery)} gallery images" if eval_set.gallery else " (leave-one-out)"))
    print(f"{'':>22} {'R@1':>6} {'R@2':>6} {'R@4':>6} {'R@8':>6} {'MAP@R':>6} {'(se)':>7} {'NMI':>6}  instance R@1")
    for label, r in rows.items():
        m = r[proto]
        inst = f"{r['instance']['recall@1']:.4f}" if "instance" in r else ""
        print(f"{label:>22} {m['recall@1']:6.4f} {m['recall@2']:6.4f} {m['recall@4']:6.4f} {m['recall@8']:6.4f} "
              f"{m['map@r']:6.4f} {m['map@r_se']:7.4f} {m['nmi']:6.4f}  {inst}")
    if dev:
        scores = {label: r[proto] for label, r in rows.items()}
        for key in ("recall@1", "map@r"):
            print(f"best on this run's development data by {key}: {best_setting(scores, key)}")
    print(flush=True)
    return proto, rows


def best_setting(scores: dict[str, dict[str, float]], key: str) -> str:
    """The setting with the highest ``key`` (ties: the higher MAP@R, then the first listed)."""
    return max(scores, key=lambda label: (scores[label][key], scores[label]["map@r"]))


def pooled(results: list[tuple[str, dict[str, dict[str, Any]]]]) -> None:
    """Each weight's Recall@1 and MAP@R averaged over the runs, and the weight each average prefers."""
    labels = [label for label in results[0][1] if all(label in rows for _, rows in results)]
    mean = {label: {key: sum(rows[label][proto][key] for proto, rows in results) / len(results)
                    for key in ("recall@1", "map@r")} for label in labels}
    print(f"mean over {len(results)} runs ({', '.join(proto for proto, _ in results)})")
    print(f"{'':>22} {'R@1':>6} {'MAP@R':>6}")
    for label, m in mean.items():
        print(f"{label:>22} {m['recall@1']:6.4f} {m['map@r']:6.4f}")
    for key in ("recall@1", "map@r"):
        print(f"best mean {key}: {best_setting(mean, key)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="bench_train.py --out folders")
    p.add_argument("--instance", type=Path, default=None, help="Caltech-101 root: also Faces_easy -> Faces Recall@1")
    p.add_argument("--cache", type=Path, default=None, help="keep the frozen passes here")
    p.add_argument("--on", choices=("test", "dev"), default="test",
                   help="dev: the runs' development data (no test image), joined weights only, averaged over the runs")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="joined-model weights to measure")
    p.add_argument("--json-out", type=Path, default=None)
    a = p.parse_args()
    results = [measure(run, a) for run in a.runs]
    if len(results) > 1:
        pooled(results)
    if a.json_out:
        a.json_out.write_text(json.dumps({str(run): rows for run, (_, rows) in zip(a.runs, results)}, indent=1))


if __name__ == "__main__":
    main()
