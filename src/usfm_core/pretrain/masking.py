"""Mask generators on the backbone's last-stage grid (one cell = 32×32 input pixels).

All generators share one call signature::

    mask = gen(batch_size, (h, w), scores=..., loss_map=..., step=..., generator=g)
    # mask: (B, h, w) bool

``True`` = masked (the student sees a mask token there). Every generator masks exactly
``n_mask(N) = min(ceil(N·ratio), N - 1)`` cells of the ``N = h·w`` grid (at least one cell
stays visible so the student has context; a 1-cell grid is never masked). All randomness
comes from the given ``torch.Generator``, so masks are reproducible under a seed.
"""

from __future__ import annotations

import math

import torch

from usfm_core.pretrain.schedules import cosine_schedule, linear_schedule


def num_masked(n_cells: int, ratio: float) -> int:
    """Number of cells to mask on a grid of ``n_cells``: ``min(ceil(N·ratio), N-1)``, ≥ 0."""
    if n_cells <= 1:
        return 0
    # Round before ceil so 0.8·5 = 4.000000000000001 does not become 5.
    return max(0, min(math.ceil(round(n_cells * ratio, 9)), n_cells - 1))


def _mask_from_keys(keys: torch.Tensor, k: int, grid: tuple[int, int]) -> torch.Tensor:
    """Mask the ``k`` cells with the largest ``keys`` per row. keys (B, N) → (B, h, w) bool."""
    b, n = keys.shape
    mask = torch.zeros(b, n, dtype=torch.bool)
    if k > 0:
        idx = keys.topk(k, dim=1).indices
        mask.scatter_(1, idx, True)
    return mask.view(b, *grid)


def normalize_per_image(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max normalise each image's map to [0, 1]. x (B, h, w) or (B, N) → same shape.

    A constant map becomes all zeros (no preference).
    """
    flat = x.reshape(x.shape[0], -1).float()
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(x)


class MaskGenerator:
    """Base class: subclasses implement :meth:`__call__`; ``ratio`` is the masked fraction."""

    def __init__(self, ratio: float):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
        self.ratio = ratio

    def __call__(
        self,
        batch_size: int,
        grid: tuple[int, int],
        *,
        scores: torch.Tensor | None = None,
        loss_map: torch.Tensor | None = None,
        step: int = 0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def stats(self, step: int) -> dict[str, float]:
        """Schedule values at ``step`` for logging (empty for schedule-free generators)."""
        return {}


class RandomMaskGenerator(MaskGenerator):
    """Uniformly random cells (SimMIM/MAE style)."""

    def __call__(self, batch_size, grid, *, scores=None, loss_map=None, step=0, generator=None):
        n = grid[0] * grid[1]
        keys = torch.rand(batch_size, n, generator=generator)
        return _mask_from_keys(keys, num_masked(n, self.ratio), grid)


class BlockMaskGenerator(MaskGenerator):
    """BEiT-style random rectangles until the target count is reached.

    Rectangles have area ≥ ``min_patches`` (clipped to the grid) and aspect ratio log-uniform
    in ``[aspect, 1/aspect]``. If rectangles cannot add cells any more (overlaps), the mask is
    grown by random 4-neighbours of masked cells, so the count is exact and blocks stay
    contiguous.
    """

    def __init__(
        self, ratio: float, *, min_patches: int = 4, aspect: float = 0.3, max_tries: int = 10
    ):
        super().__init__(ratio)
        self.min_patches = min_patches
        self.log_aspect = (math.log(aspect), math.log(1.0 / aspect))
        self.max_tries = max_tries

    def __call__(self, batch_size, grid, *, scores=None, loss_map=None, step=0, generator=None):
        target = num_masked(grid[0] * grid[1], self.ratio)
        masks = [self._one(grid, target, generator) for _ in range(batch_size)]
        return torch.stack(masks) if masks else torch.zeros(0, *grid, dtype=torch.bool)

    def _rand(self, generator: torch.Generator | None) -> float:
        return float(torch.rand((), generator=generator))

    def _one(self, grid: tuple[int, int], target: int, g: torch.Generator | None) -> torch.Tensor:
        """One (h, w) mask with exactly ``target`` cells."""
        h, w = grid
        mask = torch.zeros(h, w, dtype=torch.bool)
        count = 0
        while count < target:
            added = self._add_block(mask, target - count, g)
            if added == 0:
                break
            count += added
        if count < target:
            self._grow(mask, target - count, g)
        return mask

    def _add_block(self, mask: torch.Tensor, budget: int, g: torch.Generator | None) -> int:
        """Try to place one rectangle adding at most ``budget`` new cells; return cells added."""
        h, w = mask.shape
        min_area = min(self.min_patches, budget)
        for _ in range(self.max_tries):
            area = min_area + self._rand(g) * (budget - min_area)
            aspect = math.exp(
                self.log_aspect[0] + self._rand(g) * (self.log_aspect[1] - self.log_aspect[0])
            )
            bh = round(math.sqrt(area * aspect))
            bw = round(math.sqrt(area / aspect))
            if not (1 <= bh <= h and 1 <= bw <= w):
                continue
            top = int(self._rand(g) * (h - bh + 1))
            left = int(self._rand(g) * (w - bw + 1))
            window = mask[top : top + bh, left : left + bw]
            new = int((~window).sum())
            if 0 < new <= budget:
                window.fill_(True)
                return new
        return 0

    def _grow(self, mask: torch.Tensor, extra: int, g: torch.Generator | None) -> None:
        """Add ``extra`` cells, each a random unmasked 4-neighbour of the mask (in place)."""
        for _ in range(extra):
            neighbours = torch.zeros_like(mask)
            neighbours[1:, :] |= mask[:-1, :]
            neighbours[:-1, :] |= mask[1:, :]
            neighbours[:, 1:] |= mask[:, :-1]
            neighbours[:, :-1] |= mask[:, 1:]
            candidates = (neighbours & ~mask).flatten().nonzero().flatten()
            if candidates.numel() == 0:  # empty mask so far: start anywhere
                candidates = (~mask).flatten().nonzero().flatten()
            pick = candidates[int(torch.randint(candidates.numel(), (), generator=g))]
            mask.view(-1)[pick] = True


class AttentionMaskGenerator(MaskGenerator):
    """Attention-only baseline: mask the cells the teacher finds most important.

    ``scores`` (B, h, w): the teacher's scan-attention importance. Ties break at random.
    """

    def __call__(self, batch_size, grid, *, scores=None, loss_map=None, step=0, generator=None):
        if scores is None:
            raise ValueError("the attention mask generator needs scores (teacher importance)")
        n = grid[0] * grid[1]
        base = normalize_per_image(scores.detach().float().cpu()).reshape(batch_size, n)
        # A tiny random jitter (< any real difference of the normalised scores) breaks ties.
        keys = base + 1e-6 * torch.rand(batch_size, n, generator=generator)
        return _mask_from_keys(keys, num_masked(n, self.ratio), grid)


class SelfAdaptiveMaskGenerator(MaskGenerator):
    """OpenUS self-adaptive masking (§3.3.3, Alg. 1).

    ALP = (1-α_t)·norm(teacher) + α_t·norm(student loss) (paper Eq. 7; ``weighting="code"``
    swaps the weights as the authors' code does), each map min-max normalised per image.
    The top ``k = floor(N·r_t)`` ALP cells are masked, then random other cells up to
    ``n_mask``; if ``k ≥ n_mask`` only the top ``n_mask``. ``α_t`` rises 0.1 → 0.9 on a
    cosine curve and ``r_t`` 0.1 → 0.9 linearly over ``total_steps`` (the paper's per-epoch
    schedules, evaluated per step). Without a loss map (first visit) ALP = teacher only.
    """

    def __init__(
        self,
        ratio: float,
        total_steps: int,
        *,
        alpha: tuple[float, float] = (0.1, 0.9),
        r: tuple[float, float] = (0.1, 0.9),
        weighting: str = "paper",
    ):
        super().__init__(ratio)
        if weighting not in ("paper", "code"):
            raise ValueError(f"weighting must be 'paper' or 'code', got {weighting!r}")
        self.weighting = weighting
        self.alpha_schedule = cosine_schedule(alpha[0], alpha[1], max(total_steps, 1))
        self.r_schedule = linear_schedule(r[0], r[1], max(total_steps, 1))

    def alpha(self, step: int) -> float:
        """α at ``step`` (clamped to the schedule's end)."""
        return float(self.alpha_schedule[min(step, len(self.alpha_schedule) - 1)])

    def r(self, step: int) -> float:
        """Fraction r_t of cells chosen by ALP (the rest of the mask is random)."""
        return float(self.r_schedule[min(step, len(self.r_schedule) - 1)])

    def stats(self, step: int) -> dict[str, float]:
        return {"alpha": self.alpha(step), "r": self.r(step)}

    def alp(self, scores: torch.Tensor, loss_map: torch.Tensor | None, step: int) -> torch.Tensor:
        """Adaptive Learning Priority. scores, loss_map (B, h, w) → (B, h, w) in [0, 1]."""
        teacher = normalize_per_image(scores.detach().float().cpu())
        if loss_map is None:
            return teacher
        student = normalize_per_image(loss_map.detach().float().cpu())
        a = self.alpha(step)
        if self.weighting == "paper":
            return (1.0 - a) * teacher + a * student
        return a * teacher + (1.0 - a) * student

    def __call__(self, batch_size, grid, *, scores=None, loss_map=None, step=0, generator=None):
        if scores is None:
            raise ValueError("the self-adaptive mask generator needs scores (teacher importance)")
        n = grid[0] * grid[1]
        n_mask = num_masked(n, self.ratio)
        k = min(math.floor(n * self.r(step)), n_mask)
        alp = self.alp(scores, loss_map, step).reshape(batch_size, n)
        noise = torch.rand(batch_size, n, generator=generator)
        keys = noise.clone()  # random order for the non-top cells, in [0, 1)
        if k > 0:
            top = alp.topk(k, dim=1).indices
            keys.scatter_(1, top, 2.0)  # top-ALP cells sort before every random key
        return _mask_from_keys(keys, n_mask, grid)


def build_mask_generator(
    kind: str,
    ratio: float,
    *,
    total_steps: int = 1,
    alpha=(0.1, 0.9),
    r=(0.1, 0.9),
    weighting: str = "paper",
    min_patches: int = 4,
    aspect: float = 0.3,
) -> MaskGenerator:
    """Factory for ``kind`` ∈ {"self_adaptive", "attention", "block", "random"}."""
    if kind == "self_adaptive":
        return SelfAdaptiveMaskGenerator(ratio, total_steps, alpha=alpha, r=r, weighting=weighting)
    if kind == "attention":
        return AttentionMaskGenerator(ratio)
    if kind == "block":
        return BlockMaskGenerator(ratio, min_patches=min_patches, aspect=aspect)
    if kind == "random":
        return RandomMaskGenerator(ratio)
    raise ValueError(f"unknown mask generator {kind!r}")
