"""Exact search of a flat index on the CPU through a float16 copy of its vectors (FBGEMM, via torch).

Why: a query by indexed id is mostly FAISS's flat scan, and for the few queries of a server's
batch (1 to 16) that scan costs nearly what a batch of 16 does: BLAS packs every float32 vector
again on each call. FBGEMM's float16-weight GEMM, which torch ships for ``nn.Linear`` layers with
float16 weights (``quantized::linear_dynamic_fp16``), keeps the vectors packed once, in half the
bytes: a batch of 1 to 4 queries over 10,000 x 512 vectors searches 1.9 to 2.3 times faster than
with FAISS, of 8 to 16 queries 1.1 to 1.4 times (``benchmarks/bench_half_search.py``, 2-core AMD
EPYC; results checked against FAISS's). Packing is slow (about 30 us a 512-d vector, one core), so
it happens once per loaded index and off the request path (``simsearch serve`` packs on a thread
of its own and searches with FAISS meanwhile).

Exact all the same: the float16 scores only choose candidates. The best ``R`` of them are scored
again in float32 from FAISS's own vectors, and a bound on how far a score can move, through
rounding to float16 (measured for each vector when packing) and float32 sums, proves that no
vector left out belongs in the top k. A query it cannot prove (many near-equal scores, such as
copies of one image) gets four times the candidates, and past :data:`MAX_CANDIDATES` FAISS's own
search. Scores are float32 sums like FAISS's, and equal scores come in storage order.

When most queries would need that (vectors whose scores all crowd within the bound of each
other, as a random-weight ResNet-50's do: the median image's 1,000th neighbour at a cosine of
0.9992), the float16 search is slower than FAISS's. So building one also measures
:attr:`HalfPackedIndex.proven_at_once` on stored vectors used as queries, and callers keep FAISS
below :data:`MIN_PROVEN_AT_ONCE`.

FBGEMM is x86-only: :func:`half_gemm_unavailable` says why not elsewhere, and callers keep FAISS.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from ..store import VectorIndex, clamp_k

log = logging.getLogger(__name__)

# re-scored beyond k at first (at least 2k): enough for every sampled query of the real (Lite0)
# and random-weight ResNet-18 indexes measured
EXTRA_CANDIDATES = 32
MAX_CANDIDATES = 1024  # a query the bound cannot prove with this many goes to FAISS
# the float16 GEMM costs about as much per query at any batch size, FAISS's flat search about the
# same for 1 to 16 queries: past this many queries at once, FAISS is the faster
MAX_QUERIES = 16
# below this share of sampled queries proven with their first candidates, FAISS is the faster search
MIN_PROVEN_AT_ONCE = 0.9
CALIBRATION_QUERIES = 64
_RESCORE_FLOATS = 1 << 22  # candidate vectors gathered at once for re-scoring (16 MB)
_UNIT_ROUNDOFF = 2.0**-24  # float32
_CHUNK = 8192  # vectors widened to float64 at once when packing (32 MB at 512-d)


def _quantized_engines() -> list[str]:
    return list(torch.backends.quantized.supported_engines)


def half_gemm_unavailable() -> str | None:
    """None when FBGEMM's float16 GEMM can run here, else why not."""
    if "fbgemm" not in _quantized_engines():
        return "this build of torch has no FBGEMM (it is x86-only)"
    if not hasattr(torch.ops.quantized, "linear_prepack_fp16"):
        return "this build of torch lacks quantized::linear_prepack_fp16"
    return None


class HalfPackedIndex:
    """A flat :class:`~simsearch.store.VectorIndex` packed as float16 for FBGEMM, searched exactly.

    Same contract as :meth:`VectorIndex.search`. Building one is slow (see the module's text) and
    keeps a reference to ``ann``: the re-scoring reads FAISS's own float32 vectors in place.
    """

    def __init__(self, ann: VectorIndex) -> None:
        why = half_gemm_unavailable()
        if why:
            raise RuntimeError(why)
        ids, vectors = ann.stored_view()  # ValueError for a layout that does not store vectors as is
        self.ann = ann
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.vectors = vectors
        self.dim = int(vectors.shape[1])
        self.widened = 0  # queries that needed more than their first candidates (tests, info)
        self.fallbacks = 0  # queries the bound could not prove, answered by FAISS (tests, info)
        self.proven_at_once = 1.0  # share of sampled queries proven with their first candidates
        n = len(vectors)
        with warnings.catch_warnings():  # FAISS's read-only map: torch only reads it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            weight = torch.from_numpy(vectors)
            self._packed = torch.ops.quantized.linear_prepack_fp16(weight, None) if n else None
        self.bound = 0.0
        if n:
            self.bound = self._measure_bound(weight)
            self.proven_at_once = self._calibrate()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Memory the packed copy takes (float16)."""
        return 2 * len(self) * self.dim

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, k), best first, as FAISS's flat search gives them (and
        by FAISS itself for more than :data:`MAX_QUERIES` queries)."""
        n = len(self)
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if n == 0 or len(q) == 0 or len(q) > MAX_QUERIES:
            return self.ann.search(q, k)  # FAISS's own answer: the empty cases, and big batches
        k = clamp_k(k, n)
        approx = self._half_scores(q)
        out_s = np.empty((len(q), k), np.float32)
        out_i = np.empty((len(q), k), np.int64)
        # how far a float16 score may be from the float32 one, for each query (scaled by its norm)
        margin = np.linalg.norm(q, axis=1) * self.bound
        todo = np.arange(len(q))
        width = first = min(n, max(2 * k, k + EXTRA_CANDIDATES))
        while True:
            rows = approx if len(todo) == len(q) else approx[torch.from_numpy(todo)]
            top, pos = torch.topk(rows, width, dim=1, sorted=False)
            scores, pos = self._rescore(q[todo], pos.numpy())
            # no vector outside the candidates scores above the lowest candidate's float16 score
            # plus the margin; the k-th re-scored candidate above that is the k-th of all
            lowest = top.min(dim=1).values.numpy()
            proven = np.ones(len(todo), bool) if width == n else scores[:, k - 1] > lowest + margin[todo]
            done = todo[proven]
            out_s[done] = scores[proven, :k]
            out_i[done] = self.ids[pos[proven, :k]]
            if width == first:
                self.widened += int((~proven).sum())
            todo = todo[~proven]
            if not len(todo):
                return out_s, out_i
            if width >= MAX_CANDIDATES:
                self.fallbacks += len(todo)
                out_s[todo], out_i[todo] = self.ann.search(q[todo], k)
                return out_s, out_i
            width = min(n, MAX_CANDIDATES, width * 4)

    def _half_scores(self, q: np.ndarray) -> torch.Tensor:
        """(n_queries, n) float16-vector scores, summed in float32."""
        return torch.ops.quantized.linear_dynamic_fp16(torch.from_numpy(q), self._packed)

    def _rescore(self, q: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Float32 scores of each query's candidate positions, best first (equal scores in storage
        order, as FAISS's scan keeps the first of equals), and the positions in that order."""
        pos = np.sort(pos, axis=1)
        # einsum, not matmul: numpy's own loops, where BLAS would wake its threads for a few rows
        if pos.size * self.dim <= _RESCORE_FLOATS:
            scores = np.einsum("cwd,cd->cw", self.vectors[pos], q)
        else:  # many candidates: one query's at a time
            scores = np.stack([np.einsum("wd,d->w", self.vectors[p], v) for p, v in zip(pos, q)])
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(pos, order, axis=1)

    def _measure_bound(self, weight: torch.Tensor, probes: int = 16) -> float:
        """For a query of norm 1: how far a float16 score of any stored vector may be from its true
        score, plus how far a float32 re-score may be (so that comparing the two is safe). In the
        same pass over the vectors, the packed scores of a few stored vectors and random directions
        are compared with float64 ones, and a build whose GEMM breaks the bound is refused
        (RuntimeError): the proof of exactness rests on it.

        A float16 score sums ``q . h(x)`` in float32: off from ``q . x`` by at most
        ``|x - h(x)| + g |h(x)|``, and a float32 re-score by ``g |x|``, with ``g = d u / (1 - d u)``
        the worst case of d float32 roundings (u = 2^-24). The largest of each over the vectors, and
        1 % to spare."""
        rng = np.random.default_rng(0)
        picked = np.asarray(weight[torch.from_numpy(rng.integers(0, len(weight), probes))])
        q = np.concatenate([picked, rng.standard_normal((probes, self.dim)).astype(np.float32)])
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        approx = self._half_scores(q).double()
        qd = torch.from_numpy(q).double()
        err = norm = worst = 0.0
        for s in range(0, len(weight), _CHUNK):
            x = weight[s : s + _CHUNK].double()
            h = weight[s : s + _CHUNK].half().double()  # round to nearest, as FBGEMM packs
            err = max(err, float(torch.linalg.vector_norm(x - h, dim=1).max()))
            norm = max(norm, float(torch.linalg.vector_norm(x, dim=1).max()), float(torch.linalg.vector_norm(h, dim=1).max()))
            worst = max(worst, float((approx[:, s : s + _CHUNK] - qd @ x.T).abs().max()))
        g = self.dim * _UNIT_ROUNDOFF / (1 - self.dim * _UNIT_ROUNDOFF)
        bound = 1.01 * (err + 2 * g * norm)
        if not worst <= bound:
            raise RuntimeError(f"float16 scores are off by {worst:.3g}, more than the bound {bound:.3g}")
        return bound

    def _calibrate(self, k: int = 10) -> float:
        """The share of a seeded sample of stored vectors, as queries for ``k`` neighbours, that
        the bound proves with their first candidates (the counters start again at 0 after)."""
        rng = np.random.default_rng(0)
        picked = rng.choice(len(self), min(len(self), CALIBRATION_QUERIES), replace=False)
        queries = np.array(self.vectors[np.sort(picked)])
        for s in range(0, len(queries), MAX_QUERIES):
            self.search(queries[s : s + MAX_QUERIES], k + 1)  # + 1: a query by id leaves itself out
        share = 1.0 - self.widened / len(picked)
        self.widened = self.fallbacks = 0
        return share
