"""Soft labels from a 1-D, 2-component Gaussian mixture over recent pair distances (PAPER.md 1, step 3).

Everything runs in torch on the training device, in float64. `SoftLabeler` owns the distance bank,
the refit schedule, the collapse guard and its own checkpointable state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCOPES = ("bank", "batch", "epoch")


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
    ):
        if scope not in SCOPES:
            raise ValueError(f"gmm scope {scope!r} not in {SCOPES}")
        self.scope = scope
        self.refit_every = refit_every
        self.em_iterations = em_iterations
        self.var_floor = var_floor
        self.min_separation = min_separation
        self.min_fill = max(4, min(min_fill, capacity))
        self.max_dissimilar = max_dissimilar
        self.bank = DistanceBank(capacity)
        self.mixture: Mixture | None = None
        self.rejected_fits = 0
        self.seen = 0  # distances observed in total (the epoch scope's bank is emptied, this is not)
        self._stats: dict[str, torch.Tensor] | None = None  # of the current mixture, made on first use

    @property
    def ready(self) -> bool:
        if self.scope == "batch":
            return self.seen > 0
        return self.seen >= self.min_fill

    def observe(self, gathered: torch.Tensor) -> None:
        """Add this step's distances (already all-gathered across ranks, detached); the bank and the
        mixture follow the distances' device."""
        if self.bank.values.device != gathered.device:
            self.bank.values = self.bank.values.to(gathered.device)
            if self.mixture is not None:
                self.mixture = Mixture.from_tensor(self.mixture.as_tensor().to(gathered.device))
        if self.scope == "batch":
            self.bank.clear()
        self.bank.push(gathered)
        self.seen += gathered.numel()

    def end_epoch(self, fit: bool) -> bool:
        """`epoch` scope, at a data-epoch boundary: refit on the finished epoch (when `fit`), then empty
        the bank. Returns True if new parameters were accepted."""
        if self.scope != "epoch":
            return False
        accepted = self._fit(self.bank.contents()) if fit else False
        self.bank.clear()
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
        return self._fit(self.bank.contents()) if due else False

    def _fit(self, data: torch.Tensor) -> bool:
        if data.numel() < 4:
            return False
        init = self.mixture if self.mixture is not None else initial_mixture(data, self.var_floor)
        fitted = em_fit(data, init, self.em_iterations, self.var_floor, self.max_dissimilar)
        if is_degenerate(fitted, self.min_separation):
            self.rejected_fits += 1
            self._stats = None
            return False
        self.mixture = fitted
        self._stats = None
        return True

    def labels(self, d: torch.Tensor) -> torch.Tensor | None:
        if self.mixture is None:
            return None
        return posterior_similar(d.detach(), self.mixture)

    def stats(self, prefix: str) -> dict[str, torch.Tensor]:
        """The mixture's parameters and the share of the bank it labels dissimilar (s < 0.5), as 0-dim
        tensors computed at the last accepted fit (no device sync per step)."""
        if self.mixture is None:
            return {}
        if self._stats is None:
            m, held = self.mixture, self.bank.contents()
            below = (posterior_similar(held, m) < 0.5).double().mean() if held.numel() else torch.tensor(float("nan"))
            self._stats = {
                "mu0": m.means[0], "mu1": m.means[1], "var0": m.variances[0], "var1": m.variances[1],
                "w0": m.weights[0], "w1": m.weights[1], "bank_s_below_half": below,
                "bank_held": torch.tensor(float(self.bank.held)), "rejected_fits": torch.tensor(float(self.rejected_fits)),
            }  # fmt: skip
        return {prefix + k: v for k, v in self._stats.items()}

    def state_dict(self) -> dict:
        return {
            "bank": self.bank.values.cpu(),
            "count": self.bank.count,
            "seen": self.seen,
            "mixture": None if self.mixture is None else self.mixture.as_tensor().cpu(),
            "rejected_fits": self.rejected_fits,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a labeller; a bank saved with another capacity (`--gmm-bank` changed on a forced
        resume) keeps its newest values, so a resume never depends on the bank size."""
        saved = DistanceBank(state["bank"].numel())
        saved.values = state["bank"].to(torch.float64)
        saved.count = int(state["count"])
        if saved.capacity == self.bank.capacity:
            self.bank.values = saved.values.to(self.bank.values.device)
            self.bank.count = saved.count
        else:
            self.bank.clear()
            self.bank.push(saved.in_push_order())
        self.seen = int(state.get("seen", saved.count))
        self.mixture = None if state["mixture"] is None else Mixture.from_tensor(state["mixture"])
        self.rejected_fits = int(state["rejected_fits"])
        self._stats = None
