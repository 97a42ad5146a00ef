"""The learned map of "Walking on the fiber": from z ~ N(0, I_k) to weight offsets (torch only).

Fitted to the kept walk iterates' offsets from the start (docs/fiber.md: the paper learns "a
deformation of parameter space"; these two maps are our reconstruction):

- `PCAMap`: offset = mean + sum_j scale_j z_j basis_j -- the top-k principal subspace of the
  offsets with each direction's standard deviation. Memory k x D (+ D for the mean).
- `MLPMap`: the same subspace, but the k coordinates come from c = z + MLP(z), a small residual
  network trained as a moment-matching generator (maximum mean discrepancy between generated and
  walked coordinates, Gaussian kernels at several bandwidths; Li, Swersky and Zemel 2015). It
  starts at the identity (the PCA map's Gaussian) and can bend it towards a curved fiber.

Drawing a sample costs no gradient of the model: k normals and a k x D product.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _check_offsets(offsets: Tensor, rank: int) -> None:
    if offsets.ndim != 2 or offsets.shape[0] < 2:
        raise ValueError(f"offsets must be [n >= 2, D], got shape {tuple(offsets.shape)}: keep more walk "
                         f"iterates (more particles or steps, or a smaller thinning interval)")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank < offsets.shape[0]:
        raise ValueError(f"rank must be an int in [1, n) = [1, {offsets.shape[0]}) for {offsets.shape[0]} "
                         f"kept iterates, got {rank!r}")


@dataclass
class PCAMap:
    mean: Tensor  # [D]
    basis: Tensor  # [k, D], orthonormal rows
    scales: Tensor  # [k], standard deviation along each row

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    def coordinates(self, offsets: Tensor) -> Tensor:
        """Standardized coordinates [n, k] of offsets in the subspace (z of the linear map)."""
        return ((offsets.to(self.basis.dtype) - self.mean) @ self.basis.T) / self.scales

    def decode(self, z: Tensor) -> Tensor:
        return self.mean + (z * self.scales) @ self.basis

    def sample(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(count, self.rank, generator=generator, dtype=self.basis.dtype)
        return self.decode(z)


def fit_pca_map(offsets: Tensor, rank: int) -> PCAMap:
    """Top-`rank` principal directions of the offsets [n, D] (float64 SVD of the n x n Gram matrix,
    so the cost is n^2 D, not D^2)."""
    _check_offsets(offsets, rank)
    x = offsets.to(torch.float64)
    mean = x.mean(0)
    centred = x - mean
    gram = centred @ centred.T
    eigval, eigvec = torch.linalg.eigh(gram)  # ascending
    eigval, eigvec = eigval.flip(0)[:rank], eigvec.flip(1)[:, :rank]
    if not bool((eigval > 1e-12 * eigval[0].clamp_min(1e-300)).all()):
        raise ValueError(f"the offsets span fewer than rank = {rank} directions; lower the rank")
    singular = eigval.sqrt()
    basis = (eigvec.T @ centred) / singular[:, None]
    scales = singular / (x.shape[0] - 1) ** 0.5
    return PCAMap(mean=mean.float(), basis=basis.float(), scales=scales.float())


class _Residual(torch.nn.Module):
    def __init__(self, k: int, hidden: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(k, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, k))
        torch.nn.init.zeros_(self.net[2].weight)  # starts at the identity: the PCA map's Gaussian
        torch.nn.init.zeros_(self.net[2].bias)

    def forward(self, z: Tensor) -> Tensor:
        return z + self.net(z)


def mmd(a: Tensor, b: Tensor, bandwidths: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> Tensor:
    """Squared maximum mean discrepancy (biased V-statistic) with a sum of Gaussian kernels."""
    def kernel(x: Tensor, y: Tensor) -> Tensor:
        d2 = torch.cdist(x, y).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)
    return kernel(a, a).mean() + kernel(b, b).mean() - 2 * kernel(a, b).mean()


@dataclass
class MLPMap:
    pca: PCAMap
    generator_net: torch.nn.Module

    @property
    def rank(self) -> int:
        return self.pca.rank

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.pca.decode(self.generator_net(z.float()))

    def sample(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(count, self.rank, generator=generator)
        return self.decode(z)


def fit_mlp_map(offsets: Tensor, rank: int, *, hidden: int = 64, steps: int = 300, lr: float = 1e-2,
                batch: int = 256, seed: int = 0) -> MLPMap:
    """PCA subspace, then a residual MLP on its k coordinates fitted by MMD to the walked ones."""
    pca = fit_pca_map(offsets, rank)
    target = pca.coordinates(offsets).float()
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _Residual(rank, hidden)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        z = torch.randn(batch, rank, generator=gen)
        loss = mmd(net(z), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return MLPMap(pca=pca, generator_net=net)
