"""Soft labels from a 1-D, 2-component Gaussian mixture over recent pair distances (PAPER.md 1, step 3).

Everything runs in torch on the training device, in float64. `SoftLabeler` owns the distance bank(s),
the refit schedule, the collapse guard and its own checkpointable state. Three mixture modes (`--gmm-mode`,
docs/ARCHITECTURE.md "Soft labels"): `free` (the paper's EM), `anchored` (the dissimilar component is the
density of shuffled-pair distances) and `map` (tied variances, a Beta prior on the dissimilar weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from train.config import GMM_MODES as MODES
from train.config import SCOPES


@dataclass
class Mixture:
    """Component 0 is the lower-mean ("similar") component after `ordered()`."""

    means: torch.Tensor  # (2,) float64
    variances: torch.Tensor  # (2,)
    weights: torch.Tensor  # (2,)

    def ordered(self) -> "Mixture":
        order = torch.argsort(self.means)
        return Mixture(self.means[order], self.variances[order], self.weights[order])

    def as_tensor(self) -> torch.Tensor:
        return torch.stack([self.means, self.variances, self.weights])

    @staticmethod
    def from_tensor(t: torch.Tensor) -> "Mixture":
        return Mixture(t[0].clone(), t[1].clone(), t[2].clone())


def component_log_joint(x: torch.Tensor, mix: Mixture) -> torch.Tensor:
    """log(w_k N(x | mu_k, var_k)) for each sample and component: shape (n, 2)."""
    x = x.to(torch.float64).reshape(-1, 1)
    var = mix.variances.reshape(1, -1)
    return (
        torch.log(mix.weights).reshape(1, -1)
        - 0.5 * (math.log(2 * math.pi) + torch.log(var))
        - 0.5 * (x - mix.means.reshape(1, -1)) ** 2 / var
    )


def responsibilities(x: torch.Tensor, mix: Mixture) -> torch.Tensor:
    """Posterior P(component k | x), shape (n, 2)."""
    return torch.softmax(component_log_joint(x, mix), dim=1)


def posterior_similar(x: torch.Tensor, mix: Mixture) -> torch.Tensor:
    """s(d): the posterior of the lower-mean ("similar") component, made monotone; in the dtype of x.

    s = 1 for d <= mu_similar, s = 0 for d >= mu_dissimilar, and the mixture posterior in between.
    With unequal variances the raw posterior is not monotone: the wider component wins again in both
    tails, so near-identical pairs (d -> 0) would get s -> 0 and be pushed apart. Between the two means
    the log-odds derivative (d - mu0)/var0 - (d - mu1)/var1 is >= 0 for any variances, so the clamped
    posterior is non-increasing in d everywhere (PAPER.md section 1, step 3; docs/ARCHITECTURE.md).
    """
    mix = mix.ordered()
    d = x.to(torch.float64)
    s = responsibilities(d, mix)[:, 0].reshape(d.shape)
    s = torch.where(d <= mix.means[0], torch.ones_like(s), s)
    s = torch.where(d >= mix.means[1], torch.zeros_like(s), s)
    return s.to(x.dtype)


def initial_mixture(x: torch.Tensor, var_floor: float) -> Mixture:
    """Cold start: the bulk around the median, a small upper tail around the 95th percentile."""
    x = x.to(torch.float64)
    q = torch.quantile(x, torch.tensor([0.5, 0.95], dtype=torch.float64, device=x.device))
    var = torch.clamp(x.var(), min=var_floor)
    return Mixture(q.clone(), torch.stack([var, var]), torch.tensor([0.9, 0.1], dtype=torch.float64, device=x.device))


def em_fit(x: torch.Tensor, init: Mixture, iterations: int, var_floor: float, max_dissimilar: float = 1.0) -> Mixture:
    """`iterations` EM steps for a 1-D, 2-component mixture, warm-started from `init`; float64.

    `max_dissimilar` < 1 bounds the weight of the higher-mean component (the constrained M step: the
    weight's likelihood is concave, so its optimum under the bound is the bound). It encodes the prior that
    asymmetric pairs are rare, and stops the self-confirming drift in which pairs labelled dissimilar are
    pushed apart and so enlarge the dissimilar component at the next refit.
    """
    x = x.to(torch.float64).reshape(-1)
    mix = Mixture(*(t.to(device=x.device, dtype=torch.float64) for t in (init.means, init.variances, init.weights)))
    for _ in range(iterations):
        resp = responsibilities(x, mix)  # E step
        mass = resp.sum(0).clamp_min(1e-12)  # M step
        means = (resp * x[:, None]).sum(0) / mass
        variances = ((resp * (x[:, None] - means) ** 2).sum(0) / mass).clamp_min(var_floor)
        weights = mass / mass.sum()
        if max_dissimilar < 1.0:
            high = torch.argmax(means)
            capped = torch.clamp(weights[high], max=max_dissimilar)
            weights = torch.where(torch.arange(2, device=x.device) == high, capped, 1.0 - capped)
        mix = Mixture(means, variances, weights)
    return mix.ordered()


def is_degenerate(mix: Mixture, min_separation: float, min_weight: float = 1e-3) -> bool:
    """Components that collapsed onto each other (or vanished) carry no split: keep the old fit."""
    t = mix.as_tensor()
    if not bool(torch.isfinite(t).all()):
        return True
    return bool((mix.means[1] - mix.means[0]).abs() < min_separation) or bool(mix.weights.min() < min_weight)


def map_em_fit(
    x: torch.Tensor,
    init: Mixture,
    iterations: int,
    var_floor: float,
    prevalence: float,
    strength: float,
    max_dissimilar: float = 1.0,
) -> Mixture:
    """EM for the `map` mode: two Gaussians with one tied variance, the dissimilar (higher-mean) weight a
    maximum a posteriori estimate under a Beta prior of mean `prevalence` and `strength` pseudo-pairs.

    Prior Beta(a, b) with a = prevalence * strength, b = (1 - prevalence) * strength; the M step's weight is
    the posterior mode (m_1 + a - 1) / (n + a + b - 2), m_1 the dissimilar responsibilities' sum, clipped to
    [0, max_dissimilar]. With tied variances the log-odds of the posterior are linear in d, so s(d) is
    monotone without clamps.
    """
    x = x.to(torch.float64).reshape(-1)
    n = x.numel()
    a, b = prevalence * strength, (1.0 - prevalence) * strength
    mix = Mixture(*(t.to(device=x.device, dtype=torch.float64) for t in (init.means, init.variances, init.weights)))
    mix = mix.ordered()
    for _ in range(iterations):
        resp = responsibilities(x, mix)  # E step
        mass = resp.sum(0).clamp_min(1e-12)  # M step
        means = (resp * x[:, None]).sum(0) / mass
        tied = ((resp * (x[:, None] - means) ** 2).sum() / n).clamp_min(var_floor)
        high = torch.argmax(means)
        w_high = ((mass[high] + a - 1.0) / (n + a + b - 2.0)).clamp(0.0, max_dissimilar)
        weights = torch.where(torch.arange(2, device=x.device) == high, w_high, 1.0 - w_high)
        mix = Mixture(means, torch.stack([tied, tied]), weights).ordered()
    return mix


@dataclass
class GridDensity:
    """A density tabulated at `values.numel()` evenly spaced points from `lo` to `hi`, linear in between and
    0 outside. `as_tensor` packs it (lo, hi, values...) for checkpoints."""

    lo: torch.Tensor  # 0-dim float64
    hi: torch.Tensor
    values: torch.Tensor  # (G,) float64

    @property
    def points(self) -> torch.Tensor:
        return torch.linspace(0, 1, self.values.numel(), dtype=torch.float64, device=self.values.device) * (
            self.hi - self.lo
        ) + self.lo

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return grid_interp(self.values, self.lo, self.hi, x.to(torch.float64), outside=0.0)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of the tabulated density (for logging: the dissimilar component's "mu1, var1")."""
        p = self.values / self.values.sum().clamp_min(1e-300)
        mean = (p * self.points).sum()
        return mean, (p * (self.points - mean) ** 2).sum()

    def as_tensor(self) -> torch.Tensor:
        return torch.cat([torch.stack([self.lo, self.hi]), self.values])

    @staticmethod
    def from_tensor(t: torch.Tensor) -> "GridDensity":
        return GridDensity(t[0].clone(), t[1].clone(), t[2:].clone())


def grid_interp(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, x: torch.Tensor, outside: float | None):
    """Linear interpolation of `values` tabulated at evenly spaced points from `lo` to `hi`, at `x`. Outside
    [lo, hi] the value is `outside`, or with None the nearest end's value."""
    g = values.numel()
    pos = ((x - lo) / (hi - lo) * (g - 1)).clamp(0, g - 1)
    left = pos.floor().long().clamp(max=g - 2) if g > 1 else torch.zeros_like(pos, dtype=torch.long)
    frac = pos - left
    right = (left + 1).clamp(max=g - 1)
    a, b = values[left], values[right]
    # kept between the two tabulated values, so a monotone table gives a monotone function despite rounding
    y = torch.maximum(torch.minimum(torch.lerp(a, b, frac), torch.maximum(a, b)), torch.minimum(a, b))
    if outside is not None:
        y = torch.where((x < lo) | (x > hi), torch.full_like(y, outside), y)
    return y


def binned_kde(x: torch.Tensor, bins: int = 512) -> GridDensity:
    """Gaussian kernel density estimate of `x` (Silverman's bandwidth), binned: counts on `bins` evenly
    spaced points covering the sample +- 4 bandwidths, each point's count spread by the kernel. Counts come
    from a sort and `searchsorted`, the smoothing from one (bins x bins) weighted sum: deterministic on any
    device (torch's histc and bincount are not on CUDA)."""
    x = x.to(torch.float64).reshape(-1)
    n = x.numel()
    q = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=torch.float64, device=x.device))
    spread = torch.minimum(x.std(), (q[1] - q[0]) / 1.34)
    spread = torch.where(spread > 0, spread, x.std().clamp_min(1e-6))
    h = (0.9 * spread * n ** (-0.2)).clamp_min(1e-6)
    lo, hi = x.min() - 4 * h, x.max() + 4 * h
    step = (hi - lo) / (bins - 1)
    edges = lo + step * (torch.arange(bins + 1, device=x.device, dtype=torch.float64) - 0.5)
    counts = torch.diff(torch.searchsorted(torch.sort(x).values, edges, right=False)).to(torch.float64)
    points = lo + step * torch.arange(bins, device=x.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((points[:, None] - points[None, :]) / h) ** 2) / (h * math.sqrt(2 * math.pi))
    return GridDensity(lo, hi, (kernel * counts[None, :]).sum(1) / n)


def anchored_log_odds(x: torch.Tensor, mix: Mixture, density: GridDensity) -> torch.Tensor:
    """log[(1 - pi) N(x; mu0, var0)] - log[pi f_neg(x)]: the raw log-odds of "similar" in the anchored mode."""
    x = x.to(torch.float64)
    similar = torch.log(mix.weights[0]) - 0.5 * (
        math.log(2 * math.pi) + torch.log(mix.variances[0]) + (x - mix.means[0]) ** 2 / mix.variances[0]
    )
    return similar - (torch.log(mix.weights[1]) + torch.log(density(x)))  # f_neg = 0: +inf, s = 1


def anchored_em_fit(
    x: torch.Tensor,
    density: GridDensity,
    init: Mixture,
    iterations: int,
    var_floor: float,
    max_dissimilar: float = 1.0,
    min_weight: float = 1e-4,
) -> Mixture:
    """EM for the `anchored` mode: the dissimilar component is the fixed density `density` of shuffled-pair
    (cross-study) distances; only the similar Gaussian (mu0, var0) and the dissimilar weight pi are updated.

    pi is kept in [min_weight, max_dissimilar]: at exactly 0 EM could never raise it again. The returned
    mixture's component 1 carries the density's mean and variance (for logging; labels use the density).
    """
    x = x.to(torch.float64).reshape(-1)
    mix = Mixture(*(t.to(device=x.device, dtype=torch.float64) for t in (init.means, init.variances, init.weights)))
    neg_mean, neg_var = density.moments()
    for _ in range(iterations):
        similar = torch.sigmoid(anchored_log_odds(x, mix, density))  # E step
        mass = similar.sum().clamp_min(1e-12)  # M step
        mu0 = (similar * x).sum() / mass
        var0 = ((similar * (x - mu0) ** 2).sum() / mass).clamp_min(var_floor)
        pi = (1.0 - similar.mean()).clamp(min_weight, max(max_dissimilar, min_weight))
        mix = Mixture(torch.stack([mu0, neg_mean]), torch.stack([var0, neg_var]), torch.stack([1.0 - pi, pi]))
    return mix


def anchored_posterior(x: torch.Tensor, mix: Mixture, density: GridDensity) -> torch.Tensor:
    """s(d) of the anchored mode, made non-increasing: 1 for d <= mu0; above it the running minimum over the
    density's grid of the raw posterior (linear between grid points, the grid's last value beyond it).

    The raw posterior is not monotone in general: the negatives' density may have several modes; above the
    last negative the similar Gaussian's tail outlasts the kernel density's and the raw s climbs back to 1;
    below mu0 the kernel density's lower tail can outweigh the Gaussian's and pull s down for near-identical
    pairs. The running minimum is the largest non-increasing function below the raw posterior above mu0.
    """
    d = x.to(torch.float64)
    points = density.points
    raw = torch.sigmoid(anchored_log_odds(points, mix, density))
    raw = torch.where(points <= mix.means[0], torch.ones_like(raw), raw)
    table = torch.cummin(raw, dim=0).values
    s = grid_interp(table, density.lo, density.hi, d, outside=None)
    s = torch.where(d < density.lo, torch.ones_like(s), s)
    s = torch.where(d <= mix.means[0], torch.ones_like(s), s)
    return s.to(x.dtype)


class DistanceBank:
    """FIFO of the last `capacity` detached distances (a ring buffer on the device, float64)."""

    def __init__(self, capacity: int, device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"distance bank capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.values = torch.zeros(capacity, dtype=torch.float64, device=device)
        self.count = 0  # total pushed since the last clear; the bank holds min(count, capacity)

    def push(self, d: torch.Tensor) -> None:
        d = d.detach().to(self.values.device, torch.float64).reshape(-1)[-self.capacity :]
        idx = (self.count + torch.arange(d.numel(), device=d.device)) % self.capacity
        self.values[idx] = d
        self.count += d.numel()

    def contents(self) -> torch.Tensor:
        return self.values[: min(self.count, self.capacity)]

    def in_push_order(self) -> torch.Tensor:
        """The held values oldest to newest (the ring's slots rotated into push order)."""
        held = min(self.count, self.capacity)
        idx = (self.count - held + torch.arange(held, device=self.values.device)) % self.capacity
        return self.values[idx]

    @property
    def held(self) -> int:
        return min(self.count, self.capacity)

    @property
    def full(self) -> bool:
        return self.count >= self.capacity

    def clear(self) -> None:
        self.count = 0


class SoftLabeler:
    """One network's labeller: a bank of its detached distances and a mixture refitted on a schedule.

    Scopes (`--gmm-scope`):
      bank:  FIFO of the last `capacity` distances; refit every `refit_every` steps, warm-started.
      batch: refit on the current batch every step (ablation).
      epoch: the bank collects one data epoch (`--ckpt-every` steps); at the epoch's end the mixture is
             refitted on the whole epoch and the bank starts over, so every label of an epoch comes
             from a fit on the complete previous epoch (DivideMix's per-epoch split).
    Modes (`--gmm-mode`):
      free:     both Gaussians free (the paper's EM, `em_fit`), the clamped `posterior_similar`.
      anchored: the dissimilar component is the density of a second bank, of shuffled-pair (cross-study)
                distances, held beside the aligned one with the same scope; EM updates the similar
                Gaussian and the weight only (`anchored_em_fit`, `anchored_posterior`).
      map:      tied variances and a Beta prior on the dissimilar weight (`map_em_fit`); the raw posterior.
    `ready` says whether enough distances were seen for a first fit (`min_fill`, at most the capacity);
    until a valid mixture exists, `labels` returns None (the caller keeps s = 1).
    """

    def __init__(
        self,
        capacity: int,
        scope: str,
        refit_every: int,
        em_iterations: int,
        var_floor: float,
        min_separation: float,
        min_fill: int,
        max_dissimilar: float = 1.0,
        mode: str = "free",
        prior_prevalence: float = 0.03,
        prior_strength: float | None = None,
    ):
        if scope not in SCOPES:
            raise ValueError(f"gmm scope {scope!r} not in {SCOPES}")
        if mode not in MODES:
            raise ValueError(f"gmm mode {mode!r} not in {MODES}")
        self.scope = scope
        self.mode = mode
        self.refit_every = refit_every
        self.em_iterations = em_iterations
        self.var_floor = var_floor
        self.min_separation = min_separation
        self.min_fill = max(4, min(min_fill, capacity))
        self.max_dissimilar = max_dissimilar
        self.prior_prevalence = prior_prevalence
        self.prior_strength = float(capacity if prior_strength is None else prior_strength)
        self.bank = DistanceBank(capacity)
        self.neg_bank = DistanceBank(capacity) if mode == "anchored" else None
        self.mixture: Mixture | None = None
        self.neg_density: GridDensity | None = None  # anchored: f_neg of the last accepted fit
        self.rejected_fits = 0
        self.seen = 0  # distances observed in total (the epoch scope's bank is emptied, this is not)
        self._stats: dict[str, torch.Tensor] | None = None  # of the current mixture, made on first use

    @property
    def ready(self) -> bool:
        if self.scope == "batch":
            return self.seen > 0
        return self.seen >= self.min_fill

    def observe(self, gathered: torch.Tensor, gathered_neg: torch.Tensor | None = None) -> None:
        """Add this step's distances (already all-gathered across ranks, detached) and, in the anchored
        mode, its shuffled-pair distances `gathered_neg`; the banks and the fit follow the device."""
        if self.bank.values.device != gathered.device:
            self._to(gathered.device)
        if self.scope == "batch":
            self._clear()
        self.bank.push(gathered)
        if self.neg_bank is not None:
            if gathered_neg is None:
                raise ValueError("the anchored mode needs the shuffled-pair distances of every step")
            self.neg_bank.push(gathered_neg)
        self.seen += gathered.numel()

    def _to(self, device: torch.device) -> None:
        self.bank.values = self.bank.values.to(device)
        if self.neg_bank is not None:
            self.neg_bank.values = self.neg_bank.values.to(device)
        if self.mixture is not None:
            self.mixture = Mixture.from_tensor(self.mixture.as_tensor().to(device))
        if self.neg_density is not None:
            self.neg_density = GridDensity.from_tensor(self.neg_density.as_tensor().to(device))

    def _clear(self) -> None:
        self.bank.clear()
        if self.neg_bank is not None:
            self.neg_bank.clear()

    def end_epoch(self, fit: bool) -> bool:
        """`epoch` scope, at a data-epoch boundary: refit on the finished epoch (when `fit`), then empty
        the bank. Returns True if new parameters were accepted."""
        if self.scope != "epoch":
            return False
        accepted = self._fit() if fit else False
        self._clear()
        return accepted

    def maybe_refit(self, step: int, force: bool = False) -> bool:
        """Refit when due; returns True if new parameters were accepted. The epoch scope refits at
        `end_epoch`, here only for its very first fit."""
        if self.mixture is None and self.scope != "batch" and self.bank.held < self.min_fill:
            return False  # a first fit never runs on a few batches (e.g. just after an epoch boundary)
        if self.scope == "epoch":
            due = force or self.mixture is None
        else:
            due = force or self.scope == "batch" or self.mixture is None or step % self.refit_every == 0
        return self._fit() if due else False

    def _fit(self) -> bool:
        data = self.bank.contents()
        if data.numel() < 4 or (self.neg_bank is not None and self.neg_bank.held < 4):
            return False
        density = None
        if self.mode == "anchored":
            density = binned_kde(self.neg_bank.contents())
            init = self.mixture if self.mixture is not None else initial_mixture(data, self.var_floor)
            fitted = anchored_em_fit(data, density, init, self.em_iterations, self.var_floor, self.max_dissimilar)
            rejected = not bool(torch.isfinite(fitted.as_tensor()).all())  # pi near 0 is an answer, not a collapse
        else:
            if self.mixture is not None:
                init = self.mixture
            else:
                init = initial_mixture(data, self.var_floor)
                if self.mode == "map":  # start from the prior's weight and one variance
                    p = torch.tensor([1 - self.prior_prevalence, self.prior_prevalence], dtype=torch.float64)
                    init = Mixture(init.means, init.variances, p.to(init.means.device))
            if self.mode == "map":
                fitted = map_em_fit(data, init, self.em_iterations, self.var_floor, self.prior_prevalence,
                                    self.prior_strength, self.max_dissimilar)  # fmt: skip
            else:
                fitted = em_fit(data, init, self.em_iterations, self.var_floor, self.max_dissimilar)
            rejected = is_degenerate(fitted, self.min_separation)
        self._stats = None
        if rejected:
            self.rejected_fits += 1
            return False
        self.mixture, self.neg_density = fitted, density
        return True

    def labels(self, d: torch.Tensor) -> torch.Tensor | None:
        if self.mixture is None:
            return None
        d = d.detach()
        if self.mode == "anchored":
            return anchored_posterior(d, self.mixture, self.neg_density)
        if self.mode == "map":
            return responsibilities(d, self.mixture)[:, 0].reshape(d.shape).to(d.dtype)
        return posterior_similar(d, self.mixture)

    def stats(self, prefix: str) -> dict[str, torch.Tensor]:
        """The mixture's parameters and the share of the bank it labels dissimilar (s < 0.5), as 0-dim
        tensors computed at the last accepted fit (no device sync per step). In the anchored mode mu1 and
        var1 are the shuffled-pair density's mean and variance."""
        if self.mixture is None:
            return {}
        if self._stats is None:
            m, held = self.mixture, self.bank.contents()
            below = (self.labels(held) < 0.5).double().mean() if held.numel() else torch.tensor(float("nan"))
            self._stats = {
                "mu0": m.means[0], "mu1": m.means[1], "var0": m.variances[0], "var1": m.variances[1],
                "w0": m.weights[0], "w1": m.weights[1], "bank_s_below_half": below,
                "bank_held": torch.tensor(float(self.bank.held)), "rejected_fits": torch.tensor(float(self.rejected_fits)),
            }  # fmt: skip
        return {prefix + k: v for k, v in self._stats.items()}

    def state_dict(self) -> dict:
        state = {
            "bank": self.bank.values.cpu(),
            "count": self.bank.count,
            "seen": self.seen,
            "mixture": None if self.mixture is None else self.mixture.as_tensor().cpu(),
            "rejected_fits": self.rejected_fits,
        }
        if self.neg_bank is not None:  # anchored only: other modes' checkpoints keep their layout
            state["neg_bank"] = self.neg_bank.values.cpu()
            state["neg_count"] = self.neg_bank.count
            state["neg_density"] = None if self.neg_density is None else self.neg_density.as_tensor().cpu()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a labeller; a bank saved with another capacity (`--gmm-bank` changed on a forced
        resume) keeps its newest values, so a resume never depends on the bank size."""
        _load_bank(self.bank, state["bank"], state["count"])
        self.seen = int(state.get("seen", state["count"]))
        self.mixture = None if state["mixture"] is None else Mixture.from_tensor(state["mixture"])
        self.rejected_fits = int(state["rejected_fits"])
        if self.neg_bank is not None:
            if "neg_bank" not in state:
                raise ValueError("the checkpoint's labeller holds no shuffled-pair bank (saved by another --gmm-mode)")
            _load_bank(self.neg_bank, state["neg_bank"], state["neg_count"])
            density = state["neg_density"]
            self.neg_density = None if density is None else GridDensity.from_tensor(density.to(torch.float64))
        self._stats = None


def _load_bank(bank: DistanceBank, values: torch.Tensor, count: int) -> None:
    """Fill `bank` from a saved ring buffer; a ring of another capacity hands over its newest values."""
    saved = DistanceBank(values.numel())
    saved.values = values.to(torch.float64)
    saved.count = int(count)
    if saved.capacity == bank.capacity:
        bank.values = saved.values.to(bank.values.device)
        bank.count = saved.count
    else:
        bank.clear()
        bank.push(saved.in_push_order())
