"""VEM (Kang et al., "Information-Theoretic GAN Compression with Variational Energy-based Model", NeurIPS 2022)
and the generator-distillation terms it is added to: pure functions, tensors (and frozen callables) in.

Sign convention, the paper's (Eq. 4): q_theta(t | s) = exp(-E_theta(t, s)) / Z_theta(s), so LOW energy = LIKELY.
Langevin sampling descends the energy; the energy model is trained to give real pairs (t, s) lower energy than
its own samples (t~, s); the student is trained to lower the energy of its real pairs relative to the samples.
Both minimise the same estimate of E[-log q(t | s)] (Eq. 5 for theta, Eq. 8 for the student), whose gradients
are Eq. 6 and Eq. 9:

    grad E[-log q] = E_{t,s}[grad E(t, s)] - E_s E_{t~ ~ q(.|s)}[grad E(t~, s)],

so `energy_model_loss` and `vem_student_loss` compute mean E(t, s) - mean E(t~, s) and differ only in what
the gradient reaches (theta, or the student's output s). The student's full objective (Eq. 10) is
L_algo - lambda_MI * I~(T; S) = L_algo + lambda_MI * `vem_student_loss`, up to terms constant in the student.

Generator-KD terms ("algorithm-specific loss" of Eq. 10, OMGD-style, Ren et al. 2021): `output_mimic_loss`
(L1 + 1 - SSIM), `total_variation`, `feature_mimic_loss` (adapter-mapped features), `style_loss` (Gram
matrices); and the mutual-information add-ons of the paper's Table 4 ablation: `vid_pixel_nll` (VID with a
learned per-pixel variance) and `patch_nce` (a CRD-style InfoNCE over patch embeddings).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.engine import distributed
from kdforge.models.state import no_weight_grads
from kdforge.registry import LOSSES

EnergyFn = Callable[[Tensor, Tensor], Tensor]


def _modules(fn: object) -> tuple[nn.Module, ...]:
    return (fn,) if isinstance(fn, nn.Module) else ()


def _per_sample(energy: Tensor, batch: int, what: str) -> Tensor:
    if energy.shape not in ((batch,), (batch, 1)):
        raise ValueError(f"{what}: the energy must give one value per sample, (B,) = ({batch},), got "
                         f"{tuple(energy.shape)}")
    return energy.reshape(batch)


# ---------------------------------------------------------------- VEM


def langevin_sample(energy_fn: Callable[[Tensor], Tensor], init: Tensor, steps: int, step_size: float,
                    noise_std: float | None, clamp: tuple[float, float] | None = None, *,
                    generator: torch.Generator | None = None) -> Tensor:
    """K-step short-run Langevin dynamics on an energy (VEM Eq. 7, started from `init`, Sec. 4.1.3):

        x_k = x_{k-1} - step_size * grad_x E(x_{k-1}) + noise_std * eps_k,     eps_k ~ N(0, I)

    Low energy is likely (q proportional to exp(-E)), so the chain descends E. Eq. 7 writes the coupled form
    x_k = x_{k-1} - (lambda / 2) grad E + N(0, lambda I), i.e. step_size = lambda / 2 and noise_std =
    sqrt(2 step_size) (pass `noise_std=None` for that), whose stationary law as step_size -> 0 is exp(-E);
    the paper's experiments (Sec. 5.3) decouple them: K = 10 steps, step size 100 (50 on Cityscapes and FFHQ),
    noise std 0.005, as does the re-implementation (step 50, std 0.005).

    Runs in float32 with autocast off whatever the input dtype or the caller's precision, and with grad enabled
    even inside `torch.no_grad()`. Gradients are taken with `torch.autograd.grad` with respect to the sample only,
    so nothing accumulates in the energy model's `.grad` (nor in anything `energy_fn` closes over: pass the
    condition s detached to save the work). `energy_fn(x)` must return one energy per sample, (B,), each
    depending on its own sample only (no BatchNorm across the batch), so grad of the sum is per-sample.

    Args:
        energy_fn: x (B, ...) float32 -> (B,) energies, e.g. `lambda x: E(x, s.detach())`.
        init: (B, ...) the chain's start (the student output in VEM; noise or the teacher output in Sec. 4.1.3's
            alternatives); not modified.
        steps: K >= 0 (0 returns a float32 copy of `init`).
        step_size: the gradient's coefficient (> 0).
        noise_std: the noise's standard deviation (>= 0), or None for sqrt(2 * step_size) (Eq. 7).
        clamp: optional (low, high) applied after every step (e.g. (-1, 1) for tanh images).
        generator: the noise's torch.Generator (on init's device), so a resumed run redraws the same chain;
            the global RNG when None (under data parallel, this rank's block of the global batch's noise).
    Returns:
        (B, ...) float32 samples, detached.
    """
    if steps < 0 or not step_size > 0:
        raise ValueError(f"langevin_sample: steps must be >= 0 and step_size > 0, got {steps} and {step_size}")
    if noise_std is None:
        noise_std = (2.0 * step_size) ** 0.5
    if noise_std < 0:
        raise ValueError(f"langevin_sample: noise_std must be >= 0, got {noise_std}")
    x = init.detach().to(torch.float32).clone()
    with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        for _ in range(steps):
            x.requires_grad_(True)
            energy = _per_sample(energy_fn(x), x.shape[0], "langevin_sample")
            (grad,) = torch.autograd.grad(energy.sum(), x)
            x = x.detach() - step_size * grad.to(torch.float32)
            if noise_std > 0:
                x = x + noise_std * (torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                                     if generator is not None else
                                     distributed.randn(*x.shape, device=x.device, dtype=x.dtype))
            if clamp is not None:
                x = x.clamp(*clamp)
    return x.detach()


@LOSSES.register("energy_model_loss")
def energy_model_loss(energy: EnergyFn, t: Tensor, s: Tensor, t_tilde: Tensor, reg_weight: float = 0.0) -> Tensor:
    """The energy model's objective (VEM Sec. 4.1.1, Eq. 5), whose gradient in theta is Eq. 6:

        L(theta) = mean_b E(t_b, s_b) - mean_b E(t~_b, s_b) [+ reg_weight * mean_b (E(t_b, s_b)^2 + E(t~_b, s_b)^2)]

    t: teacher outputs (or real targets on paired data, Sec. 5.3), s: student outputs, t~: Langevin samples from
    q_theta(. | s). Minimising it lowers the energy of real pairs and raises that of the model's own samples.
    All three inputs are detached here, so the gradient reaches only the energy model's parameters (step 1 of
    Sec. 3: the student and teacher are fixed). The squared-energy regulariser (off by default, as in the paper)
    is the re-implementation's (weight 0.05), which keeps the energies from drifting in magnitude.
    """
    b = t.shape[0]
    t, s, t_tilde = t.detach(), s.detach(), t_tilde.detach()
    pos = _per_sample(energy(t, s), b, "energy_model_loss")
    neg = _per_sample(energy(t_tilde, s), b, "energy_model_loss")
    loss = pos.mean() - neg.mean()
    if reg_weight:
        loss = loss + reg_weight * (pos.pow(2) + neg.pow(2)).mean()
    return loss


@LOSSES.register("vem_student_loss")
def vem_student_loss(energy: EnergyFn, t: Tensor, s: Tensor, t_tilde: Tensor) -> Tensor:
    """The student's mutual-information term (VEM Eq. 8-10): -I~(T; S) up to student-independent terms,

        L_MI(phi_s) = mean_b E(t_b, s_b) - mean_b E(t~_b, s_b),       s = G_s(x; phi_s) (reparameterised)

    whose gradient in phi_s is Eq. 9, with t~ the Langevin samples from q_theta(. | s) held fixed (the paper
    reuses the energy step's samples; the re-implementation draws a fresh chain: the caller chooses).
    The caller weights it by lambda_MI (Eq. 10: L_s = L_algo + lambda_MI * L_MI; paper Table 5: 0.05-0.2).
    Gradients reach only s: t and t~ are detached and, when `energy` is an nn.Module, its parameters are kept
    out of the graph (`no_weight_grads`), so a later backward leaves their `.grad` as it was (None after zero_grad
    with set_to_none). A plain callable over a module must be wrapped by the caller in `no_weight_grads(module)`.
    """
    b = t.shape[0]
    with no_weight_grads(*_modules(energy)):
        pos = _per_sample(energy(t.detach(), s), b, "vem_student_loss")
        neg = _per_sample(energy(t_tilde.detach(), s), b, "vem_student_loss")
    return pos.mean() - neg.mean()


# ---------------------------------------------------------------- generator KD (the baseline)


def _check_layers(s: Sequence[Tensor], t: Sequence[Tensor], distance: str, what: str) -> None:
    """Per-layer losses: as many student as teacher features, at least one, and a known distance."""
    if len(s) != len(t) or not len(t):
        raise ValueError(f"{what}: {len(s)} student and {len(t)} teacher features; need the same number, at least one")
    if distance not in ("mse", "l1"):
        raise ValueError(f"{what}: distance must be 'mse' or 'l1', got {distance!r}")


def _same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: student {tuple(a.shape)} and teacher {tuple(b.shape)} must have the same shape")


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0, kernel_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Mean structural similarity (Wang et al. 2004) over every Gaussian window that fits inside the images:

        SSIM = (2 mu_x mu_y + C1)(2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2)),
        C1 = (k1 L)^2, C2 = (k2 L)^2, L = data_range,

    with Gaussian-weighted local means, variances and covariance (window 11, sigma 1.5), averaged over windows,
    channels and images. Only whole windows count (no padding), as Wang et al.'s code and torchmetrics before
    its reflect-padded full map: written here so the loss does not change with the installed torchmetrics.
    """
    _same_shape(x, y, "ssim")
    if x.dim() != 4 or min(x.shape[-2:]) < kernel_size:
        raise ValueError(f"ssim: need (B, C, H, W) images of at least {kernel_size} px, got {tuple(x.shape)}")
    c = x.shape[1]
    g = torch.arange(kernel_size, dtype=x.dtype, device=x.device) - (kernel_size - 1) / 2
    g = torch.exp(-g.pow(2) / (2 * sigma ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(c, 1, kernel_size, kernel_size)
    stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), window, groups=c).chunk(5)
    mu_x, mu_y = stats[0], stats[1]
    var_x, var_y = stats[2] - mu_x.pow(2), stats[3] - mu_y.pow(2)
    cov = stats[4] - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return ssim_map.mean()


@LOSSES.register("output_mimic_loss")
def output_mimic_loss(s: Tensor, t: Tensor, l1_weight: float = 1.0, ssim_weight: float = 1.0,
                      data_range: float = 2.0) -> Tensor:
    """The student mimics the teacher's image: l1_weight * mean |s - t| + ssim_weight * (1 - SSIM(s, t)).

    SSIM is `ssim` (Gaussian window 11, sigma 1.5, whole windows only) with `data_range` 2 for [-1, 1] images
    (1 for [0, 1]); images need >= 11 px. OMGD (VEM's baseline) uses 10 * (1 - SSIM) and no pixel L1
    (l1_weight 0, ssim_weight 10).
    """
    _same_shape(s, t, "output_mimic_loss")
    loss = s.new_zeros(())
    if l1_weight:
        loss = loss + l1_weight * (s - t).abs().mean()
    if ssim_weight:
        loss = loss + ssim_weight * (1.0 - ssim(s, t, data_range=data_range))
    return loss


@LOSSES.register("total_variation")
def total_variation(x: Tensor, reduction: str = "sum") -> Tensor:
    """Anisotropic total variation, sum |x[..., i+1, j] - x[..., i, j]| + |x[..., i, j+1] - x[..., i, j]| over
    channels and pixels of each image (Rudin et al. 1992), summed over the batch (`reduction="sum"`, OMGD's,
    weight 1e-5) or averaged over it ("mean")."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"total_variation: reduction must be 'sum' or 'mean', got {reduction!r}")
    tv = (x[..., 1:, :] - x[..., :-1, :]).abs().sum() + (x[..., :, 1:] - x[..., :, :-1]).abs().sum()
    return tv if reduction == "sum" else tv / x.shape[0]


@LOSSES.register("feature_mimic_loss")
def feature_mimic_loss(mapped_s: Sequence[Tensor], t: Sequence[Tensor], pool: bool = False,
                       distance: str = "mse") -> Tensor:
    """Intermediate-feature distillation, summed over layers: sum_l D(A_l(s_l), t_l), the student's features
    already mapped to the teacher's widths by the caller's adapters A_l (1x1 convs, as OMGD / GAN-Compression).

    D is the mean squared error ("mse", FitNets) or mean absolute error ("l1"); `pool=True` compares channel
    means after global average pooling, OMGD's "channel distillation" (CD) loss. Teacher features are detached.
    """
    _check_layers(mapped_s, t, distance, "feature_mimic_loss")
    total = mapped_s[0].new_zeros(())
    for a, b in zip(mapped_s, t):
        _same_shape(a, b, "feature_mimic_loss")
        b = b.detach()
        if pool:
            a, b = a.mean(dim=(2, 3)), b.mean(dim=(2, 3))
        total = total + (F.mse_loss(a, b) if distance == "mse" else F.l1_loss(a, b))
    return total


def gram_matrix(f: Tensor) -> Tensor:
    """Gram matrix of a feature map (Gatys et al. 2016), normalised as OMGD: G = F F^T / (C H W), (B, C, C)."""
    b, c = f.shape[:2]
    flat = f.reshape(b, c, -1)
    return flat @ flat.transpose(1, 2) / flat[0].numel()


@LOSSES.register("style_loss")
def style_loss(s_feats: Sequence[Tensor], t_feats: Sequence[Tensor], distance: str = "l1") -> Tensor:
    """Style (texture) distillation: sum over layers of mean |G(s_l) - G(t_l)| ("l1", OMGD's, weight 1e4 over VGG16
    relu1_2/2_2/3_3/4_3) or the mean squared difference ("mse", Gatys), G the `gram_matrix`, on the features of a
    named feature network run on the student and teacher images. Teacher features are detached."""
    _check_layers(s_feats, t_feats, distance, "style_loss")
    total = s_feats[0].new_zeros(())
    for a, b in zip(s_feats, t_feats):
        _same_shape(a, b, "style_loss")
        ga, gb = gram_matrix(a), gram_matrix(b.detach())
        total = total + (F.l1_loss(ga, gb) if distance == "l1" else F.mse_loss(ga, gb))
    return total


# ---------------------------------------------------------------- mutual-information add-ons: VID and CRD


@LOSSES.register("vid_pixel_nll")
def vid_pixel_nll(pred_mean: Tensor, target: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    """VID for generator outputs (Ahn et al. 2019, Eq. 2-4; the VEM paper's Table 4 add-on): the teacher image t
    (or a real target) modelled as a fully factorised Gaussian N(mu(s), sigma^2) with a learned variance per
    pixel (per channel and position),

        sigma^2 = softplus(alpha) + eps
        L = mean_{b,c,h,w} 0.5 * ( (t - mu)^2 / sigma^2 + log sigma^2 )

    i.e. -log q(t | s) per element up to 0.5 log(2 pi). mu(s) = `pred_mean` comes from the caller's network
    on the student output. `log_scale` (alpha) is (C, H, W), or anything broadcasting to one sample's shape
    ((C, 1, 1): per channel).
    """
    _same_shape(pred_mean, target, "vid_pixel_nll")
    if log_scale.dim() > target.dim() - 1 or torch.broadcast_shapes(log_scale.shape, target.shape[1:]) \
            != target.shape[1:]:
        raise ValueError(f"vid_pixel_nll: log_scale {tuple(log_scale.shape)} must broadcast to one sample's shape "
                         f"{tuple(target.shape[1:])}")
    var = F.softplus(log_scale) + eps
    return (0.5 * ((target - pred_mean).pow(2) / var + var.log())).mean()


def image_patches(x: Tensor, patch_size: int, stride: int | None = None) -> Tensor:
    """(B, C, H, W) -> (B, P, C * patch * patch): the patches of a regular grid (`stride` = patch_size, no
    overlap, by default), in row-major order, so patch p of a teacher and a student image is the same place."""
    if x.dim() != 4 or patch_size < 1 or patch_size > min(x.shape[-2:]):
        raise ValueError(f"image_patches: need (B, C, H, W) images at least {patch_size} px, got {tuple(x.shape)}")
    return F.unfold(x, patch_size, stride=stride or patch_size).transpose(1, 2)


NEGATIVES = ("all", "image", "position")


@LOSSES.register("patch_nce")
def patch_nce(s_emb: Tensor, t_emb: Tensor, temperature: float = 0.07, negatives: str = "all") -> Tensor:
    """InfoNCE over patch embeddings (CRD, Tian et al. 2020, adapted to images as in the VEM paper's Table 4;
    the patchwise form of CUT, Park et al. 2020): the student's embedding of patch p in image b should pick the
    teacher's embedding of the same patch among the candidates,

        L = mean_{b,p} -log( exp(z_bp . w_bp / tau) / sum_{(b',p') in N(b,p)} exp(z_bp . w_b'p' / tau) )

    z = normalize(s_emb), w = normalize(t_emb) (cosine similarity), tau = `temperature`; the candidates N(b,p)
    always include the positive (b,p) and, as negatives: every other patch of the batch ("all"), the other
    patches of the same image ("image", CUT's), or the same patch of the other images ("position", CRD's
    instance contrast). Teacher embeddings are detached.

    Args:
        s_emb, t_emb: (B, P, D) embeddings of corresponding patches (e.g. a small head on `image_patches`).
    """
    _same_shape(s_emb, t_emb, "patch_nce")
    if s_emb.dim() != 3:
        raise ValueError(f"patch_nce: embeddings must be (B, P, D), got {tuple(s_emb.shape)}")
    if negatives not in NEGATIVES:
        raise ValueError(f"patch_nce: negatives must be one of {', '.join(map(repr, NEGATIVES))}, got {negatives!r}")
    if not temperature > 0:
        raise ValueError(f"patch_nce: temperature must be > 0, got {temperature}")
    b, p, _ = s_emb.shape
    z = F.normalize(s_emb, dim=-1).reshape(b * p, -1)
    w = F.normalize(t_emb.detach(), dim=-1).reshape(b * p, -1)
    logits = z @ w.t() / temperature  # (BP, BP): row (b, p), column (b', p')
    if negatives != "all":
        idx = torch.arange(b * p, device=logits.device)
        key = idx // p if negatives == "image" else idx % p  # same image / same position
        logits = logits.masked_fill(key[:, None] != key[None, :], float("-inf"))
    return F.cross_entropy(logits, torch.arange(b * p, device=logits.device))
