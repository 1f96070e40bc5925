"""Which frames to label next: model uncertainty, diversity, or a random sample (issue #17).

A frame may be worth labelling when the current model is unsure about it (*uncertainty*) and
when it shows something the labelled frames do not (*diversity*). Both come from one streamed
pass over the frames (:func:`score_frames`); the cheap selection (:func:`select_frames`) then
picks, so a caller can re-rank with other labels or weights without running the model again.
Two rules rank by them (k-center, typical); measured, neither beat a random sample of frames at
5-30 labels on BUSI or HC18, so the default rule is a seeded random sample (below) and the
rankings stay available.

**Embeddings.** Each frame (gray uint8, resized to the model's square input with
``cv2.INTER_AREA`` and normalised as for segmentation) goes through the backbone; its pooled
``global_token`` ``(D,)`` is L2-normalised. Distances between frames are Euclidean distances of
these unit vectors (``0 ≤ d ≤ 2``).

**Uncertainty** (a segmentation or classification model; a bare backbone has none):
``u = mean predictive entropy + mean flip disagreement``, each in ``[0, 1]``:

* entropy of the foreground probability per pixel (sigmoid; softmax over the K classes for a
  multi-class model), divided by ``log K`` (``K = 2`` for one sigmoid), averaged over pixels
  at model resolution (a classifier: the entropy of its class probabilities);
* disagreement under a horizontal flip: the total-variation distance between the per-pixel
  probability vectors of the frame and of its flipped copy (flipped back), averaged over
  pixels (for one sigmoid ``|p - p_flip|``).

**K-center rule** (``strategy="kcenter"``, :func:`select_frames`; the default until
2026-12-02). Greedy k-center over the embeddings, started from the already-labelled frames,
with a weighted score per candidate frame ``i``::

    score_i = (1 - w) · d_i / d_max  +  w · (u_i - min u) / (max u - min u)

where ``d_i`` is the distance from frame ``i`` to the nearest labelled or already-suggested
frame (recomputed after every pick, so suggestions are also diverse among themselves),
``d_max`` the largest such distance among the candidates when the ranking starts (fixed, so
scores fall with rank), the min and max of ``u`` run over the candidates (unlabelled frames)
and ``w`` is the uncertainty weight. By default ``w = 0`` in the first round (nothing labelled:
the model has not seen this sequence, pure k-center covers its variety) and ``w = 0.5`` once
anything is labelled; ``w`` is always 0 without uncertainty (a bare backbone). With nothing
labelled the first pick has no distance yet: the distance term is replaced by the frame's
*centrality* (cosine similarity to the mean embedding, min-max normalised), so with ``w = 0``
the first label is the most typical frame (the medoid) and the next ones cover the rest. Exact
ties (duplicate frames) are broken by a seeded random order: the result is deterministic given
``seed``.

**Typical strategy** (``strategy="typical"``, TypiClust: Hacohen, Dekel & Weinshall, "Active
learning on a budget", ICML 2022). Greedy k-center favours the frames farthest from everything,
i.e. outliers, which in the full benchmark chased atypical images and lost to random at 5-30
labels. The typical rule instead clusters the embeddings with k-means into ``|labelled| + k``
clusters and, ``k`` times, takes the cluster with the fewest labelled or picked frames (ties:
the largest cluster) and picks in it the candidate maximising
``(1 - w) · typicality + w · uncertainty`` (both min-max normalised within the cluster's
candidates), where typicality = 1 / (mean distance to the frame's ``min(20, size - 1)``
nearest neighbours in its cluster): dense, representative frames of the modes not yet covered.
``diversity`` is then still reported as the distance to the nearest labelled / earlier pick.

**Random strategy** (``strategy="random"``, the default since 2026-12-02): ``k`` unlabelled
frames in a seeded random order (one permutation of all frames per ``seed``, so later rounds
continue the same order). Chosen by a rule written down before its results
(``docs/benchmarks/active_learning.md``, setting ``val-warmup``: the product's loop, train-split
pools, validation Dice, 3 seeds): random frames beat k-center on BUSI (mean over 6 rounds 0.387
vs 0.287) and HC18 (0.850 vs 0.847) and were in no round below k-center − 1 std; typical-w0
lost on BUSI. The ranking rules stay available. ``uncertainty`` and ``diversity`` are still
reported for every suggestion (the scoring pass runs anyway), ``score`` is 0 (not ranked).

Frames are streamed in batches (``batch_size``), converted to float32 one batch at a time;
only the embeddings ``(T, D)`` and a few numbers per frame are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from usfm_core.errors import ConfigError
from usfm_core.progress import drain
from usfm_core.threads import torch_threads

#: Uncertainty weight once some frames are labelled (first round: 0, pure diversity).
DEFAULT_UNCERTAINTY_WEIGHT = 0.5
#: Input side used for a bare backbone (a task model has its own ``input_size``).
DEFAULT_BACKBONE_INPUT = 224
#: Rules of :func:`select_frames` (module doc) and the default, chosen on validation data.
STRATEGIES = ("random", "kcenter", "typical")
DEFAULT_STRATEGY = "random"
#: Neighbours in the typicality density (TypiClust's 20).
TYPICAL_NEIGHBOURS = 20


@dataclass(frozen=True)
class Suggestion:
    """One suggested frame.

    Attributes:
        rank: 1 = label this frame first.
        frame: frame index in the input (0-based).
        score: the combined score it was picked with (see the module doc), in ``[0, 1]``;
            0 for the random rule (not ranked).
        uncertainty: the model's uncertainty on the frame (entropy + flip disagreement,
            ``[0, 2]``), None for a bare backbone.
        diversity: distance of its embedding to the nearest labelled or earlier-suggested frame
            (``[0, 2]``) at the time it was picked; None for the first pick when nothing is
            labelled (the medoid).
    """

    rank: int
    frame: int
    score: float
    uncertainty: float | None
    diversity: float | None

    def to_row(self) -> dict[str, Any]:
        """Plain dict for CSV / JSON (None stays None)."""
        return {
            "rank": self.rank,
            "frame": self.frame,
            "score": round(self.score, 6),
            "uncertainty": None if self.uncertainty is None else round(self.uncertainty, 6),
            "diversity": None if self.diversity is None else round(self.diversity, 6),
        }


@dataclass
class FrameScores:
    """What one pass of the model over the frames gives (input of :func:`select_frames`).

    Attributes:
        embeddings: ``(T, D)`` float32, L2-normalised pooled backbone features.
        uncertainty: ``(T,)`` float32 ``entropy + disagreement``, or None (bare backbone).
        entropy, disagreement: ``(T,)`` float32 parts of ``uncertainty`` (or None).
    """

    embeddings: np.ndarray
    uncertainty: np.ndarray | None = None
    entropy: np.ndarray | None = None
    disagreement: np.ndarray | None = None

    @property
    def n_frames(self) -> int:
        return int(self.embeddings.shape[0])


# ---------------------------------------------------------------------------- models


def load_model_or_backbone(name_or_path: str | Path, device: str = "cpu") -> tuple[nn.Module, str]:
    """A model by shipped / user name or folder (:func:`usfm_core.models.zoo.find_model`):
    ``(module in eval mode, kind)`` with kind ``segmentation``, ``classification`` or
    ``backbone``. Raises :class:`~usfm_core.errors.CheckpointError` for unknown names."""
    from usfm_core.finetune.models import load_backbone, load_finetuned
    from usfm_core.models.zoo import find_model

    entry = find_model(name_or_path)
    if entry.kind == "backbone":
        backbone = load_backbone(entry.path).to(device).eval()
        size = pretrain_input_size(entry.config)
        if size:  # a fresh decoder on it works at the size the backbone was pretrained at
            backbone.input_size = size
        return backbone, "backbone"
    model, meta = load_finetuned(entry.path, device=device)
    return model.eval(), str(meta["task"])


def pretrain_input_size(config: dict[str, Any]) -> int | None:
    """The global-crop side a backbone was pretrained at (``extra.pretrain.views.global_size``
    of its ``config.json``), when recorded and divisible by 32; else ``None``."""
    views = ((config.get("extra") or {}).get("pretrain") or {}).get("views") or {}
    size = views.get("global_size") if isinstance(views, dict) else None
    if isinstance(size, int) and size > 0 and size % 32 == 0:
        return size
    return None


def model_kind(model: nn.Module) -> str:
    """``segmentation`` / ``classification`` for task models, ``backbone`` for anything with
    ``out_dims`` (a bare backbone); :class:`ConfigError` otherwise."""
    task = getattr(model, "task", "")
    if task in ("segmentation", "classification"):
        return task
    if hasattr(model, "out_dims"):
        return "backbone"
    raise ConfigError(
        f"cannot score frames with a {type(model).__name__}",
        hint="pass a segmenter, classifier or backbone (a model name or folder)",
    )


def _resolve_model(model_or_backbone: nn.Module | str | Path, device: str) -> nn.Module:
    if isinstance(model_or_backbone, nn.Module):
        return model_or_backbone.to(device).eval()
    return load_model_or_backbone(model_or_backbone, device)[0]


# ---------------------------------------------------------------------------- frames


def iter_gray_frames(frames: Any) -> Iterator[np.ndarray]:
    """``(H, W) uint8`` frames of a ``(T, H, W[, 3])`` array, a :class:`~usfm_core.io.Scan`,
    lazy frames, or any iterable of 2-D / RGB frames (colour → gray, other dtypes rescaled
    per frame as :func:`usfm_core.finetune.infer.segment_frames` does)."""
    from usfm_core.finetune.infer import _to_gray_u8

    if hasattr(frames, "iter_frames"):  # a Scan
        frames = frames.iter_frames()
    elif isinstance(frames, np.ndarray) and frames.ndim == 2:
        frames = [frames]
    for frame in frames:
        yield _to_gray_u8(frame)


def prepare_batch(frames: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Gray uint8 frames → model input ``(B, 1, size, size)`` float32 in ``[-1, 1]`` (the
    resizing and normalisation of :func:`~usfm_core.finetune.infer.segment_frames`)."""
    import cv2

    from usfm_core.finetune.data import normalize

    x = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])
    return torch.from_numpy(normalize(x))[:, None]


def model_input_size(model: nn.Module, input_size: int | None = None) -> int:
    """The square input side: ``input_size`` if given, else the model's, else 224."""
    size = int(input_size or getattr(model, "input_size", 0) or DEFAULT_BACKBONE_INPUT)
    if size % 32:
        raise ConfigError(f"input size must be divisible by 32, got {size}")
    return size


# ---------------------------------------------------------------------------- scoring


def _backbone_out(model: nn.Module, x: torch.Tensor, kind: str):
    """Backbone output of ``x (B, 1, S, S)`` (channels repeated as the task models do)."""
    if kind != "backbone":
        return model._features(x)
    from usfm_core.finetune.models import _backbone_in_chans

    chans = _backbone_in_chans(model)
    if x.shape[1] != chans:
        x = x.expand(-1, chans, -1, -1)
    return model(x)


def _probabilities(model: nn.Module, kind: str, out: Any, x: torch.Tensor) -> torch.Tensor:
    """Per-class probabilities from backbone output of ``x (B, 1, S, S)``: ``(B, K, S, S)``
    (segmentation; ``K = 1`` is one sigmoid) or ``(B, K)`` (classification)."""
    if kind == "segmentation":
        logits = model.decode(out.features, x).float()
        return torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1)
    return model.head(out.global_token).float().softmax(1)


def _entropy(prob: torch.Tensor) -> torch.Tensor:
    """Mean normalised entropy per item: ``prob (B, K, ...)`` → ``(B,)`` in ``[0, 1]``;
    ``K = 1`` is a sigmoid (the two-class entropy of ``p``)."""
    eps = 1e-6
    if prob.shape[1] == 1:
        p = prob[:, 0].clamp(eps, 1 - eps)
        h = -(p * p.log() + (1 - p) * (1 - p).log()) / math.log(2)
    else:
        p = prob.clamp_min(eps)
        h = -(p * p.log()).sum(1) / math.log(prob.shape[1])
    return h.reshape(h.shape[0], -1).mean(1)


def _disagreement(prob: torch.Tensor, prob_flip: torch.Tensor) -> torch.Tensor:
    """Mean total-variation distance between two probability maps ``(B, K, ...)`` → ``(B,)``
    (``|p - q|`` for one sigmoid)."""
    diff = (prob - prob_flip).abs()
    tv = diff[:, 0] if prob.shape[1] == 1 else 0.5 * diff.sum(1)
    return tv.reshape(tv.shape[0], -1).mean(1)


@torch.no_grad()
def _score_batch(
    model: nn.Module, kind: str, x: torch.Tensor, flip: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``x (B, 1, S, S)`` → ``(embeddings (B, D), entropy (B,), disagreement (B,))``; the last
    two are None for a bare backbone."""
    out = _backbone_out(model, x, kind)
    emb = torch.nn.functional.normalize(out.global_token.float().reshape(len(x), -1), dim=1)
    if kind == "backbone":
        return emb.cpu().numpy(), None, None
    prob = _probabilities(model, kind, out, x)
    ent = _entropy(prob)
    dis = torch.zeros_like(ent)
    if flip:
        x_f = x.flip(-1)
        prob_f = _probabilities(model, kind, _backbone_out(model, x_f, kind), x_f)
        if kind == "segmentation":
            prob_f = prob_f.flip(-1)
        dis = _disagreement(prob, prob_f)
    return emb.cpu().numpy(), ent.cpu().numpy(), dis.cpu().numpy()


def iter_score_frames(
    model_or_backbone: nn.Module | str | Path,
    frames: Any,
    *,
    batch_size: int = 8,
    input_size: int | None = None,
    device: str = "cpu",
    flip: bool = True,
) -> Generator[int, None, FrameScores]:
    """Generator form of :func:`score_frames` for GUI workers: yields the number of frames
    done after each batch and returns the :class:`FrameScores` (``StopIteration.value``);
    closing it (a napari ``worker.quit()``) stops at the next batch."""
    from usfm_core.utils import resolve_device

    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    device = resolve_device(device)
    model = _resolve_model(model_or_backbone, device)
    kind = model_kind(model)
    size = model_input_size(model, input_size)
    embs: list[np.ndarray] = []
    ents: list[np.ndarray] = []
    diss: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    done = 0

    def run() -> None:
        e, h, d = _score_batch(model, kind, prepare_batch(batch, size).to(device), flip)
        embs.append(e.astype(np.float32))
        if h is not None and d is not None:
            ents.append(h.astype(np.float32))
            diss.append(d.astype(np.float32))

    for frame in iter_gray_frames(frames):
        batch.append(frame)
        if len(batch) == batch_size:
            run()
            done += len(batch)
            batch = []
            yield done
    if batch:
        run()
        done += len(batch)
        yield done
    if not embs:
        raise ConfigError("no frames to score", hint="pass a cine or a stack of images")
    emb = np.concatenate(embs)
    if kind == "backbone":
        return FrameScores(emb)
    ent, dis = np.concatenate(ents), np.concatenate(diss)
    return FrameScores(emb, ent + dis, ent, dis)


def score_frames(
    model_or_backbone: nn.Module | str | Path,
    frames: Any,
    *,
    batch_size: int = 8,
    input_size: int | None = None,
    device: str = "cpu",
    flip: bool = True,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> FrameScores:
    """Embeddings and uncertainty of every frame, in one streamed pass (see the module doc).

    Args:
        model_or_backbone: a segmenter / classifier / backbone module, or a model name or
            folder (shipped ``sim-lesion``, ``fetal-head``, ...; a backbone folder).
        frames: ``(T, H, W[, 3])`` array, a :class:`~usfm_core.io.Scan`, or an iterable of
            frames (any dtype; see :func:`iter_gray_frames`).
        input_size: square model input (default: the model's, 224 for a bare backbone).
        flip: also run the flipped frames (flip disagreement); False halves the cost and
            leaves entropy alone as the uncertainty.
        progress: called with the number of frames done after each batch.
        threads: torch CPU threads for this call (restored afterwards); None leaves them.
    """
    gen = iter_score_frames(
        model_or_backbone,
        frames,
        batch_size=batch_size,
        input_size=input_size,
        device=device,
        flip=flip,
    )
    with torch_threads(threads):
        return drain(gen, progress)


# ---------------------------------------------------------------------------- selection


def select_frames(
    scores: FrameScores,
    k: int,
    labelled: Iterable[int] = (),
    *,
    uncertainty_weight: float | None = None,
    seed: int = 0,
    strategy: str = DEFAULT_STRATEGY,
) -> list[Suggestion]:
    """Choose ``k`` unlabelled frames to label next: a seeded random sample (default), or a
    ranking by greedy k-center or typical clusters mixed with uncertainty (module doc).

    Args:
        scores: from :func:`score_frames`.
        k: number of suggestions (fewer when fewer frames are unlabelled).
        labelled: indices of frames already labelled (never suggested; the k-center start).
        uncertainty_weight: ``w`` in ``[0, 1]``; default 0 with nothing labelled, else
            :data:`DEFAULT_UNCERTAINTY_WEIGHT`; forced to 0 without uncertainty.
        seed: the random rule's order; order in which exact ties (duplicate frames) are
            broken; k-means seed.
        strategy: ``"random"`` (default), ``"kcenter"`` or ``"typical"`` (module doc).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    emb = np.asarray(scores.embeddings, dtype=np.float32)
    n = emb.shape[0]
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    labelled = sorted({int(i) for i in labelled})
    bad = [i for i in labelled if not 0 <= i < n]
    if bad:
        raise ConfigError(
            f"labelled frame(s) {bad[:5]} outside 0..{n - 1}",
            hint=f"the input has {n} frame(s), numbered from 0",
        )
    w = _weight(uncertainty_weight, bool(labelled), scores.uncertainty is not None)
    unc = scores.uncertainty
    candidates = np.ones(n, bool)
    candidates[labelled] = False
    u_norm = np.zeros(n, np.float64)
    if unc is not None and candidates.any():
        u = np.asarray(unc, np.float64)
        lo, hi = u[candidates].min(), u[candidates].max()
        u_norm = (u - lo) / (hi - lo) if hi > lo else np.zeros(n)
    tiebreak = np.random.default_rng(seed).permutation(n)  # lower wins among exact ties
    dist = np.full(n, np.inf)
    for i in labelled:
        dist = np.minimum(dist, _distances(emb, emb[i]))
    if strategy == "typical":
        return _select_typical(emb, candidates, dist, k, u_norm, w, unc, tiebreak, seed)
    if strategy == "random":
        return _select_random(emb, candidates, dist, k, unc, seed)
    out: list[Suggestion] = []
    scale: float | None = None
    while len(out) < k and candidates.any():
        if np.isinf(dist).all():  # nothing labelled or picked yet: the most central frame
            mean = emb.mean(0)
            centrality = emb @ (mean / max(float(np.linalg.norm(mean)), 1e-12))
            part = (centrality - centrality[candidates].min()) / max(
                np.ptp(centrality[candidates]), 1e-12
            )
            diversity = None
        else:
            if scale is None:  # fixed from the first distance step: scores fall with rank
                scale = max(float(dist[candidates].max()), 1e-12)
            part = np.minimum(dist / scale, 1.0)
            diversity = dist
        score = (1 - w) * part + w * u_norm
        pick = _argmax(np.where(candidates, score, -np.inf), tiebreak)
        out.append(
            Suggestion(
                rank=len(out) + 1,
                frame=pick,
                score=float(score[pick]),
                uncertainty=None if unc is None else float(unc[pick]),
                diversity=None if diversity is None else float(diversity[pick]),
            )
        )
        candidates[pick] = False
        dist = np.minimum(dist, _distances(emb, emb[pick]))
    return out


def suggest_frames(
    model_or_backbone: nn.Module | str | Path,
    frames: Any,
    k: int,
    labelled: Iterable[int] = (),
    *,
    uncertainty_weight: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    input_size: int | None = None,
    device: str = "cpu",
    flip: bool = True,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
    strategy: str = DEFAULT_STRATEGY,
) -> list[Suggestion]:
    """Choose the ``k`` frames to label next: :func:`score_frames` then
    :func:`select_frames` (arguments as there). Returns suggestions best first."""
    scores = score_frames(
        model_or_backbone,
        frames,
        batch_size=batch_size,
        input_size=input_size,
        device=device,
        flip=flip,
        progress=progress,
        threads=threads,
    )
    return select_frames(
        scores, k, labelled, uncertainty_weight=uncertainty_weight, seed=seed, strategy=strategy
    )


def kmeans_labels(emb: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Cluster index ``(T,)`` of each unit embedding ``(T, D)`` (scikit-learn k-means, k-means++
    start, 4 restarts, seeded)."""
    from sklearn.cluster import KMeans

    n_clusters = max(1, min(n_clusters, len(np.unique(emb, axis=0))))
    km = KMeans(n_clusters=n_clusters, n_init=4, random_state=seed)
    return km.fit_predict(emb.astype(np.float64))


def typicality(emb: np.ndarray, neighbours: int = TYPICAL_NEIGHBOURS) -> np.ndarray:
    """TypiClust's density ``(T,)`` of unit embeddings ``(T, D)``: 1 / mean distance to the
    ``min(neighbours, T - 1)`` nearest other frames (one frame alone: 1)."""
    n = len(emb)
    if n < 2:
        return np.ones(n)
    d = _pairwise_distances(emb)
    np.fill_diagonal(d, np.inf)
    m = min(neighbours, n - 1)
    near = np.partition(d, m - 1, axis=1)[:, :m]
    return 1.0 / (near.mean(1) + 1e-8)


def _minmax(values: np.ndarray) -> np.ndarray:
    """Values rescaled to ``[0, 1]`` (all zeros when they are all equal)."""
    span = float(np.ptp(values)) if len(values) else 0.0
    return (values - values.min()) / span if span > 0 else np.zeros_like(values, np.float64)


def _select_typical(
    emb: np.ndarray,
    candidates: np.ndarray,
    dist: np.ndarray,
    k: int,
    u_norm: np.ndarray,
    w: float,
    unc: np.ndarray | None,
    tiebreak: np.ndarray,
    seed: int,
) -> list[Suggestion]:
    """The typical rule of :func:`select_frames` (module doc). ``candidates`` ``(T,)`` bool
    (unlabelled), ``dist`` ``(T,)`` distance to the nearest labelled frame (inf: none),
    ``u_norm`` ``(T,)`` uncertainty min-max normalised over the candidates."""
    n_labelled = int((~candidates).sum())
    clusters = kmeans_labels(emb, n_labelled + k, seed)
    n_clusters = int(clusters.max()) + 1
    size = np.bincount(clusters, minlength=n_clusters)
    covered = np.bincount(clusters[~candidates], minlength=n_clusters).astype(np.int64)
    typ = np.zeros(len(emb))
    for c in range(n_clusters):
        members = np.flatnonzero(clusters == c)
        typ[members] = typicality(emb[members])
    candidates = candidates.copy()
    dist = dist.copy()
    out: list[Suggestion] = []
    while len(out) < k and candidates.any():
        open_ = np.array([candidates[clusters == c].any() for c in range(n_clusters)])
        # Fewest labels first, then the biggest cluster, then the seeded order.
        order = sorted(np.flatnonzero(open_), key=lambda c: (covered[c], -size[c], tiebreak[c]))
        c = int(order[0])
        members = np.flatnonzero(candidates & (clusters == c))
        score = (1 - w) * _minmax(typ[members]) + w * _minmax(u_norm[members])
        pick = int(members[_argmax(score, tiebreak[members])])
        out.append(
            Suggestion(
                rank=len(out) + 1,
                frame=pick,
                score=float(score.max()),
                uncertainty=None if unc is None else float(unc[pick]),
                diversity=None if np.isinf(dist[pick]) else float(dist[pick]),
            )
        )
        candidates[pick] = False
        covered[c] += 1
        dist = np.minimum(dist, _distances(emb, emb[pick]))
    return out


def _select_random(
    emb: np.ndarray,
    candidates: np.ndarray,
    dist: np.ndarray,
    k: int,
    unc: np.ndarray | None,
    seed: int,
) -> list[Suggestion]:
    """The random rule of :func:`select_frames`: the first ``k`` candidates ``(T,)`` bool in
    one seeded permutation of all ``T`` frames (so a later round, with more frames labelled,
    continues the same order). ``dist`` ``(T,)``: distance to the nearest labelled frame."""
    order = np.random.default_rng(seed).permutation(len(emb))
    dist = dist.copy()
    out: list[Suggestion] = []
    for pick in (int(i) for i in order if candidates[i]):
        if len(out) == k:
            break
        out.append(
            Suggestion(
                rank=len(out) + 1,
                frame=pick,
                score=0.0,
                uncertainty=None if unc is None else float(unc[pick]),
                diversity=None if np.isinf(dist[pick]) else float(dist[pick]),
            )
        )
        dist = np.minimum(dist, _distances(emb, emb[pick]))
    return out


def _weight(weight: float | None, any_labelled: bool, has_uncertainty: bool) -> float:
    """The uncertainty weight actually used (see :func:`select_frames`)."""
    if weight is not None and not 0 <= weight <= 1:
        raise ConfigError(f"uncertainty weight must be in [0, 1], got {weight}")
    if not has_uncertainty:
        return 0.0
    if weight is None:
        return DEFAULT_UNCERTAINTY_WEIGHT if any_labelled else 0.0
    return float(weight)


def _distances(emb: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Euclidean distances ``(T,)`` from unit embeddings ``(T, D)`` to one unit vector ``(D,)``."""
    return np.sqrt(np.clip(2.0 - 2.0 * (emb @ center).astype(np.float64), 0.0, 4.0))


def _argmax(values: np.ndarray, tiebreak: np.ndarray) -> int:
    """Index of the largest value; exact ties go to the lowest ``tiebreak`` rank."""
    best = np.flatnonzero(values == values.max())
    return int(best[np.argmin(tiebreak[best])])


def min_pairwise_distance(embeddings: np.ndarray, frames: Sequence[int]) -> float:
    """Smallest embedding distance between any two of ``frames`` (``inf`` for fewer than two):
    how well a set of frames spreads over the sequence (larger = more diverse)."""
    e = np.asarray(embeddings)[list(frames)]
    if len(e) < 2:
        return math.inf
    d = _pairwise_distances(e)
    return float(d[np.triu_indices(len(e), 1)].min())


def _pairwise_distances(emb: np.ndarray) -> np.ndarray:
    """Euclidean distances ``(T, T)`` float64 between unit embeddings ``(T, D)``."""
    e = np.asarray(emb, np.float64)
    return np.sqrt(np.clip(2.0 - 2.0 * e @ e.T, 0.0, 4.0))
