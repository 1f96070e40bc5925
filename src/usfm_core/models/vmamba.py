"""VMamba backbone (Liu et al. 2024) as used by OpenUS (§3.1): SS2D, VSS blocks, 4 stages.

Layout: a stem of two 3×3 stride-2 convolutions (patch 4) gives the ``H/4 × W/4`` grid; each of
the 4 stages is (a 3×3 stride-2 conv + LayerNorm down-sampling, except stage 0) followed by VSS
blocks.  Inside, feature maps are channels-last ``(B, H, W, C)``; outputs are channels-first.

The 2-D selective scan (SS2D) reads the map in 4 orders (row-major, column-major and both
reversed), runs one selective scan over the 4 sequences stacked as groups, and merges the 4
outputs back to row-major order by summation: :func:`usfm_core.models.scan.cross_selective_scan`
(fast CPU backend chosen automatically; with the C kernel the four directions, the permutations
and the merge are one fused pass that never copies the map four times).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usfm_core.errors import ConfigError
from usfm_core.models.common import adapt_input
from usfm_core.models.limits import VMAMBA_FIELDS, check_fields, check_param_budget
from usfm_core.models.scan import cross_merge, cross_scan, cross_selective_scan, to_direction_order

__all__ = [
    "SS2D",
    "BackboneOutput",
    "DropPath",
    "VMamba",
    "VMambaConfig",
    "VSSBlock",
    "cross_merge",
    "cross_scan",
]

_PRESETS: dict[str, dict] = {
    # Test size: ≈ 0.46 M parameters.
    "tiny": {"depths": (1, 1, 2, 1), "dims": 16, "d_state": 1, "ssm_ratio": 2.0},
    # ≈ 3.6 M parameters, but 2 blocks at stride 4 and ssm_ratio 2: ~10 frames/s at 256².
    "small-cpu": {
        "depths": (2, 2, 6, 2),
        "dims": 32,
        "d_state": 1,
        "ssm_ratio": 2.0,
        "drop_path_rate": 0.1,
    },
    # The shipped models' backbone (≈ 2.5 M): one block at strides 4 and 8, where the scan is
    # long and the work memory-bound; width and depth at strides 16/32, where parameters are
    # cheap to run; ssm_ratio 1 halves the scanned channels. With the U-Net decoder: 20.7
    # frames/s at 256² end to end on one CPU core (benchmarks/label_efficiency.py).
    "small-fast": {
        "depths": (1, 1, 4, 2),
        "dims": (16, 48, 128, 256),
        "d_state": 1,
        "ssm_ratio": 1.0,
        "drop_path_rate": 0.1,
    },
    # VMamba-T v2 with ssm_ratio 2 (≈ 30 M), VMamba-S (≈ 50 M, OpenUS), VMamba-B (≈ 89 M).
    "vmamba-t": {"depths": (2, 2, 5, 2), "dims": 96, "d_state": 1, "ssm_ratio": 2.0},
    "vmamba-s": {
        "depths": (2, 2, 15, 2),
        "dims": 96,
        "d_state": 1,
        "ssm_ratio": 2.0,
        "drop_path_rate": 0.3,
    },
    "vmamba-b": {
        "depths": (2, 2, 15, 2),
        "dims": 128,
        "d_state": 1,
        "ssm_ratio": 2.0,
        "drop_path_rate": 0.5,
    },
}


@dataclass
class VMambaConfig:
    """Hyper-parameters of :class:`VMamba`.

    ``dims`` is the stage-0 width (doubled per stage) or a list of 4 widths. ``dt_rank="auto"``
    means ``ceil(C / 16)`` for a block of width ``C``. ``use_z_gate=False`` is VMamba's
    "v05_noz" (no multiplicative SiLU gate). ``attention_stage``/``attention_block`` pick the
    block whose scan-attention ``forward(return_attention=True)`` reports (default: the last).
    """

    in_chans: int = 3
    depths: tuple[int, ...] = (2, 2, 5, 2)
    dims: int | tuple[int, ...] = 96
    d_state: int = 1
    ssm_ratio: float = 2.0
    dt_rank: int | str = "auto"
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    use_z_gate: bool = False
    conv_kernel: int = 3
    patch_size: int = 4
    norm_eps: float = 1e-5
    scan_backend: str = "auto"
    attention_stage: int = -1
    attention_block: int = -1

    def __post_init__(self) -> None:
        try:
            self.depths = tuple(int(d) for d in self.depths)
            if not isinstance(self.dims, int):
                self.dims = tuple(int(d) for d in self.dims)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"depths / dims must be integers or lists of them: {exc}") from None
        self.validate()

    @property
    def stage_dims(self) -> list[int]:
        """Width of each of the 4 stages."""
        if isinstance(self.dims, int):
            return [self.dims * 2**i for i in range(len(self.depths))]
        return list(self.dims)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values the model cannot be built with (types and
        ranges from :data:`usfm_core.models.limits.VMAMBA_FIELDS`, then consistency)."""
        check_fields(asdict(self), VMAMBA_FIELDS, "VMamba config", from_json=False)
        if self.in_chans not in (1, 3):
            raise ConfigError(f"in_chans must be 1 or 3, got {self.in_chans}")
        if len(self.depths) != 4 or min(self.depths) < 1:
            raise ConfigError(f"depths must be 4 positive ints, got {self.depths}")
        if len(self.stage_dims) != 4 or min(self.stage_dims) < 2:
            raise ConfigError(f"dims must be an int or 4 ints ≥ 2, got {self.dims}")
        if self.patch_size != 4:
            raise ConfigError(
                f"patch_size must be 4 (two stride-2 stem convs), got {self.patch_size}"
            )
        if self.d_state < 1 or self.ssm_ratio <= 0 or self.mlp_ratio < 0:
            raise ConfigError("d_state must be ≥ 1, ssm_ratio > 0 and mlp_ratio ≥ 0")
        if not (self.dt_rank == "auto" or (isinstance(self.dt_rank, int) and self.dt_rank > 0)):
            raise ConfigError(f"dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        if self.conv_kernel % 2 != 1:
            raise ConfigError(f"conv_kernel must be odd, got {self.conv_kernel}")
        check_param_budget(self.estimate_params(), "this VMamba config")  # before allocating

    @classmethod
    def preset(cls, name: str, **overrides) -> VMambaConfig:
        """Named configuration: one of :meth:`preset_names` ("tiny", "small-fast", ...)."""
        if name not in _PRESETS:
            raise ConfigError(
                f"unknown VMamba preset {name!r}", hint=f"use one of {sorted(_PRESETS)}"
            )
        return cls(**{**_PRESETS[name], **overrides})

    @staticmethod
    def preset_names() -> list[str]:
        """Names accepted by :meth:`preset`."""
        return list(_PRESETS)

    def to_dict(self) -> dict:
        """JSON-friendly dict (tuples become lists)."""
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict) -> VMambaConfig:
        """Inverse of :meth:`to_dict`. Unknown keys, wrong types and out-of-range values (see
        :data:`usfm_core.models.limits.VMAMBA_FIELDS`) raise :class:`ConfigError` naming the
        field, before anything is converted or allocated."""
        check_fields(data, VMAMBA_FIELDS, "VMamba config")
        return cls(**data)

    def estimate_params(self) -> int:
        """Number of parameters :class:`VMamba` would have, computed from the config alone
        (no allocation); used to refuse absurd configs before building."""
        dims = self.stage_dims
        c0, half = dims[0], dims[0] // 2
        n = self.in_chans * half * 9 + half + 2 * half  # stem conv1 + norm1
        n += half * c0 * 9 + c0 + 2 * c0 + c0  # stem conv2 + norm2, mask token
        n += sum(a * b * 9 + b + 2 * b for a, b in itertools.pairwise(dims))  # downsamples
        n += sum(depth * _vss_block_params(dim, self) for depth, dim in zip(self.depths, dims))
        return n + 2 * dims[-1]  # final norm


def _vss_block_params(dim: int, cfg: VMambaConfig) -> int:
    """Parameters of one :class:`VSSBlock` of width ``dim`` (mirrors its ``__init__``)."""
    d_inner = int(cfg.ssm_ratio * dim)
    rank = math.ceil(dim / 16) if cfg.dt_rank == "auto" else int(cfg.dt_rank)
    k = SS2D.n_dirs
    n = 2 * dim  # norm1
    n += dim * d_inner * (2 if cfg.use_z_gate else 1)  # in_proj
    n += d_inner * cfg.conv_kernel**2 + d_inner  # depth-wise conv
    n += k * (rank + 2 * cfg.d_state) * d_inner + k * d_inner * rank + k * d_inner  # x/dt proj
    n += k * d_inner * cfg.d_state + k * d_inner  # A_log, Ds
    n += 2 * d_inner + d_inner * dim  # out_norm, out_proj
    if cfg.mlp_ratio > 0:
        hidden = int(dim * cfg.mlp_ratio)
        n += 2 * dim + dim * hidden + hidden + hidden * dim + dim  # norm2 + MLP
    return n


@dataclass
class BackboneOutput:
    """What every backbone returns.

    ``features``: stage maps ``(B, C_i, h_i, w_i)``; ``patch_tokens`` ``(B, L, C)`` of the last
    map in row-major order; ``global_token`` ``(B, C)``; ``tokens`` ``(B, 1 + L, C)`` (global
    first); ``grid`` ``(h, w)`` of the last map; ``importance`` ``(B, h, w)`` scan-attention
    importance in [0, 1] (only when asked for).
    """

    features: list[Tensor]
    patch_tokens: Tensor
    global_token: Tensor
    tokens: Tensor
    grid: tuple[int, int]
    importance: Tensor | None = None


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        # Scale the (B, 1, ..) mask, not x: one full-size multiply (and one in the backward).
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


def _inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


class SS2D(nn.Module):
    """2-D selective scan mixer on channels-last maps ``(B, H, W, C)`` → ``(B, H, W, C)``."""

    n_dirs = 4

    def __init__(
        self,
        dim: int,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        use_z_gate: bool = False,
        conv_kernel: int = 3,
        norm_eps: float = 1e-5,
        scan_backend: str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ):
        super().__init__()
        self.d_inner = d_inner = int(ssm_ratio * dim)
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_z_gate = use_z_gate
        self.scan_backend = scan_backend
        k = self.n_dirs
        self.in_proj = nn.Linear(dim, d_inner * (2 if use_z_gate else 1), bias=False)
        self.conv = nn.Conv2d(
            d_inner, d_inner, conv_kernel, padding=conv_kernel // 2, groups=d_inner
        )
        # Per direction: x → (Δ low-rank, B, C); Δ low-rank → D channels.
        bound = d_inner**-0.5
        self.x_proj_weight = nn.Parameter(
            torch.empty(k, self.dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound)
        )
        dt_std = self.dt_rank**-0.5
        self.dt_proj_weight = nn.Parameter(
            torch.empty(k, d_inner, self.dt_rank).uniform_(-dt_std, dt_std)
        )
        # Mamba init: Δ = softplus(bias) log-uniform in [dt_min, dt_max].
        dt = torch.exp(
            torch.rand(k, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp_min(1e-4)
        self.dt_proj_bias = nn.Parameter(_inverse_softplus(dt))
        # A = −exp(A_log) with A_log = log(1..N) for every channel; skip connection D = 1.
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(k * d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))  # (K·D, N)
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        self.out_norm = nn.LayerNorm(d_inner, eps=norm_eps)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.record_scan = False
        self._record: dict | None = None

    def pop_record(self) -> dict:
        """Scan parameters recorded by the last forward (see :attr:`record_scan`), then clear.

        Keys: ``delta`` ``(B, 4, D, L)`` (after bias + softplus), ``A`` ``(4, D, N)``,
        ``B``/``C`` ``(B, 4, N, L)``, ``hw`` ``(h, w)``; all detached.
        """
        if self._record is None:
            raise RuntimeError("no scan recorded: set record_scan = True before forward")
        rec, self._record = self._record, None
        return rec

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        length, d, n, k = h * w, self.d_inner, self.d_state, self.n_dirs
        x = self.in_proj(x)
        z = None
        if self.use_z_gate:
            x, z = x.chunk(2, dim=-1)
        x = F.silu(self.conv(x.permute(0, 3, 1, 2))).contiguous()  # (B, D, H, W)
        # The per-direction projections act per position, so they commute with the
        # directions' permutations: project the D-channel map once (one matmul) and permute
        # only the R + 2N projected channels, instead of projecting 4 permuted copies of x.
        c = self.x_proj_weight.shape[1]
        x_dbl = torch.matmul(self.x_proj_weight.reshape(k * c, d), x.view(b, d, length))
        x_dbl = to_direction_order(x_dbl.view(b, k, c, length), h, w)  # (B, 4, R + 2N, L)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, n, n], dim=2)
        dts = torch.matmul(self.dt_proj_weight, dts)  # (4, D, R) @ (B, 4, R, L) -> (B, 4, D, L)
        a = -torch.exp(self.A_log.float())  # (4·D, N)
        # The scan runs in fp32 (half-precision scans produce NaNs); with the C backend the
        # four directions, cross-scan and cross-merge are one fused kernel.
        y = cross_selective_scan(
            x.float(),
            dts.float(),
            a,
            bs.float(),
            cs.float(),
            D=self.Ds.float(),
            delta_bias=self.dt_proj_bias.reshape(-1).float(),
            delta_softplus=True,
            backend=self.scan_backend,
        )  # (B, D, L) row-major
        if self.record_scan:
            with torch.no_grad():
                delta = F.softplus(dts.float() + self.dt_proj_bias.float()[None, :, :, None])
                self._record = {
                    "delta": delta.detach(),
                    "A": a.detach().view(k, d, n),
                    "B": bs.detach().float(),
                    "C": cs.detach().float(),
                    "hw": (h, w),
                }
        y = self.out_norm(y.transpose(1, 2).reshape(b, h, w, d).to(x.dtype))
        if z is not None:
            y = y * F.silu(z)
        return self.out_proj(y)


class Mlp(nn.Module):
    """Linear → GELU → Linear on the last dim."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VSSBlock(nn.Module):
    """``x + DropPath(SS2D(LN x))`` then ``x + DropPath(MLP(LN x))`` on ``(B, H, W, C)``."""

    def __init__(self, dim: int, cfg: VMambaConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.ss2d = SS2D(
            dim,
            d_state=cfg.d_state,
            ssm_ratio=cfg.ssm_ratio,
            dt_rank=cfg.dt_rank,
            use_z_gate=cfg.use_z_gate,
            conv_kernel=cfg.conv_kernel,
            norm_eps=cfg.norm_eps,
            scan_backend=cfg.scan_backend,
        )
        self.drop_path = DropPath(drop_path)
        self.mlp: Mlp | None = None
        if cfg.mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
            self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ss2d(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


# Below this many channels a CPU LayerNorm over channels runs as channels-first tensor ops
# (_ChannelsFirstNorm): torch's native CPU LayerNorm backward over 8 values per row took 3.0 ms
# for a (8, 8, 64, 64) map where 16 values per row took 0.34 ms (AVX-512 machine, 2 threads);
# the channels-first version takes 0.7 ms (forward + backward), the same arithmetic.
SMALL_NORM_CHANNELS = 16


class _ChannelsFirstNorm(torch.autograd.Function):
    """LayerNorm over dim 1 of ``(B, C, H, W)``, forward and backward as reductions over C.

    Same definition as ``F.layer_norm`` over the channels of each pixel (biased variance,
    ``eps`` inside the square root, per-channel ``weight`` and ``bias``); returns ``(B, C, H,
    W)``. The backward is the standard LayerNorm adjoint
    ``∂x = rstd · (ĝ − mean_C ĝ − x̂ · mean_C(ĝ x̂))`` with ``ĝ = ∂y · weight``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        mean = x.mean(1, keepdim=True)
        xhat = x - mean
        rstd = torch.rsqrt(xhat.square().mean(1, keepdim=True) + eps)  # (B, 1, H, W)
        xhat.mul_(rstd)
        ctx.save_for_backward(xhat, rstd, weight)
        return torch.addcmul(bias.view(1, -1, 1, 1), xhat, weight.view(1, -1, 1, 1))

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:
        xhat, rstd, weight = ctx.saved_tensors
        gy = gy.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gw = (gy * xhat).sum((0, 2, 3)) if need_w else None
        gb = gy.sum((0, 2, 3)) if need_b else None
        gx = None
        if need_x:
            ghat = gy * weight.view(1, -1, 1, 1)
            m2 = (ghat * xhat).mean(1, keepdim=True)
            gx = ghat.sub_(ghat.mean(1, keepdim=True)).sub_(xhat * m2).mul_(rstd)
        return gx, gw, gb, None


class ChannelsLastNorm(nn.Module):
    """LayerNorm over channels of a channels-first map ``(B, C, H, W)`` → ``(B, H, W, C)``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.shape[1] < SMALL_NORM_CHANNELS
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu")
        ):
            n = self.norm
            y = _ChannelsFirstNorm.apply(x.contiguous(), n.weight, n.bias, n.eps)
            return y.permute(0, 2, 3, 1)
        return self.norm(x.permute(0, 2, 3, 1))


class Stem(nn.Module):
    """Two 3×3 stride-2 convs: ``(B, C_in, H, W)`` → ``(B, H/4, W/4, C0)``."""

    def __init__(self, in_chans: int, dim: int, eps: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = ChannelsLastNorm(dim // 2, eps)
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = ChannelsLastNorm(dim, eps)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.norm1(self.conv1(x))).permute(0, 3, 1, 2)
        return self.norm2(self.conv2(x))


class Downsample(nn.Module):
    """3×3 stride-2 conv + LayerNorm: ``(B, H, W, C)`` → ``(B, H/2, W/2, C')``."""

    def __init__(self, dim: int, out_dim: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = ChannelsLastNorm(out_dim, eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W) with channels-last strides
        # A channels-last input makes the CPU convolution copy its weight into channels-last
        # order on every call (forward and backward). Where the weight is much larger than the
        # map a channels-first copy of the map is the cheaper copy. Measured (Intel AVX-512, one
        # thread; weight / map size in brackets): forward 7.8 → 2.7 ms for VMamba-T's last
        # Downsample at 224² (35×), 1.3 → 0.7 ms for (8, 8, 8, 128) → 256 (4.5×), forward +
        # backward 3.5 → 2.4 ms there; slower below: (4, 16, 16, 128) → 256 (2.3×) 1.5 → 1.8 ms,
        # (1, 28, 28, 192) → 384 (4.4×) 1.86 → 1.98 ms.
        if x.device.type == "cpu" and self.conv.weight.numel() > 4 * x.numel():
            x = x.contiguous()
        return self.norm(self.conv(x))


class VMamba(nn.Module):
    """Hierarchical VMamba encoder with OpenUS's mask token and scan-attention read-out.

    Input ``(B, C, H, W)`` with H, W divisible by 32. A 1-channel image given to a 3-channel
    model is repeated over channels; a 3-channel image given to a 1-channel model is averaged.
    """

    stride = 32

    def __init__(self, config: VMambaConfig | None = None):
        super().__init__()
        self.config = cfg = config or VMambaConfig()
        dims = cfg.stage_dims
        self.stem = Stem(cfg.in_chans, dims[0], cfg.norm_eps)
        self.mask_token = nn.Parameter(torch.zeros(dims[0]))
        n_blocks = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        self.downsamples = nn.ModuleList(
            [nn.Identity()] + [Downsample(dims[i - 1], dims[i], cfg.norm_eps) for i in range(1, 4)]
        )
        self.stages = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            start = sum(cfg.depths[:i])
            self.stages.append(
                nn.ModuleList(VSSBlock(dims[i], cfg, rates[start + j]) for j in range(depth))
            )
        self.norm = nn.LayerNorm(dims[-1], eps=cfg.norm_eps)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @property
    def embed_dim(self) -> int:
        """Width of the last stage (= global / patch token size)."""
        return self.config.stage_dims[-1]

    @property
    def out_dims(self) -> list[int]:
        """Width of each stage's feature map."""
        return self.config.stage_dims

    def get_ss2d(self, stage: int = -1, block: int = -1) -> SS2D:
        """The SS2D module of block ``block`` of stage ``stage`` (negative = from the end)."""
        try:
            return self.stages[stage][block].ss2d
        except IndexError:
            raise ValueError(
                f"no block {block} in stage {stage} (depths {self.config.depths})"
            ) from None

    @contextlib.contextmanager
    def recording(self, stage: int = -1, block: int = -1) -> Iterator[SS2D]:
        """Context in which the chosen block records its scan parameters during forward."""
        ss2d = self.get_ss2d(stage, block)
        ss2d.record_scan = True
        try:
            yield ss2d
        finally:
            ss2d.record_scan = False
            ss2d._record = None

    def _adapt_input(self, x: Tensor) -> Tensor:
        return adapt_input(x, self.config.in_chans, self.stride)

    def apply_mask(self, x: Tensor, mask: Tensor) -> Tensor:
        """Replace masked patch embeddings by :attr:`mask_token`.

        ``x``: ``(B, h, w, C0)`` patch embeddings; ``mask``: bool ``(B, h_m, w_m)`` on any
        stage grid whose cells tile ``(h, w)``; it is upsampled (nearest) to ``(h, w)``.
        """
        b, h, w, _ = x.shape
        if mask.dim() != 3 or mask.shape[0] != b:
            raise ValueError(f"mask must be (B, h, w) with B = {b}, got {tuple(mask.shape)}")
        hm, wm = mask.shape[1:]
        if hm == 0 or wm == 0 or h % hm or w % wm or h // hm != w // wm:
            raise ValueError(f"mask grid {hm}×{wm} does not tile the {h}×{w} patch grid")
        f = h // hm
        m = mask.bool().repeat_interleave(f, dim=1).repeat_interleave(f, dim=2)
        return torch.where(m[..., None], self.mask_token.to(x.dtype), x)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False
    ) -> BackboneOutput:
        """Encode ``x`` ``(B, C, H, W)``; see :class:`BackboneOutput` for the fields."""
        x = self._adapt_input(x)
        ctx = (
            self.recording(self.config.attention_stage, self.config.attention_block)
            if return_attention
            else contextlib.nullcontext()
        )
        with ctx as ss2d:
            out = self._forward(x, mask)
            if ss2d is not None:
                out.importance = _importance(ss2d.pop_record())
        return out

    def _forward(self, x: Tensor, mask: Tensor | None) -> BackboneOutput:
        x = self.stem(x)  # (B, H/4, W/4, C0)
        if mask is not None:
            x = self.apply_mask(x, mask)
        features = []
        for i, (down, blocks) in enumerate(zip(self.downsamples, self.stages)):
            x = down(x)
            for blk in blocks:
                x = blk(x)
            if i == len(self.stages) - 1:
                x = self.norm(x)
            features.append(x.permute(0, 3, 1, 2).contiguous())
        b, h, w, c = x.shape
        patch = x.reshape(b, h * w, c)
        glob = patch.mean(dim=1)
        tokens = torch.cat([glob[:, None], patch], dim=1)
        return BackboneOutput(features, patch, glob, tokens, (h, w))


@torch.no_grad()
def _importance(rec: dict) -> Tensor:
    """Per-token importance ``(B, h, w)`` in [0, 1] from a recorded scan."""
    from usfm_core.models.attention import minmax_normalise, scan_attention_map

    _, imp = scan_attention_map(rec["delta"], rec["A"], rec["B"], rec["C"], directions_hw=rec["hw"])
    h, w = rec["hw"]
    return minmax_normalise(imp, dims=(1,)).view(-1, h, w)


def _init_weights(m: nn.Module) -> None:
    """Truncated-normal linear weights, zero biases, unit LayerNorms (VMamba's init)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
