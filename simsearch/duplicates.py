"""Near-duplicate groups of an index: the neighbour graph, grouping, keepers, and moving copies away.

Everything here works on the stored vectors and never imports torch, except where an image must
be embedded: checking new images against the index (:func:`check_images`) and calibrating a
threshold (:mod:`simsearch.calibrate`, run on first use).

- **The neighbour graph** (:func:`neighbour_graph`): the k most similar other vectors of every
  stored vector above the candidate threshold, found by comparing each vector with the vectors
  of its few nearest k-means cells in large matrix products, with exact scores from the stored
  vectors (read from the vector file; the FAISS file is not loaded). Memory is the float32
  vectors plus one cell's scores and the edges kept; never an N x N matrix.
- **Groups** (:func:`group_duplicates`): connected components of the graph (plus byte-identical
  files, always together) are only candidates. Inside each, images are taken in keeper order
  (``--keep``, ``--prefer``); the first one left becomes a keeper and takes every image left that
  is a duplicate *of the keeper itself* (cosine at or above the threshold, or, with verification,
  a candidate pair whose local features match under a homography; see :mod:`simsearch.verify`;
  a member's candidate neighbours are verified against the keeper too, whatever their cosine to
  it). So two different photos are never chained together through a series of near pairs.
- **Acting** (:func:`plan_moves`, :func:`apply_moves`): move every non-keeper under a folder
  outside the indexed folders, keeping its path relative to its indexed folder; a dry run unless
  applied; never deletes; a file changed since it was indexed is skipped with a warning.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import faiss
import numpy as np

from .errors import InputError
from .images import hash_file, is_under
from .store import IndexStore, utc_now

log = logging.getLogger(__name__)

KEEP_RULES = ("largest", "oldest", "newest", "shortest-path")
GRAPH_K = 10  # neighbours kept per image
CHUNK = 4096  # vectors read per step
CELL_SIZE = 256  # vectors per cell of the neighbour graph (see neighbour_graph)
PROBES = 6  # cells each vector is compared with (recall of pairs at cosine 0.9 in isotropic data: 3 cells 0.978, 6 0.997)
TILE = 2048  # query vectors per matrix product
PROJECTION_DIM = 64  # dimensions the cells are found in
TRAIN_PER_CELL = 16  # k-means sample per cell
VERIFY_MODES = ("auto", "on", "off")


# -- the neighbour graph ---------------------------------------------------------------------
@dataclass
class Graph:
    """Directed kNN edges ``src -> dst`` (row ids) with their cosine similarity, self-edges dropped."""

    src: np.ndarray
    dst: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.src)


def neighbour_graph(
    ids: np.ndarray,
    vectors: np.ndarray,
    k: int = GRAPH_K,
    min_score: float = -1.0,
    cells: int | None = None,
    probes: int = PROBES,
    seed: int = 0,
) -> Graph:
    """For each of the stored ``vectors`` (rows of an (n, d) float16 or float32 matrix, tagged with
    ``ids``), its ``k`` most similar others scoring at least ``min_score``, both ways (``a -> b``
    and ``b -> a``), with exact cosine scores.

    Why not N searches through an index: at a million vectors even an IVF search scans thousands of
    vectors per query in a loop (measured: 150 s for 100,000 on two cores, growing as N^1.5). A
    near copy sits next to its original, so the collection is cut into ``cells`` (k-means on a
    64-d random projection: cheap to train and assign), each vector is placed in the cell nearest to
    it and compared, as one matrix product, with the vectors placed in its ``probes`` nearest
    cells. Work is about ``probes * n * (n / cells) * d`` multiply-adds in BLAS products, and
    memory is the vectors plus one cell's scores. ``cells=1`` compares every pair (exact).
    Default cells: one per :data:`CELL_SIZE` vectors."""
    n = len(ids)
    empty = Graph(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if n < 2:
        return empty
    cells = max(1, min(cells or n // CELL_SIZE, n // 4)) if cells != 1 else 1
    probes = max(1, min(probes, cells))
    home, near = _cells(vectors, cells, probes, seed)
    by_home = np.argsort(home, kind="stable")
    home_start = np.searchsorted(home[by_home], np.arange(cells + 1))
    flat_near = near.ravel()
    by_near = np.argsort(flat_near, kind="stable")
    near_start = np.searchsorted(flat_near[by_near], np.arange(cells + 1))
    src_parts, dst_parts, score_parts = [], [], []
    for c in range(cells):
        members = by_home[home_start[c] : home_start[c + 1]]
        if len(members) == 0:
            continue
        queries = by_near[near_start[c] : near_start[c + 1]] // probes
        block = _float32(vectors[members])
        for s in range(0, len(queries), TILE):
            q = queries[s : s + TILE]
            scores = _float32(vectors[q]) @ block.T
            rows, cols = np.nonzero(scores >= min_score)
            a, b, sc = q[rows], members[cols], scores[rows, cols]
            keep = a != b
            src_parts.append(a[keep])
            dst_parts.append(b[keep])
            score_parts.append(sc[keep])
    if not src_parts:
        return empty
    a, b, sc = np.concatenate(src_parts), np.concatenate(dst_parts), np.concatenate(score_parts)
    lo, hi = np.minimum(a, b), np.maximum(a, b)  # a pair can be met from both sides and in several cells
    _, first = np.unique(lo.astype(np.int64) * n + hi, return_index=True)
    lo, hi, sc = lo[first], hi[first], sc[first].astype(np.float32)
    src, dst, score = np.concatenate([lo, hi]), np.concatenate([hi, lo]), np.concatenate([sc, sc])
    order = np.lexsort((-score, src))  # each vector's best first, then at most k of them
    src, dst, score = src[order], dst[order], score[order]
    starts = np.searchsorted(src, src, side="left")
    keep = np.arange(len(src)) - starts < k
    ids = np.asarray(ids, np.int64)
    return Graph(ids[src[keep]], ids[dst[keep]], score[keep])


def _float32(x: np.ndarray) -> np.ndarray:
    """float16 rows widened through FAISS's vectorised decoder (numpy's cast is ~20x slower)."""
    if x.dtype == np.float32:
        return np.ascontiguousarray(x)
    n, d = x.shape
    if n == 0:
        return np.zeros((0, d), np.float32)
    sq = faiss.ScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16)
    return sq.decode(np.ascontiguousarray(x).view(np.uint8).reshape(n, 2 * d))


def _cells(vectors: np.ndarray, cells: int, probes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(each vector's nearest cell, its ``probes`` nearest cells (n, probes)), by k-means on a
    random projection of a seeded sample."""
    n, d = vectors.shape
    if cells == 1:
        return np.zeros(n, np.int64), np.zeros((n, 1), np.int64)
    rng = np.random.default_rng(seed)
    sample = _float32(vectors[np.sort(rng.choice(n, size=min(n, max(TRAIN_PER_CELL * cells, 10_000)), replace=False))])
    mean = sample.mean(axis=0)
    # a seeded random projection (Johnson-Lindenstrauss): near vectors stay near, which is all the
    # cells need (scores are exact); an eigendecomposition for PCA took 14 s on the loaded CPU
    project = (rng.standard_normal((d, min(PROJECTION_DIM, d))) / np.sqrt(min(PROJECTION_DIM, d))).astype(np.float32)
    kmeans = faiss.Kmeans(project.shape[1], cells, niter=10, seed=seed, verbose=False, min_points_per_centroid=TRAIN_PER_CELL)
    kmeans.train((sample - mean) @ project)
    quantizer = faiss.IndexFlatL2(project.shape[1])
    quantizer.add(kmeans.centroids)
    near = np.empty((n, probes), np.int64)
    for s in range(0, n, 65536):
        _, near[s : s + 65536] = quantizer.search((_float32(vectors[s : s + 65536]) - mean) @ project, probes)
    return near[:, 0].copy(), near


# -- grouping --------------------------------------------------------------------------------
@dataclass
class DuplicateMember:
    """One image of a group; ``score`` is its cosine similarity to the group's keeper."""

    path: str
    score: float
    identical: bool
    verified: bool
    width: int | None
    height: int | None
    size: int | None
    mtime_ns: int | None
    id: int


@dataclass
class DuplicateGroup:
    keeper: DuplicateMember
    duplicates: list[DuplicateMember] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def member(m: DuplicateMember, keeper: bool) -> dict[str, Any]:
            d = {k: v for k, v in asdict(m).items() if k != "id"}
            d["keeper"] = keeper
            return d

        return {
            "keeper": self.keeper.path,
            "members": [member(self.keeper, True)] + [member(m, False) for m in self.duplicates],
        }


def keeper_key(keep: str, prefer: Sequence[str] = ()) -> Callable[[Any], tuple]:
    """Sort key putting the best keeper first (rows of the catalog: size, mtime, width, height, path)."""
    if keep not in KEEP_RULES:
        raise InputError(f"--keep must be one of {', '.join(KEEP_RULES)}, not {keep!r}")
    folders = [os.path.join(os.path.abspath(p), "") for p in prefer]

    def rule(row: Any) -> tuple:
        if keep == "largest":
            return (-((row.width or 0) * (row.height or 0)), -(row.size or 0))
        if keep == "oldest":
            return (row.mtime_ns or 0,)
        if keep == "newest":
            return (-(row.mtime_ns or 0),)
        return (len(row.path), row.path)

    def key(row: Any) -> tuple:
        preferred = any(row.path.startswith(f) for f in folders)
        return (0 if preferred else 1,) + rule(row) + (row.id,)

    return key


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(a, a) != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        self.parent.setdefault(a, a)
        self.parent.setdefault(b, b)
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def components(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for a in list(self.parent):
            out.setdefault(self.find(a), []).append(a)
        return [sorted(c) for c in out.values() if len(c) > 1]


PairCheck = Callable[[Any, Any], bool]


def group_duplicates(
    graph: Graph,
    identical: Iterable[Sequence[int]],
    rows_of: Callable[[list[int]], dict[int, Any]],
    vectors_of: Callable[[list[int]], np.ndarray],
    threshold: float,
    key: Callable[[Any], tuple],
    candidate_threshold: float | None = None,
    verify: PairCheck | None = None,
) -> list[DuplicateGroup]:
    """Groups of duplicates, each made of a keeper and the images that duplicate *it*.

    ``graph`` edges at or above ``candidate_threshold`` (default: ``threshold``) and each list in
    ``identical`` (ids of byte-identical files) join candidates; within a candidate component the
    best keeper left takes every image left that is identical to it, scores at least
    ``threshold`` against it, or (with ``verify``) scores at least ``candidate_threshold`` and
    passes ``verify(keeper_row, row)``.

    With ``verify``, an image that scores below ``candidate_threshold`` against the keeper but is a
    candidate neighbour of one of the keeper's members is also verified against the keeper itself
    (and so on from the members that adds). A heavily edited copy often sits nearer to other
    copies of its photo than to the original (a cropped, rotated, recoloured copy is nearer the
    cropped one), and in a collection holding several copies of a photo they fill its neighbour
    list. The pair that decides is still (keeper, image), so nothing is chained; the extra checks
    are bounded by the graph's k per member.
    """
    low = threshold if candidate_threshold is None or verify is None else min(threshold, candidate_threshold)
    uf = _UnionFind()
    strong = graph.score >= low
    adjacent: dict[int, list[int]] = {}
    for a, b in zip(graph.src[strong].tolist(), graph.dst[strong].tolist()):
        uf.union(a, b)
        if verify is not None:
            adjacent.setdefault(a, []).append(b)
    for same in identical:
        for other in same[1:]:
            uf.union(same[0], other)
    groups: list[DuplicateGroup] = []
    for component in uf.components():
        rows = rows_of(component)
        order = sorted((rows[i] for i in component if i in rows), key=key)
        position = {row.id: j for j, row in enumerate(order)}
        vectors = vectors_of([r.id for r in order])
        left = np.ones(len(order), dtype=bool)
        for k, keeper in enumerate(order):
            if not left[k]:
                continue
            left[k] = False
            sims = vectors @ vectors[k]
            members: list[DuplicateMember] = []
            tried: set[int] = set()
            for j in np.flatnonzero(left).tolist():
                row, sim = order[j], float(sims[j])
                same = row.hash is not None and row.hash == keeper.hash
                verified = False
                if not same and sim < threshold:
                    if verify is None or sim < low:
                        continue
                    tried.add(j)
                    if not verify(keeper, row):
                        continue
                    verified = True
                left[j] = False
                members.append(_member(row, 1.0 if same else sim, same, verified))
            if verify is not None:  # through the members' own candidate neighbours
                frontier = [m.id for m in members]
                while frontier:
                    reached = {position[b] for a in frontier for b in adjacent.get(a, ()) if b in position}
                    frontier = []
                    for j in sorted(reached):
                        if not left[j] or j in tried:
                            continue
                        tried.add(j)
                        if verify(keeper, order[j]):
                            left[j] = False
                            members.append(_member(order[j], float(sims[j]), False, True))
                            frontier.append(order[j].id)
            if members:
                members.sort(key=lambda m: (-m.score, m.path))
                groups.append(DuplicateGroup(_member(keeper, 1.0, True, False), members))
    groups.sort(key=lambda g: (-len(g.duplicates), g.keeper.path))
    return groups


def _member(row: Any, score: float, identical: bool, verified: bool) -> DuplicateMember:
    return DuplicateMember(
        path=row.path, score=round(float(score), 6), identical=identical, verified=verified, width=row.width,
        height=row.height, size=row.size, mtime_ns=row.mtime_ns, id=row.id,
    )


# -- the job ---------------------------------------------------------------------------------
@dataclass
class DuplicatesResult:
    """Every group of an index, and how they were found."""

    images: int
    threshold: float
    threshold_source: str  # "given" or "calibrated"
    verified: bool
    candidate_threshold: float | None
    keep: str
    groups: list[DuplicateGroup] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    calibrated_now: bool = False
    roots: list[str] = field(default_factory=list)
    seconds: float = 0.0
    pairs_verified: int = 0
    move: "MovePlan | None" = None  # what --move-to did or would do, when asked

    @property
    def duplicates(self) -> int:
        return sum(len(g.duplicates) for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "verified": self.verified,
            "candidate_threshold": self.candidate_threshold,
            "keep": self.keep,
            "duplicates": self.duplicates,
            "pairs_verified": self.pairs_verified,
            "seconds": round(self.seconds, 3),
            "groups": [g.to_dict() for g in self.groups],
            "calibration": self.calibration,
            **({"move": self.move.to_dict()} if self.move is not None else {}),
        }

    def to_csv(self) -> str:
        """``duplicate,keeper,score`` rows, one per non-keeper."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["duplicate", "keeper", "score"])
        for g in self.groups:
            for m in g.duplicates:
                writer.writerow([m.path, g.keeper.path, f"{m.score:.6f}"])
        return out.getvalue()


def check_threshold(threshold: float | None) -> None:
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise InputError(f"--threshold must be a cosine similarity between -1 and 1, not {threshold}")


def stored_calibration(store: IndexStore, precision_target: float) -> dict[str, Any] | None:
    """The recorded calibration, if it was made for this index's model and this precision target."""
    cal = store.meta.get("duplicates_calibration")
    if not cal:
        return None
    identity = store.catalog.identity()
    if cal.get("identity") != identity or abs(float(cal.get("precision_target", -1)) - precision_target) > 1e-9:
        return None
    return cal


def find_duplicates(
    index_dir: str | os.PathLike[str],
    threshold: float | None = None,
    keep: str = "largest",
    prefer: Sequence[str] = (),
    verify: str = "auto",
    calibrate: bool = False,
    precision_target: float = 0.99,
    k: int = GRAPH_K,
    calibrate_options: dict[str, Any] | None = None,
    move_to: str | os.PathLike[str] | None = None,
) -> DuplicatesResult:
    """Groups of near-duplicate images among the indexed ones (see the module's docstring).

    ``threshold`` (a cosine similarity) overrides the calibrated one; without it, the threshold a
    calibration recorded for this model and ``precision_target`` is used, and one is made (which
    embeds a sample of edited images: torch is imported then) when none is recorded or when
    ``calibrate`` is set. ``verify``: ``auto`` verifies candidate pairs below the threshold with
    local features when a calibration says so and OpenCV is installed; ``on``; ``off``.
    ``move_to``: the folder duplicates will be moved to, refused here (before any work) when it
    lies inside an indexed folder.
    """
    check_threshold(threshold)
    if verify not in VERIFY_MODES:
        raise InputError(f"verify must be one of {', '.join(VERIFY_MODES)}")
    if not 0.0 < precision_target < 1.0:
        raise InputError(f"--precision-target must be between 0 and 1 (exclusive), not {precision_target}")
    key = keeper_key(keep, prefer)
    start = time.perf_counter()
    with IndexStore.open(index_dir) as store:
        n = store.require_stored_vectors()
        roots = list(store.meta.get("roots", []))
        if move_to is not None:
            check_move_target(move_to, roots)
        cal = None if calibrate else stored_calibration(store, precision_target)
        if cal is None and (threshold is None or calibrate):
            from .calibrate import calibrate_index

            cal = calibrate_index(store, precision_target=precision_target, **(calibrate_options or {}))
            calibrated_now = True
        else:
            calibrated_now = False
        source = "given" if threshold is not None else "calibrated"
        if threshold is None:
            assert cal is not None
            threshold = float(cal["threshold"])
        verifier, low = _verifier(verify, cal, threshold)
        # the stored vectors exactly (an IVF-PQ layout's codes are approximations), as float32: widening
        # float16 in each product instead cost more than the products themselves; plain reads, so the
        # scan does not leave the whole vector file resident
        ids, vectors = store.all_vectors(chunk=CHUNK, mapped=False)
        graph = neighbour_graph(ids, vectors, k=k, min_score=min(low, threshold))
        del vectors
        verified_pairs = [0]

        def check(a: Any, b: Any) -> bool:
            verified_pairs[0] += 1
            return verifier(a.real_path, b.real_path)  # type: ignore[misc]

        groups = group_duplicates(
            graph,
            store.catalog.ok_ids_sharing_hash(),
            store.catalog.rows_by_ids,
            lambda ids: _vectors_of(store, ids),
            threshold,
            key,
            candidate_threshold=low,
            verify=check if verifier is not None else None,
        )
        return DuplicatesResult(
            images=n, threshold=round(threshold, 6), threshold_source=source, verified=verifier is not None,
            candidate_threshold=round(low, 6) if verifier is not None else None, keep=keep, groups=groups,
            calibration=cal, calibrated_now=calibrated_now, roots=roots, seconds=time.perf_counter() - start,
            pairs_verified=verified_pairs[0],
        )


def _vectors_of(store: IndexStore, ids: list[int]) -> np.ndarray:
    """Stored vectors of ``ids``, in that order."""
    found, vectors = store.vectors_of(ids)
    position = {int(i): r for r, i in enumerate(found.tolist())}
    return vectors[[position[int(i)] for i in ids]] if ids else vectors


def _verifier(verify: str, cal: dict[str, Any] | None, threshold: float) -> tuple[Callable[[str, str], bool] | None, float]:
    """(the pair check, the candidate threshold) for ``verify`` mode, or (None, threshold)."""
    if verify == "off":
        return None, threshold
    low = (cal or {}).get("candidate_threshold")
    if verify == "auto" and (low is None or not (cal or {}).get("verify_default", False)):
        return None, threshold
    from .verify import Verifier, verifier_available

    if not verifier_available():
        if verify == "on":
            raise InputError("verification needs OpenCV: pip install 'simsearch[dedup]'")
        return None, threshold
    if low is None:
        low = threshold - 0.15
    verifier = Verifier(min_inliers=int((cal or {}).get("min_inliers", 0)) or None)
    return verifier.same_scene, min(float(low), threshold)


# -- checking new images ---------------------------------------------------------------------
@dataclass
class ImageCheck:
    """Whether one outside image is already in the index: its matches, best first."""

    image: str
    matches: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_images(
    images: Sequence[str | os.PathLike[str]],
    index_dir: str | os.PathLike[str],
    threshold: float | None = None,
    precision_target: float = 0.99,
    k: int = GRAPH_K,
    device: str = "auto",
) -> tuple[float, list[ImageCheck]]:
    """The indexed duplicates of each image (embedded, never added): (threshold used, checks)."""
    from .search import Searcher

    check_threshold(threshold)
    for q in images:
        if not Path(q).is_file():
            raise InputError(f"image not found: {q}")
    if threshold is None:
        with IndexStore.open(index_dir) as store:
            store.require_vectors()
            cal = stored_calibration(store, precision_target)
            if cal is None:
                from .calibrate import calibrate_index

                cal = calibrate_index(store, precision_target=precision_target)
        threshold = float(cal["threshold"])
    with Searcher(index_dir, device=device) as searcher:
        results = searcher.query(images, k=k, include_self=True)
        checks = []
        for q, result in zip(images, results):
            digest = hash_file(q)
            same = set(searcher.store.catalog.ok_ids_by_hash(digest))
            matches = [
                {"path": h.path, "score": h.score, "identical": h.id in same, "width": h.width, "height": h.height}
                for h in result.results
                if h.score >= threshold or h.id in same
            ]
            checks.append(ImageCheck(str(q), matches))
    return threshold, checks


# -- moving duplicates away ------------------------------------------------------------------
@dataclass
class Move:
    source: str
    target: str
    id: int
    size: int | None
    mtime_ns: int | None
    done: bool = False
    skipped: str | None = None


@dataclass
class MovePlan:
    """What ``--move-to`` does (or, for a dry run, would do)."""

    target_dir: str
    applied: bool
    moves: list[Move] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def moved(self) -> int:
        return sum(m.done for m in self.moves)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_dir": self.target_dir,
            "applied": self.applied,
            "moved": self.moved,
            "skipped": sum(m.skipped is not None for m in self.moves),
            "moves": [{"from": m.source, "to": m.target, "done": m.done, "skipped": m.skipped} for m in self.moves],
            "warnings": self.warnings,
        }


def check_move_target(target_dir: str | os.PathLike[str], roots: Sequence[str]) -> str:
    """The absolute target folder; an error when it lies inside an indexed folder's tree."""
    target = os.path.realpath(os.path.abspath(target_dir))
    for root in roots:
        if is_under(target, os.path.realpath(root)):
            raise InputError(
                f"--move-to {target_dir} is inside the indexed folder {root}: the moved files would be indexed "
                "again; choose a folder outside it"
            )
    return target


def move_duplicates(
    index_dir: str | os.PathLike[str], result: DuplicatesResult, target_dir: str | os.PathLike[str], apply: bool = False
) -> MovePlan:
    """Plan moving every non-keeper of ``result`` under ``target_dir``; with ``apply``, do it."""
    plan = plan_moves(result, target_dir, result.roots)
    return apply_moves(index_dir, plan) if apply else plan


def plan_moves(result: DuplicatesResult, target_dir: str | os.PathLike[str], roots: Sequence[str]) -> MovePlan:
    """Where each non-keeper goes under ``target_dir``: its path relative to the indexed folder holding it."""
    target = check_move_target(target_dir, roots)
    plan = MovePlan(target, applied=False)
    for group in result.groups:
        for m in group.duplicates:
            holders = [r for r in roots if is_under(m.path, r)]
            if holders:
                root = max(holders, key=len)
                rel = os.path.join(os.path.basename(root.rstrip(os.sep)) or "root", os.path.relpath(m.path, root))
            else:
                rel = os.path.relpath(m.path, os.path.abspath(os.sep))
            plan.moves.append(Move(m.path, os.path.join(target, rel), m.id, m.size, m.mtime_ns))
    return plan


def apply_moves(index_dir: str | os.PathLike[str], plan: MovePlan) -> MovePlan:
    """Move the planned files (never overwriting, never deleting) and drop their rows from the index.

    A file whose size or modification time changed since it was indexed, and whose content hash
    changed too, is skipped with a warning; so is one whose target already exists.
    """
    with IndexStore.open(index_dir) as store:
        store.lock_for_writing()
        rows = store.catalog.rows_by_ids(m.id for m in plan.moves)
        moved: list[int] = []
        for m in plan.moves:
            row = rows.get(m.id)
            reason = _why_skip(m, row)
            if reason is None and os.path.lexists(m.target):
                reason = f"{m.target} already exists"
            if reason is not None:
                m.skipped = reason
                plan.warnings.append(f"skipped {m.source}: {reason}")
                continue
            os.makedirs(os.path.dirname(m.target), exist_ok=True)
            shutil.move(rows[m.id].real_path, m.target)  # the file's own name, also where it is not UTF-8
            m.done = True
            moved.append(m.id)
        store.forget_moved_images([rows[i] for i in moved])
        if moved:
            store.set_meta({"updated_at": utc_now()})
    plan.applied = True
    return plan


def _why_skip(m: Move, row: Any) -> str | None:
    if row is None or not row.ok:
        return "it is no longer in the index"
    try:
        st = os.stat(row.real_path)
    except FileNotFoundError:
        return "the file is gone"
    if st.st_size == row.size and st.st_mtime_ns == row.mtime_ns:
        return None
    if hash_file(row.real_path) != row.hash:
        return "it changed since it was indexed (run simsearch index again)"
    return None
