"""Calibrated confidence (issue 25, point 4): temperature scaling, its figures, and answering "unknown".

A network trained with cross-entropy is usually over-confident: of the pictures it gives 90%, fewer than 90%
are right. Temperature scaling (Guo et al., 2017) divides the logits by one number T > 0 fitted on held-out
pictures to minimise their negative log-likelihood; the ranking of the classes, hence every accuracy figure,
stays as it was. Training fits T on the validation split at the end (`--calibrate`, on by default) and stores
it in the checkpoint as "temperature"; every export stores it in its metadata and applies it inside its graph
(tasks.SingleLabel.activation), so a probability means the same from a checkpoint, an export and `serve`.
Checkpoints without it (older ones, multi-label ones) have T = 1.

`reject_below` (a checkpoint's or export's entry, or `--reject-below P`): a picture whose top calibrated
probability is under P is answered "unknown". Multi-label models are not calibrated this way: their
per-class thresholds, chosen on validation, already decide (and may answer none)."""

from __future__ import annotations

import math

import torch

from imgclf.errors import UserError
from imgclf.metrics import ECE_BINS, expected_calibration_error, precision_threshold, reliability_bins

MIN_T, MAX_T = 1e-3, 1e3  # a fitted temperature stays within these; a stored one outside is damaged


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 200) -> float:
    """The temperature T minimising the mean negative log-likelihood of softmax(logits / T) against `labels`
    (class indices): LBFGS on log T from T = 1, in float64, clamped to [MIN_T, MAX_T]. `logits` may be any
    per-row shift of the logits (log-probabilities serve as well). 1.0 for no pictures."""
    if len(logits) == 0:
        return 1.0
    z, y = logits.detach().double().cpu(), labels.detach().long().cpu()
    z = torch.where(torch.isfinite(z), z, torch.full_like(z, -1e4))  # log of a probability that underflowed to 0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, MIN_T), MAX_T) if math.isfinite(t) else 1.0


def rescaled(probs: torch.Tensor, factor: float) -> torch.Tensor:
    """softmax(log(probs) / factor): probabilities of logits z turned into those of z / factor (softmax
    forgets each row's shift, so the logits are not needed). factor = T calibrates softmax(z); factor = 1 / T
    undoes the calibration of an exported graph's output."""
    if factor == 1.0:
        return probs
    return (probs.double().clamp_min(1e-300).log() / factor).softmax(1).to(probs.dtype)


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of `labels` under `probs`."""
    if len(probs) == 0:
        return 0.0
    picked = probs.double().gather(1, labels.long().view(-1, 1)).clamp_min(1e-300)
    return float(-picked.log().mean())


def calibration_figures(raw: torch.Tensor, labels: torch.Tensor, temperature: float, bins: int = ECE_BINS) -> dict:
    """ECE and NLL of the uncalibrated probabilities `raw` (softmax of the logits) and of the calibrated ones
    at `temperature`, with the calibrated reliability bins: what `imgclf eval` and training report."""
    calibrated = rescaled(raw, temperature)
    return {"temperature": temperature, "count": len(raw), "bins": bins,
            "ece_before": expected_calibration_error(raw, labels, bins),
            "ece_after": expected_calibration_error(calibrated, labels, bins),
            "nll_before": nll(raw, labels), "nll_after": nll(calibrated, labels),
            "reliability_before": reliability_bins(raw, labels, bins),
            "reliability_after": reliability_bins(calibrated, labels, bins)}


PRECISIONS = (0.9, 0.95, 0.99)  # the --reject-below cuts training records for these precisions


def fit_on(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Fit the temperature on held-out `probs` (uncalibrated softmax) and `labels`: `calibration_figures` at
    it, with "reject_below_for_precision": for each of PRECISIONS, the cut (and the share of pictures kept)
    of `metrics.precision_threshold` on the calibrated probabilities, None where none reaches it."""
    t = fit_temperature(probs.double().clamp_min(1e-300).log(), labels)
    calibrated = rescaled(probs, t)
    cuts = {str(p): precision_threshold(calibrated, labels, p) for p in PRECISIONS}
    return {**calibration_figures(probs, labels, t), "reject_below_for_precision": cuts}


def describe(figures: dict, where: str) -> str:
    """One line for the user: the temperature, and ECE (and NLL) before and after, on `where`."""
    return (f"calibration: temperature {figures['temperature']:.3f} ({where}, {figures['count']} pictures): "
            f"ECE ({figures['bins']} bins) {figures['ece_before']:.4f} -> {figures['ece_after']:.4f}, "
            f"NLL {figures['nll_before']:.4f} -> {figures['nll_after']:.4f}")


def rejection_line(probs: torch.Tensor, labels: torch.Tensor, target: float, split: str) -> str:
    """`imgclf eval --reject-precision X`: the cut `--reject-below` takes for precision X on this split."""
    found = precision_threshold(probs, labels, target)
    if found is None:
        return f"reject-precision {target:g}: no cut on {split} reaches that precision"
    cut, coverage = found
    return (f"reject-precision {target:g} on {split}: --reject-below {cut:.4f} keeps {coverage:.1%} of the "
            f"pictures (the rest answered unknown)")


def stored_temperature(entries: dict, where: str = "the checkpoint") -> float:
    """A checkpoint's (or export metadata's) "temperature", 1.0 when it has none; one UserError line when damaged."""
    t = entries.get("temperature", 1.0)
    if not (isinstance(t, float | int) and not isinstance(t, bool) and MIN_T <= t <= MAX_T):
        raise UserError(f"{where}'s temperature is damaged: {str(t)[:40]!r}, not a number in [{MIN_T:g}, {MAX_T:g}]")
    return float(t)


def stored_reject_below(entries: dict, where: str = "the checkpoint") -> float | None:
    """A checkpoint's (or export metadata's) "reject_below", None when it has none; UserError when damaged."""
    p = entries.get("reject_below")
    if p is not None and not (isinstance(p, float | int) and not isinstance(p, bool) and 0 <= p <= 1):
        raise UserError(f"{where}'s reject_below is damaged: {str(p)[:40]!r}, not a probability")
    return None if p is None else float(p)


def is_unknown(top_probability: float, below: float | None) -> bool:
    """Whether a picture whose most probable class has `top_probability` is answered "unknown"."""
    return below is not None and top_probability < below
