"""An acausal crosscoder over paired activations of two models (base b, compressed c), and the per-feature
comparison of their decoders (Lindsey et al. 2024; the VLM compression study's variant, PAPERS.md s.1).

Shared latents z = sparsify(sum_m x_m W_enc[m] + b_enc); each model has its own decoder,
x_hat_m = z W_dec[:, m] + b_dec[m]. Sparsity: `batchtopk` (default: the batch keeps its k x batch largest
activations), `topk` (k per row) or `l1` (ReLU with lambda * sum_i z_i * sum_m ||d_i,m||). Dead latents:
an auxiliary TopK loss on the residual error from latents that have not fired for `dead_steps` steps
(Gao et al. 2024). Optional: a cross-reconstruction term (each model's encoder alone reconstructs both)
and a fraction of forced-shared latents (one decoder vector used by both models).

Per feature: rho = ||d_c|| / (||d_b|| + ||d_c||), theta = cos(d_b, d_c). Classes: rho < t1 base_only,
rho > t4 compressed_only; otherwise shared: theta < 0.5 shared_rotated, else rho < t2 shared_attenuated,
rho > t3 shared_amplified, else theta > 0.8 shared_aligned, and shared_other for the rest (0.5 <= theta
<= 0.8 in the middle band). Thresholds (t1, t2, t3, t4): the fixed 0.15 / 0.35 / 0.65 / 0.85 (default), or
from a BIC-selected 1-D Gaussian mixture on rho (`gmm_thresholds`). The mixture is fragile: on the planted
test data (with dead latents' random decoders and per-model normalisation moving the shared band to ~0.45)
it merged bands that the fixed thresholds separate, so it is an option, not the default.

Data hygiene for the analysis: `heldout_prompts` splits by prompt (no prompt on both sides) so FVE, L0 and
dead latents are measured on tokens the crosscoder never saw; `massive_tokens` finds attention-sink tokens
whose norm is orders of magnitude above the rest (massive activations, Sun et al. 2024), which would dominate
the reconstruction loss and the FVE denominator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

CLASSES = (
    "base_only",
    "compressed_only",
    "shared_aligned",
    "shared_rotated",
    "shared_attenuated",
    "shared_amplified",
    "shared_other",
)
FIXED_THRESHOLDS = (0.15, 0.35, 0.65, 0.85)


@dataclass
class CrosscoderConfig:
    d_in: int
    n_latents: int
    k: int = 32  # active latents per row (topk) or on average (batchtopk)
    sparsity: str = "batchtopk"  # batchtopk | topk | l1
    l1: float = 1e-3  # l1 sparsity's lambda
    cross_weight: float = 0.0  # weight of the cross-reconstruction term (the study: 0.4)
    forced_shared: float = 0.0  # fraction of latents with one decoder vector for both models (study: 0.06)
    aux_k: int = 64  # auxiliary TopK over dead latents
    aux_weight: float = 1 / 32
    dead_steps: int = 200  # a latent silent this many steps is dead


class Crosscoder(nn.Module):
    def __init__(self, config: CrosscoderConfig, seed: int = 0):
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        d, n = config.d_in, config.n_latents
        decoder = torch.randn(n, 2, d, generator=generator)
        decoder = decoder / decoder.norm(dim=-1, keepdim=True) * 0.1
        self.W_dec = nn.Parameter(decoder)
        self.W_enc = nn.Parameter(decoder.permute(1, 2, 0).clone())  # (2, d, n): the decoder's transpose
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(2, d))
        self.n_shared = int(round(config.forced_shared * n))
        self.register_buffer("silent_steps", torch.zeros(n, dtype=torch.long))

    def decoder(self) -> torch.Tensor:
        """(n_latents, 2, d_in), forced-shared latents using model b's vector for both."""
        if self.n_shared == 0:
            return self.W_dec
        shared = self.W_dec[: self.n_shared, :1].expand(-1, 2, -1)
        return torch.cat([shared, self.W_dec[self.n_shared :]], dim=0)

    def pre_activations(self, x: torch.Tensor, models: tuple[int, ...] = (0, 1)) -> torch.Tensor:
        """(batch, n_latents) from the encoders of `models` only (both: the crosscoder's encoding)."""
        return sum(x[:, m] @ self.W_enc[m] for m in models) + self.b_enc

    def sparsify(self, pre: torch.Tensor) -> torch.Tensor:
        acts = torch.relu(pre)
        k = self.config.k
        if self.config.sparsity == "topk":
            top = acts.topk(min(k, acts.shape[1]), dim=-1)
            return torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        if self.config.sparsity == "batchtopk":
            flat = acts.flatten()
            keep = min(k * acts.shape[0], flat.numel())
            threshold = flat.topk(keep).values[-1]
            return torch.where(acts >= threshold, acts, torch.zeros_like(acts)) * (acts > 0)
        return acts  # l1: the penalty does the sparsifying

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparsify(self.pre_activations(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bn,nmd->bmd", z, self.decoder()) + self.b_dec

    def decoder_norms(self) -> torch.Tensor:
        """(n_latents, 2): ||d_b||, ||d_c||."""
        return self.decoder().norm(dim=-1)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Self-reconstruction (+ cross, l1, auxiliary) for a (batch, 2, d_in) batch of normalised pairs."""
        pre = self.pre_activations(x)
        z = self.sparsify(pre)
        reconstruction = self.decode(z)
        error = x - reconstruction
        mse = error.pow(2).sum(-1).mean(0).sum()
        total = mse
        parts = {"mse": mse.item()}
        if self.config.cross_weight > 0:
            cross = sum(
                (x - self.decode(self.sparsify(self.pre_activations(x, (m,))))).pow(2).sum(-1).mean(0).sum()
                for m in (0, 1)
            )
            total = total + self.config.cross_weight * cross
            parts["cross"] = cross.item()
        if self.config.sparsity == "l1":
            l1 = self.config.l1 * (z * self.decoder_norms().sum(-1)).sum(-1).mean()
            total = total + l1
            parts["l1"] = l1.item()
        with torch.no_grad():
            fired = (z > 0).any(0)
            self.silent_steps = torch.where(fired, torch.zeros_like(self.silent_steps), self.silent_steps + 1)
        dead = self.silent_steps >= self.config.dead_steps
        if dead.any() and self.config.aux_weight > 0:
            dead_pre = torch.where(dead, torch.relu(pre), torch.zeros_like(pre))
            top = dead_pre.topk(min(self.config.aux_k, int(dead.sum())), dim=-1)
            z_aux = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
            aux_reconstruction = torch.einsum("bn,nmd->bmd", z_aux, self.decoder())
            aux = (error.detach() - aux_reconstruction).pow(2).sum(-1).mean(0).sum()
            total = total + self.config.aux_weight * aux
            parts["aux"] = aux.item()
        parts["l0"] = (z > 0).float().sum(-1).mean().item()
        return total, parts


def normalisers(pairs: torch.Tensor) -> torch.Tensor:
    """(2,) scales that give each model's activations unit mean norm."""
    return 1.0 / pairs.norm(dim=-1).mean(0).clamp_min(1e-12)


def train_crosscoder(
    pairs: torch.Tensor,
    config: CrosscoderConfig,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 3e-4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, "Crosscoder"], None] | None = None,
) -> tuple[Crosscoder, dict]:
    """Train on (n, 2, d_in) paired activations (normalised to unit mean norm per model inside). Returns the
    crosscoder (scales in `history["scales"]`) and the loss history. `on_step(step, model)` runs after each
    optimiser step (benchmarks time training and evaluate checkpoints there)."""
    scales = normalisers(pairs)
    data = (pairs * scales[None, :, None]).to(device)
    model = Crosscoder(config, seed).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
    generator = torch.Generator().manual_seed(seed)
    history: dict = {"loss": [], "l0": [], "scales": scales.tolist()}
    for _ in range(steps):
        index = torch.randint(0, data.shape[0], (batch_size,), generator=generator).to(device)
        loss, parts = model.loss(data[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        history["loss"].append(loss.item())
        history["l0"].append(parts["l0"])
        if on_step is not None:
            on_step(len(history["loss"]), model)
    return model.eval(), history


@torch.no_grad()
def fraction_of_variance_explained(
    model: Crosscoder, pairs: torch.Tensor, scales: torch.Tensor
) -> list[float]:
    """Per model: 1 - sum ||x - x_hat||^2 / sum ||x - mean||^2 on normalised pairs."""
    device = next(model.parameters()).device
    x = (pairs * scales[None, :, None]).to(device)
    error = (x - model.decode(model.encode(x))).pow(2).sum(-1).sum(0)
    variance = (x - x.mean(0)).pow(2).sum(-1).sum(0)
    return (1 - error / variance).tolist()


@torch.no_grad()
def mean_l0(model: Crosscoder, pairs: torch.Tensor, scales: torch.Tensor) -> float:
    """Mean active latents per token, encoding `pairs` as one batch (as `fraction_of_variance_explained`)."""
    device = next(model.parameters()).device
    x = (pairs * scales[None, :, None]).to(device)
    return (model.encode(x) > 0).float().sum(-1).mean().item()


@torch.no_grad()
def fired_latents(
    model: Crosscoder, pairs: torch.Tensor, scales: torch.Tensor, batch_size: int = 1024
) -> torch.Tensor:
    """(n_latents,) bool on the CPU: latents active on at least one token of `pairs`."""
    device = next(model.parameters()).device
    fired = torch.zeros(model.config.n_latents, dtype=torch.bool, device=device)
    for start in range(0, pairs.shape[0], batch_size):
        x = (pairs[start : start + batch_size] * scales[None, :, None]).to(device)
        fired |= (model.encode(x) > 0).any(0)
    return fired.cpu()


@torch.no_grad()
def dead_fraction(
    model: Crosscoder, pairs: torch.Tensor, scales: torch.Tensor, batch_size: int = 1024
) -> float:
    return 1.0 - fired_latents(model, pairs, scales, batch_size).float().mean().item()


def massive_tokens(pairs: torch.Tensor, factor: float) -> torch.Tensor:
    """(n,) bool: tokens whose activation norm exceeds `factor` x the median token norm of that model (the
    lower median over `pairs`) in either model of the (n, 2, d) pairs."""
    norms = pairs.norm(dim=-1)
    return (norms > factor * norms.median(dim=0).values).any(dim=1)


def heldout_prompts(n_prompts: int, holdout_fraction: float, seed: int) -> torch.Tensor:
    """(n_prompts,) bool, True for the held-out prompts: round(holdout_fraction x n_prompts) of them, at least
    one and at most all but one, drawn with `seed`. Index it with each token's prompt to split tokens."""
    if n_prompts < 2:
        raise ValueError(f"a held-out split needs at least 2 prompts, got {n_prompts}")
    n_heldout = min(n_prompts - 1, max(1, round(holdout_fraction * n_prompts)))
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed))
    heldout = torch.zeros(n_prompts, dtype=torch.bool)
    heldout[order[:n_heldout]] = True
    return heldout


def rho_theta(decoder: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per latent of a (n, 2, d) decoder: rho = ||d_c|| / (||d_b|| + ||d_c||), theta = cos(d_b, d_c)."""
    norms = decoder.norm(dim=-1)
    rho = norms[:, 1] / norms.sum(-1).clamp_min(1e-12)
    theta = torch.cosine_similarity(decoder[:, 0], decoder[:, 1], dim=-1)
    return rho.cpu().numpy(), theta.cpu().numpy()


def gmm_thresholds(rho: np.ndarray, max_components: int = 5, seed: int = 0) -> tuple[tuple[float, ...], str]:
    """(t1, t2, t3, t4) and where they came from. A BIC-selected 1-D Gaussian mixture on rho, components
    ranked by mean: t2 / t3 are where the component nearest 0.5 (the shared band) meets its lower / upper
    neighbour, t1 / t4 where the lowest / highest component meets the next when its mean is below 0.25 /
    above 0.75. Whatever the mixture does not separate keeps its fixed fallback."""
    from sklearn.mixture import GaussianMixture

    values = rho.reshape(-1, 1)
    if len(values) < 10 or np.ptp(values) < 1e-6:
        return FIXED_THRESHOLDS, "fixed"
    fits = [
        GaussianMixture(n, random_state=seed).fit(values)
        for n in range(1, min(max_components, len(values)) + 1)
    ]
    best = min(fits, key=lambda fit: fit.bic(values))
    n = best.n_components
    if n == 1:
        return FIXED_THRESHOLDS, "fixed"
    means = best.means_.ravel()
    rank = np.empty(n, dtype=int)
    rank[np.argsort(means)] = np.arange(n)
    means = np.sort(means)
    grid = np.linspace(0.0, 1.0, 2001)
    ranks = rank[best.predict(grid.reshape(-1, 1))]

    def boundary(low: int, high: int) -> float | None:
        hits = np.nonzero((ranks[:-1] == low) & (ranks[1:] == high))[0]
        return float(grid[hits[0] + 1]) if len(hits) else None

    middle = int(np.argmin(np.abs(means - 0.5)))
    found = [
        boundary(0, 1) if means[0] < 0.25 and middle != 0 else None,
        boundary(middle - 1, middle) if middle > 0 else None,
        boundary(middle, middle + 1) if middle < n - 1 else None,
        boundary(n - 2, n - 1) if means[-1] > 0.75 and middle != n - 1 else None,
    ]
    t1, t2, t3, t4 = (
        value if value is not None else fixed for value, fixed in zip(found, FIXED_THRESHOLDS, strict=True)
    )
    t2, t3 = min(t2, t3), max(t2, t3)
    return (min(t1, t2), t2, t3, max(t4, t3)), f"gmm({n})"


def classify(
    rho: np.ndarray, theta: np.ndarray, thresholds: tuple[float, ...] = FIXED_THRESHOLDS
) -> list[str]:
    """Each latent's class (see the module docstring)."""
    t1, t2, t3, t4 = thresholds
    out = []
    for r, c in zip(rho, theta, strict=True):
        if r < t1:
            out.append("base_only")
        elif r > t4:
            out.append("compressed_only")
        elif c < 0.5:
            out.append("shared_rotated")
        elif r < t2:
            out.append("shared_attenuated")
        elif r > t3:
            out.append("shared_amplified")
        elif c > 0.8:
            out.append("shared_aligned")
        else:
            out.append("shared_other")
    return out
