"""Per-site L2 PGD on a model of IT, batched over images × sites × ε × signs, quantisation-aware.

Each row of a job is one (image, site, ε, sign, restart). A batch of rows runs as one forward and
one input-gradient backward per step: the objective is the SUM over rows of
``sign · f_site(x + δ)``, and since rows are independent in an eval-mode network (BatchNorm uses
running statistics), the gradient of that sum with respect to the batched input is every row's own
gradient. Maximising ``sign · f`` is the paper's ``MSE(f, ±1000)`` up to a positive per-row
factor ``2·|1000 − sign·f|``, which the L2-normalised step removes, while ``|f| < 1000``.

The loop: random start uniform in the ball, then ``steps`` of ``δ ← Π(δ + (ε/3)·g/‖g‖)`` with Π the
exact projection onto ball ∩ box (:mod:`itloop.stimulus.constraints`), keeping the iterate with the
largest predicted change. The image, δ and Π are fp32; so is the first layer's input (see
:mod:`itloop.stimulus.precision`); the rest may run under bf16 autocast. Then the perturbation is
moved onto the 8-bit grid within the requested ε
(:func:`~itloop.stimulus.quantisation.quantise_perturbation`, guided by the gradient at the rounded
point), and ``f(x)`` and ``f(x + δ)`` of the generating model are computed in exact fp32 on the
quantised clean and perturbed images. Signs and restarts are then chosen by that predicted change
alone (:func:`select_largest_change`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.profiler import record_function

from itloop.stimulus import fused_step
from itloop.stimulus.constraints import project_l2_box_step, random_start_l2_box
from itloop.stimulus.errors import AttackError
from itloop.stimulus.folding import fold_batchnorm
from itloop.stimulus.fusion import fuse_conv_relu
from itloop.stimulus.precision import (
    exact_fp32,
    keep_first_conv_fp32,
    set_stem_references,
    split_first_conv,
)
from itloop.stimulus.quantisation import (
    LEVELS,
    from_levels,
    perturbed_levels,
    quantise_perturbation,
    realised_eps_l2,
    to_levels,
)
from itloop.stimulus.randomness import normal_and_uniform, row_keys
from itloop.stimulus.sharding import Group, gather_rows_to_first, shard_bounds, world

__all__ = [
    "GEMM_TEMPLATE_OPTIONS",
    "AttackConfig",
    "AttackEngine",
    "AttackResult",
    "AttackRows",
    "row_noise",
    "select_largest_change",
]

_DIMS = (1, 2, 3)
_BOX_TOL = 1e-6
_NORM_RTOL = 1e-5


@dataclass(frozen=True)
class AttackRows:
    """The rows of an attack job: (R,) image, site, requested ε (L2, [0, 1] units) and sign (±1)."""

    image_index: Tensor
    site_index: Tensor
    eps_l2: Tensor
    sign: Tensor

    def __post_init__(self) -> None:
        n = self.image_index.shape[0] if self.image_index.ndim == 1 else -1
        for name in ("image_index", "site_index", "eps_l2", "sign"):
            t: Tensor = getattr(self, name)
            if t.ndim != 1 or t.shape[0] != n:
                raise ValueError(f"{name} must be ({n},), got {tuple(t.shape)}")
        if self.image_index.dtype != torch.int64 or self.site_index.dtype != torch.int64:
            raise ValueError("image_index and site_index must be int64")
        if n and bool((self.image_index < 0).any() | (self.site_index < 0).any()):
            raise ValueError("image_index and site_index must be >= 0")
        if n and (not bool(torch.isfinite(self.eps_l2).all()) or bool((self.eps_l2 < 0).any())):
            raise ValueError(f"eps_l2 must be finite and >= 0, got {self.eps_l2.tolist()!r}")
        if n and not bool(((self.sign == 1) | (self.sign == -1)).all()):
            raise ValueError(f"sign must be +1 or -1, got {sorted(set(self.sign.tolist()))!r}")

    def __len__(self) -> int:
        return int(self.image_index.shape[0])

    @classmethod
    def grid(
        cls,
        image_index: Sequence[int] | Tensor,
        site_index: Sequence[int] | Tensor,
        eps_l2: Sequence[float],
        *,
        signs: Sequence[int] = (1, -1),
        restarts: int = 1,
    ) -> AttackRows:
        """Rows for (image, site) pairs × ε × restarts × signs, sign varying fastest.

        image_index, site_index: (P,) the pairs (each site has its own images in the paper's
        design).
        """
        img = torch.as_tensor(image_index, dtype=torch.int64).flatten()
        site = torch.as_tensor(site_index, dtype=torch.int64).flatten()
        if img.shape != site.shape:
            raise ValueError(f"{img.numel()} image indices for {site.numel()} site indices")
        if restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {restarts}")
        eps = torch.as_tensor(list(eps_l2), dtype=torch.float64)
        sg = torch.as_tensor(list(signs), dtype=torch.int8)
        n_e, n_s = eps.numel(), sg.numel()
        per_pair = n_e * restarts * n_s
        return cls(
            image_index=img.repeat_interleave(per_pair),
            site_index=site.repeat_interleave(per_pair),
            eps_l2=eps.repeat_interleave(restarts * n_s).repeat(img.numel()),
            sign=sg.repeat(img.numel() * n_e * restarts),
        )

    def take(self, index: Tensor) -> AttackRows:
        """The rows at (K,) int64 index."""
        return AttackRows(
            self.image_index[index], self.site_index[index], self.eps_l2[index], self.sign[index]
        )


@dataclass(frozen=True)
class AttackResult:
    """One attack's output, per row; every tensor on the CPU.

    row_index: (R,) index into the job's AttackRows; image_index, site_index, sign: (R,) as
    requested; eps_l2: (R,) float64 requested ε; realised_eps_l2: (R,) float64 L2 of the quantised
    perturbation; delta_levels: (R, C, H, W) int16 quantised perturbation in 8-bit levels (δ =
    delta_levels / 255); f_clean, f_adv: (R,) float32 generating model's prediction for the site on
    the quantised clean and perturbed images (exact fp32); f_adv_unquantised: (R,) the attack loop's
    prediction before rounding.
    """

    row_index: Tensor
    image_index: Tensor
    site_index: Tensor
    sign: Tensor
    eps_l2: Tensor
    realised_eps_l2: Tensor
    delta_levels: Tensor
    f_clean: Tensor
    f_adv: Tensor
    f_adv_unquantised: Tensor

    def __len__(self) -> int:
        return int(self.row_index.shape[0])

    @property
    def delta(self) -> Tensor:
        """(R, C, H, W) float32 quantised perturbation in [0, 1] units."""
        return self.delta_levels.float() / LEVELS

    @property
    def predicted_change(self) -> Tensor:
        """(R,) f(x + δ) − f(x) on the quantised images."""
        return self.f_adv - self.f_clean

    def adversarial_levels(self, clean_levels: Tensor) -> Tensor:
        """(M, C, H, W) uint8 clean images of the job -> (R, C, H, W) uint8 perturbed stimuli."""
        base = clean_levels[self.image_index]
        return torch.from_numpy(perturbed_levels(base.numpy(), self.delta_levels.numpy()))

    def take(self, index: Tensor) -> AttackResult:
        """The rows at (K,) int64 index."""
        return AttackResult(**{k: getattr(self, k)[index] for k in _RESULT_FIELDS})

    def rows(self, start: int, stop: int) -> AttackResult:
        """Rows ``start:stop`` as views of these tensors (no copy)."""
        return AttackResult(**{k: getattr(self, k)[start:stop] for k in _RESULT_FIELDS})

    def tensors(self) -> dict[str, Tensor]:
        """Every field by name (the tensors themselves, not copies)."""
        return {k: getattr(self, k) for k in _RESULT_FIELDS}

    @staticmethod
    def empty(image_shape: Sequence[int]) -> AttackResult:
        """No rows, for images of (C, H, W) ``image_shape``."""
        z = torch.zeros(0)
        i64 = torch.zeros(0, dtype=torch.int64)
        return AttackResult(
            row_index=i64,
            image_index=i64.clone(),
            site_index=i64.clone(),
            sign=torch.zeros(0, dtype=torch.int8),
            eps_l2=z.double(),
            realised_eps_l2=z.double(),
            delta_levels=torch.zeros((0, *image_shape), dtype=torch.int16),
            f_clean=z,
            f_adv=z.clone(),
            f_adv_unquantised=z.clone(),
        )

    @staticmethod
    def concat(parts: Sequence[AttackResult]) -> AttackResult:
        """Rows of several results, in order."""
        if not parts:
            raise ValueError("nothing to concatenate")
        return AttackResult(
            **{k: torch.cat([getattr(p, k) for p in parts]) for k in _RESULT_FIELDS}
        )


_RESULT_FIELDS = tuple(AttackResult.__dataclass_fields__)


def group_keys(result: AttackResult) -> np.ndarray:
    """(R, 3) float64 (image, site, ε) of each row: the rows of one key compete for one stimulus."""
    return np.stack(
        [
            result.image_index.numpy().astype(np.float64),
            result.site_index.numpy().astype(np.float64),
            result.eps_l2.numpy().astype(np.float64),
        ],
        axis=1,
    )


def select_largest_change(result: AttackResult) -> AttackResult:
    """Per (image, site, ε), the row (sign, restart) with the largest predicted |f(x + δ) − f(x)|.

    Ties go to the earlier row. Returns the kept rows in order of their first row.
    """
    if len(result) == 0:
        return result
    keys = group_keys(result)
    change = result.predicted_change.abs().double().numpy()
    n = len(result)
    order = np.lexsort((np.arange(n), -change, keys[:, 2], keys[:, 1], keys[:, 0]))
    keys = keys[order]
    first = np.ones(n, dtype=bool)
    first[1:] = np.any(keys[1:] != keys[:-1], axis=1)
    kept = np.sort(order[first])
    return result.take(torch.from_numpy(kept))


Draw = Callable[[Tensor, int], tuple[Tensor, Tensor]]
"""(B, 2) row keys, n -> ((B, n) N(0, 1), (B,) U(0, 1)): :func:`randomness.normal_and_uniform`."""


def row_noise(
    base_seed: int,
    rows: Sequence[int],
    shape: tuple[int, ...],
    device: torch.device,
    *,
    draw: Draw = normal_and_uniform,
) -> tuple[Tensor, Tensor]:
    """Per-row random-start draws: ((B, *shape) N(0, 1), (B,) U(0, 1)), each row from its own key.

    A row's draws depend only on (base_seed, row), so any sharding or batching gives the same start
    (:mod:`itloop.stimulus.randomness`; ``draw`` may be a compiled copy of its generator).
    """
    keys = row_keys(base_seed, rows).to(device)
    noise, u = draw(keys, math.prod(shape))
    return noise.view(len(rows), *shape), u


@dataclass(frozen=True)
class AttackConfig:
    """How the attack runs; the defaults are the paper's (100 steps of ε/3, random start).

    autocast_dtype: dtype of the network body in the loop (None: fp32); the first layer stays fp32.
    split_first_conv: under autocast, evaluate the first convolution as exact-fp32 conv(x) plus
    conv(δ) in the autocast dtype (precision.SplitStem); False: one fp32 convolution of x + δ.
    stem_channel_multiple: the split convolution's input channels are zero-padded to a multiple of
    this (8 lets bf16 tensor cores take a 3-channel input).
    stem_space_to_depth: a strided split convolution runs as a stride-1 convolution on s×s blocks
    of δ (ResNet's 7×7/2 on 3 channels becomes 4×4/1 on 12), which tensor cores take well.
    stem_output_block: with stem_space_to_depth, each position of that convolution computes a t×t
    block of the stem's output from (s·t)² blocks of δ (t = 2: ResNet's stem becomes 3×3/1 from 48
    to 256 channels, which runs its forward and data gradient in about half the time of t = 1).
    fuse_conv_relu: each Conv2d → (+ residual) → ReLU of the loop's copy runs as one cuDNN kernel
    (:mod:`itloop.stimulus.fusion`); on the CPU the fused op is the plain composition.
    fuse_blocks: with fuse_conv_relu, each BatchNorm-folded ResNet bottleneck runs as one op whose
    backward fuses the ReLU masks and residual sums into cuDNN data-gradient convolutions
    (:mod:`itloop.stimulus.blocks`); only with matmul_1x1 "none".
    matmul_1x1: how 1×1 convolutions run: "none" (cuDNN, fused with bias, residual and ReLU),
    "dgrad" (that forward, with the input gradient of the stride-1 ones as a matmul that a
    compiler can fuse the backward's ReLU masks and residual sums into) or "all" (forward and
    backward as matmuls over channels_last tensors, :class:`~itloop.stimulus.fusion.Conv1x1Matmul`).
    gemm_templates: with compile, matmuls run as autotuned Triton GEMMs with pointwise prologues
    and epilogues fused into them (:data:`GEMM_TEMPLATE_OPTIONS`); autotuning each GEMM shape once
    takes minutes.
    projection_iterations: active-set updates of the projection per step (feasible after any
    number).
    triton_step: with compile, on CUDA where Triton imports, the projected step runs as Triton
    kernels that cut each row over many programs (:mod:`itloop.stimulus.fused_step`) instead of
    inductor's kernel with one program per row; the same arithmetic.
    gradient_dtype: the dtype the loop's input gradient comes back in (None: the input's, fp32).
    bf16 halves the bytes of the backward's last write and of each pass of the step that reads the
    gradient; the gradient only sets the step's direction (its norm and the projection's sums are
    computed in fp32 from the rounded values), and δ, the image and x + δ stay fp32.
    """

    steps: int = 100
    step_ratio: float = 1.0 / 3.0
    batch_size: int = 256
    autocast_dtype: torch.dtype | None = torch.bfloat16
    keep_best: bool = True
    projection_iterations: int = 2
    fold_batchnorm: bool = True
    channels_last: bool = True
    compile: bool = False
    compile_mode: str | None = None
    quantisation_aware: bool = True
    split_first_conv: bool = True
    stem_channel_multiple: int = 8
    stem_space_to_depth: bool = True
    stem_output_block: int = 2
    fuse_conv_relu: bool = True
    fuse_blocks: bool = True
    matmul_1x1: str = "none"
    gemm_templates: bool = False
    triton_step: bool = False
    gradient_dtype: torch.dtype | None = None

    @classmethod
    def for_device(cls, device: torch.device, steps: int = 100) -> AttackConfig:
        """The loop's settings on ``device``, as the worker runs them and the benchmark measures
        them: on CUDA the measured fast path (bf16 body with the split first layer, channels_last,
        fused convolutions, compiled, the projected step as Triton kernels over tiles of each row,
        the input gradient in bf16, batch 512); elsewhere fp32 and eager, batch 32."""
        cuda = device.type == "cuda"
        return cls(
            steps=steps,
            batch_size=512 if cuda else 32,
            autocast_dtype=torch.bfloat16 if cuda else None,
            channels_last=cuda,
            compile=cuda,
            triton_step=cuda,
            gradient_dtype=torch.bfloat16 if cuda else None,
        )

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.projection_iterations < 1:
            raise ValueError(
                f"steps ({self.steps}) must be >= 0, batch_size ({self.batch_size}) and "
                f"projection_iterations ({self.projection_iterations}) >= 1"
            )
        if self.stem_channel_multiple < 1:
            raise ValueError(
                f"stem_channel_multiple must be >= 1, got {self.stem_channel_multiple}"
            )
        if self.matmul_1x1 not in MATMUL_1X1:
            raise ValueError(f"matmul_1x1 must be one of {MATMUL_1X1}, got {self.matmul_1x1!r}")
        if not self.step_ratio > 0:
            raise ValueError(f"step_ratio must be > 0, got {self.step_ratio}")
        if self.gradient_dtype is not None and not self.gradient_dtype.is_floating_point:
            raise ValueError(f"gradient_dtype must be a float dtype, got {self.gradient_dtype}")


MATMUL_1X1 = ("none", "dgrad", "all")
"""Values of :attr:`AttackConfig.matmul_1x1`."""

GEMM_TEMPLATE_OPTIONS: dict[str, str | bool] = {
    "max_autotune_gemm": True,
    "max_autotune_gemm_backends": "TRITON",
    "max_autotune_gemm_search_space": "DEFAULT",
    "epilogue_fusion": True,
}
"""Inductor options of :attr:`AttackConfig.gemm_templates`: Triton GEMM templates, which take
pointwise epilogues, autotuned over inductor's default configurations."""

GradFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


class GradientProbe(nn.Module):
    """The loop's model, evaluated at ``z + probe`` so that the input gradient can be taken with
    respect to ``probe``, whose dtype it then has.

    Autograd hands a tensor's gradient back in that tensor's dtype, so the gradient of the fp32
    input is fp32 however narrow the backward was. ``probe`` is a zero of another dtype, broadcast
    to the input's shape (:meth:`probe`): adding it changes no value (fp32 + 0), a compiled forward
    reads one scalar for it, and a compiled backward writes the gradient in the probe's dtype in
    the kernel that produces it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: Tensor, probe: Tensor | None = None) -> Tensor:
        """(B, C, H, W) input (and a probe of its shape) -> the model's output at z + probe."""
        return self.model(z if probe is None else z + probe)  # type: ignore[no-any-return]

    @staticmethod
    def probe(z: Tensor, dtype: torch.dtype) -> Tensor:
        """A zero of ``dtype`` on z's device, broadcast to z's shape, whose gradient is taken."""
        return torch.zeros((), dtype=dtype, device=z.device).expand(z.shape).requires_grad_(True)


@dataclass
class AttackEngine:
    """Runs :class:`AttackConfig` attacks of one model; builds its fast copy once and reuses it.

    model: an nn.Module mapping (B, C, H, W) images in [0, 1] to (B, N) site responses. It is the
    generating model: its exact-fp32 predictions are recorded. The loop runs on a copy (BatchNorm
    folded, first conv fp32, channels_last, compiled, per the config) that has no parameter
    gradients. The engine puts ``model`` in eval mode and turns its parameter gradients off.
    """

    model: nn.Module
    config: AttackConfig = field(default_factory=AttackConfig)
    _fast: nn.Module | None = field(default=None, init=False, repr=False)
    _step: Callable[..., tuple[Tensor, ...]] | None = field(default=None, init=False, repr=False)
    _eager: nn.Module | None = field(default=None, init=False, repr=False)
    _draw: Draw = field(default_factory=lambda: normal_and_uniform, init=False, repr=False)
    _triton_step: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def prepare(self, example: Tensor) -> nn.Module:
        """The loop's copy of the model, built on first use from a (B, C, H, W) example batch."""
        if self._fast is not None:
            return self._fast
        cfg = self.config
        if cfg.gemm_templates and example.device.type != "cuda":
            raise ValueError(
                f"gemm_templates compiles Triton GEMMs for CUDA; the batch is on {example.device}"
            )
        probe = example[:8]  # a few rows show whether a rewrite keeps the function
        fast = (
            fold_batchnorm(self.model, probe) if cfg.fold_batchnorm else copy.deepcopy(self.model)
        )
        fast = fast.eval()
        if cfg.autocast_dtype is not None and cfg.split_first_conv:
            fast = split_first_conv(
                fast,
                pad_channels_to=cfg.stem_channel_multiple,
                space_to_depth=cfg.stem_space_to_depth,
                output_block=cfg.stem_output_block,
            )
        else:
            fast = keep_first_conv_fp32(fast)
        if cfg.fuse_conv_relu:
            fast = fuse_conv_relu(
                fast,
                probe,
                matmul_1x1=cfg.matmul_1x1 == "all",
                mm_dgrad=cfg.matmul_1x1 == "dgrad",
                blocks=cfg.fuse_blocks and cfg.matmul_1x1 == "none",
            )
        for p in fast.parameters():
            p.requires_grad_(False)
        if cfg.channels_last:
            fast = fast.to(memory_format=torch.channels_last)
        eager = fast
        if cfg.gradient_dtype is not None:
            fast = GradientProbe(fast)
        step: Callable[..., tuple[Tensor, ...]] = _pgd_step
        if cfg.compile:
            if cfg.gemm_templates:
                fast = torch.compile(fast, options=dict(GEMM_TEMPLATE_OPTIONS), dynamic=False)  # type: ignore[assignment]
            else:
                fast = torch.compile(fast, mode=cfg.compile_mode, dynamic=False)  # type: ignore[assignment]
            step = torch.compile(_pgd_step, dynamic=False)
            if cfg.triton_step and fused_step.available(example):
                step, self._triton_step = fused_step.pgd_step, True
            self._draw = torch.compile(normal_and_uniform, dynamic=False)
        self._fast, self._eager, self._step = fast, eager, step
        return fast

    @property
    def uses_triton_step(self) -> bool:
        """Whether the prepared loop takes its steps with :func:`fused_step.pgd_step`."""
        return self._triton_step

    def _set_reference(self, images: Tensor, index: Tensor | None = None) -> None:
        """Make the clean images (their input to the split first convolution) the reference:
        (U, C, H, W) ``images``, (B,) int64 ``index`` each row's image (None: row i is image i)."""
        if self._eager is not None:
            set_stem_references(self._eager, images, index)

    def _site_outputs(self, z: Tensor, site: Tensor, probe: Tensor | None = None) -> Tensor:
        """(B, C, H, W) fp32 inputs -> (B,) f_site from the fast model under the loop's autocast
        (``probe``: the :class:`GradientProbe` to differentiate by)."""
        if self._fast is None:
            raise RuntimeError("prepare() first")
        dtype = self.config.autocast_dtype
        ctx = (
            torch.autocast(z.device.type, dtype=dtype)
            if dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            out: Tensor = self._fast(z) if probe is None else self._fast(z, probe)
        return out.float().gather(1, site.unsqueeze(1)).squeeze(1)

    def _grad(self, z: Tensor, site: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) fp32 inputs -> (d/dz of Σ sign·f_site, (B,) f_site) from the fast model;
        the gradient in the config's gradient_dtype (see :class:`GradientProbe`)."""
        dtype = self.config.gradient_dtype
        if dtype is None or dtype == z.dtype:
            z = z.detach().requires_grad_(True)
            wrt, sel = z, self._site_outputs(z, site)
        else:
            wrt = GradientProbe.probe(z, dtype)
            sel = self._site_outputs(z.detach(), site, probe=wrt)
        (grad,) = torch.autograd.grad((sign * sel).sum(), wrt)
        return grad, sel.detach()

    def _score(self, z: Tensor, site: Tensor) -> Tensor:
        """(B, C, H, W) fp32 inputs -> (B,) f_site from the fast model, forward only."""
        with torch.no_grad():
            return self._site_outputs(z, site)

    def predict(self, images: Tensor, site_index: Tensor | None = None) -> Tensor:
        """Exact-fp32 predictions of the generating model, in batches.

        images: (B, C, H, W) in [0, 1]; site_index: (B,) -> (B,) responses of each row's site, or
        None -> (B, N) all sites.
        """
        if images.shape[0] == 0:
            raise ValueError("predict() needs at least one image")
        outs = []
        bs = self.config.batch_size
        with torch.no_grad(), exact_fp32():
            for start in range(0, images.shape[0], bs):
                chunk = images[start : start + bs].float()
                n = chunk.shape[0]
                if n < bs and chunk.is_cuda:
                    # One input shape for every call: cuDNN autotunes each new shape (seconds).
                    chunk = torch.cat([chunk, chunk[-1:].expand(bs - n, *chunk.shape[1:])])
                out = self.model(chunk.contiguous()).float()[:n]
                if site_index is not None:
                    idx = site_index[start : start + bs].to(out.device)
                    out = out.gather(1, idx.unsqueeze(1)).squeeze(1)
                outs.append(out)
        return torch.cat(outs)

    def run(
        self,
        images: Tensor,
        rows: AttackRows,
        *,
        generator: torch.Generator,
        group: Group = None,
    ) -> AttackResult:
        """Attack every row; under torch.distributed each rank of ``group`` (None: the default
        group) takes a contiguous shard.

        images: (M, C, H, W) float clean images in [0, 1] (quantised to 8 bits first: the clean
        stimulus is the 8-bit image); rows index into them. generator: seeds the job (one draw), so
        a run is reproducible and independent of batching and sharding. Returns all rows (the
        group's first rank) or this rank's shard (other ranks), each row with its ``row_index``.
        The shards reach the first rank as packed bytes (:func:`gather_rows_to_first`), not pickled.
        """
        mine = AttackResult.concat(
            list(self.run_batches(images, rows, generator=generator, group=group))
            or [AttackResult.empty(images.shape[1:])]
        )
        gathered = gather_rows_to_first(mine.tensors(), group)
        return mine if gathered is None else AttackResult(**gathered)

    def run_batches(
        self,
        images: Tensor,
        rows: AttackRows,
        *,
        generator: torch.Generator,
        group: Group = None,
        cuts: Sequence[int] | None = None,
    ) -> Iterator[AttackResult]:
        """:meth:`run` one batch at a time, on this rank's shard only (nothing gathered).

        Each batch is yielded as soon as it is done, so a caller can store batch k's stimuli while
        the device works on batch k + 1; the rows, seeds and results are those of :meth:`run`. The
        arguments are checked (and the seed drawn) at the call, before any batch runs. ``cuts``:
        row positions where a shard may begin (:func:`shard_bounds`), so that rows that belong
        together stay on one rank.
        """
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"images must be float (M, C, H, W), got {tuple(images.shape)}")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"images must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
        if len(rows) and int(rows.image_index.max()) >= images.shape[0]:
            raise ValueError(
                f"image_index {int(rows.image_index.max())} is out of range for "
                f"{images.shape[0]} images"
            )
        base_seed = int(
            torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item()
        )
        rank, size = world(group)
        start, stop = shard_bounds(len(rows), rank, size, cuts)
        local = torch.arange(start, stop, dtype=torch.int64)
        clean_levels = to_levels(images)
        bs = self.config.batch_size
        if not local.numel():
            return iter(())
        # f(x) of every clean image once (exact fp32), rather than once per batch
        used = torch.unique(rows.image_index[local])
        slot = torch.full((images.shape[0],), -1, dtype=torch.int64)
        slot[used] = torch.arange(used.numel())
        with record_function("itloop.run.predict_clean"):
            f_used = self.predict(from_levels(clean_levels[used.to(images.device)])).float()
        clean_f = (f_used, slot.to(images.device))
        return (
            self._run_batch(clean_levels, clean_f, rows, local[b : b + bs], base_seed)
            for b in range(0, local.numel(), bs)
        )

    def _run_batch(
        self,
        clean_levels: Tensor,
        clean_f: tuple[Tensor, Tensor],
        rows: AttackRows,
        index: Tensor,
        base_seed: int,
    ) -> AttackResult:
        cfg = self.config
        device = clean_levels.device
        n = index.numel()
        with record_function("itloop.run.setup"):
            pad = (
                torch.cat([index, index[-1:].expand(cfg.batch_size - n)]) if cfg.compile else index
            )
            r = rows.take(pad)
            img = r.image_index.to(device)
            site = r.site_index.to(device)
            sign = r.sign.to(device=device, dtype=torch.float32)
            eps = r.eps_l2.to(device=device, dtype=torch.float32)
            lv = clean_levels[img]
            x = from_levels(lv)
            # the batch's distinct images: rows of one image (its ε × signs) share its reference
            distinct, inverse = torch.unique(r.image_index, return_inverse=True)
            images = from_levels(clean_levels[distinct.to(device)])
            self.prepare(x)
        with record_function("itloop.run.pgd"):
            delta, pred = self.pgd(
                x, site, sign, eps, pad.tolist(), base_seed, clean=(images, inverse)
            )
        delta, pred = delta[:n], pred[:n]
        x, lv, site, sign, eps = x[:n], lv[:n], site[:n], sign[:n], eps[:n]
        with record_function("itloop.run.budget_check"):
            self._check_budget(x, delta, r.eps_l2[:n])
        grad = None
        if cfg.quantisation_aware:
            with record_function("itloop.run.rounded_gradient"):
                k0 = torch.round(delta * LEVELS)
                z0 = (x + k0 / LEVELS).clamp(0.0, 1.0)
                grad = self._grad_padded(z0, site, sign).float()
        with record_function("itloop.run.quantise"):
            k = quantise_perturbation(lv, delta, grad, r.eps_l2[:n].to(device))
        x_adv = from_levels((lv.to(torch.int16) + k).to(torch.uint8))
        f_used, slot = clean_f  # f(x) of the job's images (U, N), and each image's row in it
        f_clean = f_used[slot[img[:n]], site]
        with record_function("itloop.run.predict_adv"):
            f_adv = self.predict(x_adv, site)
        with record_function("itloop.run.to_host"):
            realised, k, f_clean, f_adv, pred = _to_host(
                realised_eps_l2(k), k, f_clean.float(), f_adv.float(), pred.float()
            )
            return AttackResult(
                row_index=index.clone(),
                image_index=r.image_index[:n].clone(),
                site_index=r.site_index[:n].clone(),
                sign=r.sign[:n].clone(),
                eps_l2=r.eps_l2[:n].double().clone(),
                realised_eps_l2=realised,
                delta_levels=k,
                f_clean=f_clean,
                f_adv=f_adv,
                f_adv_unquantised=pred,
            )

    def _grad_padded(self, z: Tensor, site: Tensor, sign: Tensor) -> Tensor:
        """Gradient at (n, C, H, W) points, padded to the compiled batch size if needed."""
        n = z.shape[0]
        if not self.config.compile or n == self.config.batch_size:
            return self._grad(z, site, sign)[0]
        extra = self.config.batch_size - n
        zp = torch.cat([z, z[-1:].expand(extra, *z.shape[1:])])
        sp = torch.cat([site, site[-1:].expand(extra)])
        gp = torch.cat([sign, sign[-1:].expand(extra)])
        return self._grad(zp.contiguous(), sp, gp)[0][:n]

    def pgd(
        self,
        x: Tensor,
        site: Tensor,
        sign: Tensor,
        eps: Tensor,
        row_ids: Sequence[int],
        base_seed: int,
        *,
        steps: int | None = None,
        clean: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """PGD for one batch of rows, after :meth:`prepare`.

        x: (B, C, H, W) fp32 images on the 8-bit grid; site: (B,) int64; sign: (B,) ±1.0; eps: (B,)
        fp32; row_ids: the rows' ids, which seed their random starts; steps: None = the config's;
        clean: ((U, C, H, W) images, (B,) int64 index) with ``x = images[index]``, the batch's
        distinct clean images (None: each row its own), which the split first convolution keeps
        once each. Returns ((B, C, H, W) best δ, (B,) its predicted f). δ stays inside ball ∩ box
        after every step; the best iterate is chosen by ``sign · f``.
        """
        if self._step is None:
            raise RuntimeError("prepare() first")
        cfg = self.config
        n_steps = cfg.steps if steps is None else steps
        iters = cfg.projection_iterations
        # One layout (NCHW) for the images, δ, the gradient and x + δ: every pass of the compiled
        # step then reads and writes them in the same order (the network's activations are
        # channels_last from its first convolution on). A channels_last x mixed with the NCHW
        # gradient made the step read x across its channels and write x + δ in a pass of its own.
        x = x.contiguous()
        if clean is not None:
            if tuple(clean[1].shape) != (x.shape[0],):
                raise ValueError(
                    f"clean's index must be ({x.shape[0]},), got {tuple(clean[1].shape)}"
                )
            clean = (clean[0].contiguous(), clean[1])
        with record_function("itloop.run.random_start"):
            images, index = clean if clean is not None else (x, None)
            self._set_reference(images, index)
            noise, u = row_noise(base_seed, row_ids, tuple(x.shape[1:]), x.device, draw=self._draw)
            delta = random_start_l2_box(x, eps, noise, u, iterations=iters)
        alpha = eps * cfg.step_ratio
        best_obj = torch.full_like(eps, -torch.inf)
        best_delta = delta.clone() if self.uses_triton_step else delta  # updated in place
        best_val = torch.zeros_like(eps)
        z = x + delta
        for _ in range(n_steps):
            grad, val = self._grad(z, site, sign)
            delta, z, best_obj, best_val, best_delta = self._step(
                x,
                delta,
                grad,
                val,
                sign,
                eps,
                alpha,
                best_obj,
                best_val,
                best_delta,
                iters,
                cfg.keep_best,
            )
        val = self._score(z, site)  # the last iterate is scored too
        _, best_val, best_delta = _keep_better(delta, val, sign, best_obj, best_val, best_delta)
        return best_delta, best_val

    @staticmethod
    def _check_budget(x: Tensor, delta: Tensor, eps64: Tensor) -> None:
        """Raise AttackError naming the worst row when δ leaves its ball or x + δ leaves [0, 1]."""
        norms = delta.double().square().sum(_DIMS).sqrt().cpu()
        ratio = norms / eps64.double().clamp_min(1e-30)
        ratio = torch.where(eps64 > 0, ratio, norms * torch.inf)
        worst = int(torch.argmax(torch.nan_to_num(ratio, nan=0.0)))
        if bool((norms > eps64 * (1 + _NORM_RTOL) + 1e-12).any()):
            raise AttackError(
                f"perturbation L2 {float(norms[worst]):.6g} exceeds budget "
                f"{float(eps64[worst]):.6g} (row {worst} of the batch)"
            )
        z = x + delta
        lo, hi = float(z.min()), float(z.max())
        if lo < -_BOX_TOL or hi > 1 + _BOX_TOL:
            raise AttackError(f"perturbed image leaves [0, 1]: range [{lo:.6g}, {hi:.6g}]")


def _to_host(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Copies of ``tensors`` in host memory; from CUDA through page-locked buffers, all copies
    queued before one wait (a pageable copy of a batch's 8-bit perturbations, 154 MB at batch 512,
    is several times slower)."""
    out = []
    devices = set()
    for t in tensors:
        if t.is_cuda:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            out.append(host)
            devices.add(t.device)
        else:
            out.append(t.cpu())
    for device in devices:
        torch.cuda.current_stream(device).synchronize()
    return tuple(out)


def _pgd_step(
    x: Tensor,
    delta: Tensor,
    grad: Tensor,
    val: Tensor,
    sign: Tensor,
    eps: Tensor,
    alpha: Tensor,
    best_obj: Tensor,
    best_val: Tensor,
    best_delta: Tensor,
    iterations: int,
    keep_best: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Record the iterate δ (scored ``val`` with gradient ``grad``) if it is the best so far, then
    take one projected step; one fused pass when compiled.

    Returns (new δ, x + new δ, best objective, best f, best δ). Without keep_best nothing is
    recorded here (only the last iterate is kept, by the caller).
    """
    if keep_best:
        best_obj, best_val, best_delta = _keep_better(
            delta, val, sign, best_obj, best_val, best_delta
        )
    grad = grad.float()  # a bf16 gradient (AttackConfig.gradient_dtype): fp32 sums and step
    new = project_l2_box_step(x, delta, grad, alpha, eps, iterations=iterations)
    return new, x + new, best_obj, best_val, best_delta


def _keep_better(
    delta: Tensor, val: Tensor, sign: Tensor, best_obj: Tensor, best_val: Tensor, best_delta: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(best objective, best f, best δ) after scoring iterate δ with f = ``val``: rows whose
    ``sign · f`` beats their best so far take δ."""
    obj = sign * val
    better = obj > best_obj
    return (
        torch.where(better, obj, best_obj),
        torch.where(better, val, best_val),
        torch.where(better.view(-1, 1, 1, 1), delta, best_delta),
    )
