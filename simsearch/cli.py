"""The ``simsearch`` command line: each command parses options, calls one library function, renders.

Results go to stdout (a table, or JSON with ``--json``); progress bars, warnings and skipped files
go to stderr. Library errors (:class:`SimsearchError`) become one-line messages with exit code 1;
usage errors exit 2.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import SimsearchError
from .images import DEFAULT_MAX_PIXELS
from .store import INDEX_ENV_VAR, default_index_dir

log = logging.getLogger("simsearch")


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Translate library errors into click's one-line error and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SimsearchError as exc:
            raise click.ClickException(str(exc)) from exc
        except sqlite3.Error as exc:  # e.g. "database is locked" while another run holds it too long
            raise click.ClickException(f"index database error: {exc}") from exc
        except BrokenPipeError:
            raise
        except OSError as exc:  # permissions, a file where a folder should be, a full disk
            raise click.ClickException(str(exc)) from exc

    return wrapper


def index_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--index",
        "index_dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=INDEX_ENV_VAR,
        default=None,
        show_envvar=True,
        help="Index directory [default: ./index_data].",
    )(fn)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")(fn)


def quiet_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-q", "--quiet", is_flag=True, help="No progress bar.")(fn)


def device_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help="Where to run the model (auto picks CUDA when present).",
    )(fn)


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--seed", type=int, default=0, show_default=True, help="Seed for --weights random.")(fn)
    fn = click.option(
        "--weights",
        default="imagenet",
        show_default=True,
        help="imagenet (torchvision's cache), random (seeded), or a path to a state dict / simsearch checkpoint.",
    )(fn)
    fn = click.option("--model", default="resnet50", show_default=True, help="Backbone (see: simsearch models).")(fn)
    return fn


def _dump(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


class TqdmProgress:
    """Progress bar on stderr (images/s), or nothing with --quiet."""

    def __init__(self, desc: str, quiet: bool) -> None:
        self.desc = desc
        self.quiet = quiet
        self.bar: Any = None

    def start(self, total: int) -> None:
        if not self.quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="img", file=sys.stderr, dynamic_ncols=True)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="simsearch")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def cli(verbose: int) -> None:
    """Image similarity search: index a folder, query by example, cluster the collection."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


@cli.command()
@click.argument("folders", nargs=-1, type=click.Path(exists=True, path_type=Path))
@index_option
@model_options
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip paths matching this glob (repeatable).")
@click.option("--rebuild", is_flag=True, help="Drop the index and start over (needed to change model).")
@click.option("--repair", is_flag=True, help="Bring FAISS back in step with the catalog from stored vectors.")
@click.option("--show-failed", is_flag=True, help="List the files that could not be indexed, and stop.")
@device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per forward pass [default: 32 CPU, 256 CUDA].")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Decoding processes [default: CPU count, at most 8].")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True, help="Refuse images larger than this (decompression-bomb limit).")
@click.option("--decode", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True, help="JPEG decoder: gpu (nvJPEG; needs CUDA), cpu (Pillow), auto (gpu when the model runs on CUDA).")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model (slow start, faster on long runs).")
@json_option
@quiet_option
@handle_errors
def index(
    folders: tuple[Path, ...],
    index_dir: Path | None,
    model: str,
    weights: str,
    seed: int,
    exclude: tuple[str, ...],
    rebuild: bool,
    repair: bool,
    show_failed: bool,
    device: str,
    batch_size: int | None,
    workers: int | None,
    max_pixels: int,
    decode: str,
    compile_model: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Index the images under FOLDERS (recursively); re-running only embeds what changed."""
    from .indexer import EmbedOptions, failed_files, index_folders, repair_index

    index_dir = index_dir or default_index_dir()
    if show_failed:
        _render_failed(failed_files(index_dir), as_json)
        return
    if not folders:
        if repair:
            summary = repair_index(index_dir)
            _dump(summary.to_dict()) if as_json else click.echo(
                f"repaired {summary.repaired} ids; {summary.total_indexed} images indexed in {index_dir}"
            )
            return
        raise click.UsageError("give at least one FOLDER to index (or --repair / --show-failed)")
    options = EmbedOptions(
        model=model, weights=weights, seed=seed, device=device, batch_size=batch_size, workers=workers, max_pixels=max_pixels,
        decode=decode, compile=compile_model
    )
    summary = index_folders(
        folders, index_dir, options, exclude=exclude, rebuild=rebuild, progress=TqdmProgress("indexing", quiet)
    )
    if as_json:
        _dump(summary.to_dict())
        return
    click.echo(
        f"added {summary.added}, updated {summary.updated}, moved {summary.moved}, removed {summary.removed}, "
        f"unchanged {summary.unchanged}, failed {summary.failed}"
        + (f", repaired {summary.repaired}" if summary.repaired else "")
    )
    rate = f" ({summary.images_per_second:.1f} images/s)" if summary.embedded else ""
    click.echo(
        f"{summary.total_indexed} images indexed, {summary.total_failed} failed, in {index_dir} "
        f"[{summary.seconds:.1f}s{rate}]"
    )
    if summary.failed:
        click.echo("see the failures with: simsearch index --show-failed", err=True)


def _render_failed(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        _dump(rows)
        return
    for row in rows:
        click.echo(f"{row['path']}\t{row['error']}")


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@index_option
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours per query.")
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=None, help="Only results with cosine similarity at least this.")
@click.option("--include-self", is_flag=True, help="Keep an indexed query image in its own results.")
@device_option
@json_option
@handle_errors
def query(
    images: tuple[Path, ...],
    index_dir: Path | None,
    top_k: int,
    threshold: float | None,
    include_self: bool,
    device: str,
    as_json: bool,
) -> None:
    """Find the indexed images most similar to each example IMAGE."""
    from .search import query_images

    results = query_images(
        images, index_dir or default_index_dir(), k=top_k, threshold=threshold, include_self=include_self, device=device
    )
    if as_json:
        _dump([r.to_dict() for r in results])
        return
    for n, result in enumerate(results):
        if n:
            click.echo()
        click.echo(f"query: {result.query}")
        if not result.results:
            click.echo("  (no results)")
        for hit in result.results:
            size = f"{hit.width}x{hit.height}" if hit.width else "?"
            click.echo(f"  {hit.rank:>3}  {hit.score:7.4f}  {size:>11}  {hit.path}")


@cli.command()
@index_option
@click.option("-k", "--clusters", "k", type=click.IntRange(min=1), default=None, help="Number of clusters.")
@click.option("--niter", type=click.IntRange(min=1), default=25, show_default=True, help="k-means iterations.")
@click.option("--seed", type=int, default=1234, show_default=True, help="k-means seed.")
@click.option("-r", "--representatives", type=click.IntRange(min=0), default=5, show_default=True, help="Images shown per cluster.")
@click.option("--show", "show", type=int, default=None, metavar="C", help="List every member of cluster C (from the last run).")
@json_option
@handle_errors
def cluster(
    index_dir: Path | None, k: int | None, niter: int, seed: int, representatives: int, show: int | None, as_json: bool
) -> None:
    """Group the indexed images into k clusters (k-means); show a stored clustering without -k."""
    from .cluster import cluster_index, cluster_members, load_clusters

    index_dir = index_dir or default_index_dir()
    if show is not None:
        members = cluster_members(index_dir, show)
        if as_json:
            _dump([m.__dict__ for m in members])
        else:
            for m in members:
                click.echo(f"{m.distance:.4f}\t{m.path}")
        return
    result = (
        cluster_index(index_dir, k, niter=niter, seed=seed, representatives=representatives)
        if k is not None
        else load_clusters(index_dir, representatives)
    )
    if as_json:
        _dump(result.to_dict())
        return
    click.echo(f"{result.k} clusters of {result.n} images (seed {result.seed}, {result.niter} iterations, {result.created_at})")
    for c in sorted(result.clusters, key=lambda c: -c.size):
        click.echo(f"cluster {c.cluster}: {c.size} images")
        for m in c.representatives:
            click.echo(f"    {m.distance:.4f}  {m.path}")


@cli.command()
@index_option
@click.option("--failed", is_flag=True, help="List the files that could not be indexed.")
@json_option
@handle_errors
def info(index_dir: Path | None, failed: bool, as_json: bool) -> None:
    """Where the index is, what model made it, what it holds."""
    from .indexer import failed_files
    from .store import index_info

    index_dir = index_dir or default_index_dir()
    if failed:
        _render_failed(failed_files(index_dir), as_json)
        return
    data = index_info(index_dir)
    if as_json:
        _dump(data)
        return
    prep = data["preprocessing"] or {}
    clustering = data["last_clustering"]
    lines = [
        ("index", data["index"]),
        ("model", f"{data['model']} ({data['weights']})"),
        ("dim", data["dim"]),
        ("input", f"resize {prep.get('resize_size')}, crop {prep.get('crop_size')}" if prep else None),
        ("indexed", data["indexed"]),
        ("failed", data["failed"]),
        ("consistent", "yes" if data["consistent"] else "NO - run: simsearch index --repair"),
        ("size on disk", _human_bytes(data["size_bytes"])),
        ("updated", data["updated_at"]),
        ("clustered", f"k={clustering['k']} at {clustering['created_at']}" if clustering else "never"),
    ]
    for key, value in lines:
        click.echo(f"{key:>13}: {value}")


@cli.command()
@json_option
def models(as_json: bool) -> None:
    """List the backbones simsearch knows, with their embedding dims."""
    from .models import available_models, get_spec

    rows = [{"model": name, "dim": get_spec(name).dim, "crop": get_spec(name).preprocessing.crop_size} for name in available_models()]
    if as_json:
        _dump(rows)
        return
    for row in rows:
        click.echo(f"{row['model']:<20} {row['dim']:>5}-d  {row['crop']}px")


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
