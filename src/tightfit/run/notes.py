"""The notes a result carries: what the run could not compress and why, what was folded or
unwrapped, the certificate, and hints when the user's metric looks inverted."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from ..evaluation.metrics import PerSample, PerSampleMetric
from ..measure.analysis import SkippedModule, shown_name
from ..operators.compose import Compose, why_not_taken
from ..records import Measurement, Result, TrialRecord
from ..search.space import SearchSpace


def note_certificate(result: Result, constraints, baseline: Measurement) -> None:
    cert = result.certificate
    full = Measurement(result.metric, result.size_bytes, 0, baseline.weight_params)
    violated = [c.describe() for c in constraints if c.value(full, baseline) > 0]
    if violated:
        result.notes.append(
            f"On the full validation set the answer breaks {', '.join(violated)} (metric {result.metric:.4f}); "
            "the search decided on a subsample and the held-out part disagrees. Consider a larger confidence."
        )
    if cert is not None:
        result.notes.append(
            f"Certificate: P(constraints met on new data) = {cert.probability:.3f} from {cert.samples} held-out "
            f"validation samples; {cert.confidence:.0%} upper bound(s) on the constraint value(s): "
            + ", ".join(f"{b:+.4f}" for b in cert.bounds)
            + (" (certified)." if cert.certified else " (not certified at this confidence).")
        )


def direction_note(evaluate: Any, trials: Sequence[TrialRecord], baseline: Measurement) -> list[str]:
    """A hint when the user's metric looks like an error given as is (higher = worse): every compressed
    model scored clearly (10%) above the original, or most did and the more compressed a model the
    higher it scored. Compression rarely helps a higher-is-better metric that consistently. Not for
    tightfit's own metrics (Accuracy, Agreement, Fidelity), whose direction is known."""
    if isinstance(evaluate, PerSampleMetric) and not isinstance(evaluate, PerSample):
        return []
    done = [
        (t.objective, t.measurement.metric)
        for t in trials
        if t.state == "COMPLETE"
        and t.measurement is not None
        and t.objective is not None
        and math.isfinite(t.measurement.metric)
        and t.fidelity not in ("screen", "stopped")
    ]
    if len(done) < 3:
        return []
    scored = sorted(metric for _, metric in done)
    clearly_above = baseline.metric + 0.1 * abs(baseline.metric)
    # Spearman's rank correlation of objective (size) and metric: -1 when smaller always scored higher
    rises_with_compression = len(done) >= 4 and spearman(done) <= -0.6
    if not (scored[0] > clearly_above or (scored[len(scored) // 2] > clearly_above and rises_with_compression)):
        return []
    return [
        f"The compressed models scored above the original ({len(scored) - sum(m <= baseline.metric for m in scored)} "
        f"of {len(scored)} trials, median {scored[len(scored) // 2]:.4g} vs {baseline.metric:.4g}). tightfit reads "
        "`evaluate` as higher is better: if yours is an error or a loss (MSE, MAE), return its negative, e.g. "
        "evaluate=lambda m: -mse(m), and give the limit as MaxDrop(d) (the error may rise by at most d) or "
        "MinMetric(-e) (the error at most e)."
    ]


def spearman(pairs: Sequence[tuple[float, float]]) -> float:
    from scipy.stats import spearmanr

    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    if len(set(xs)) < 2 or len(set(ys)) < 2:  # a constant side: no trend (scipy would warn and answer nan)
        return 0.0
    rho = spearmanr(xs, ys).statistic
    return float(rho) if math.isfinite(rho) else 0.0


def partly_refused(space: SearchSpace) -> list[str]:
    """Notes on layers an operator refused that other operators of the strategy still compress
    (``left_alone`` lists only layers that nothing touches)."""
    notes = []
    for operator in space.strategy:
        by_reason: dict[str, list[str]] = {}
        for name, reason in operator.refused().items():
            if name in space.fixed:
                by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            shown = ", ".join(shown_name(n) for n in names[:6]) + (
                f" and {len(names) - 6} more" if len(names) > 6 else ""
            )
            notes.append(f"{operator.name} left {len(names)} layer(s) to the other operators: {shown} ({reason}).")
    return notes


def followers(space: SearchSpace) -> dict[str, tuple[str, list[str]]]:
    """Modules an operator compresses through other layers' entries in the space (structured
    pruning: a group's members other than its leader) -> (operator name, those layers)."""
    found: dict[str, tuple[str, list[str]]] = {}
    for operator in space.strategy:
        for name, leaders in operator.follows().items():
            searched = [lead for lead in leaders if operator.name in space.fixed.get(lead, {})]
            if searched and name not in found:
                found[name] = (operator.name, searched)
    return found


def left_alone(analysis, space: SearchSpace) -> list[SkippedModule]:
    """Modules with parameters that no operator of the strategy touches, and why."""
    reasons: dict[str, str] = {}
    for operator in space.strategy:
        for name, reason in operator.refused().items():
            reasons.setdefault(name, reason)
    untouched = [
        SkippedModule(
            layer.name, layer.type, layer.params, reasons.get(layer.name) or why_untouched(layer, space.strategy)
        )
        for layer in analysis.layers
        if layer.name not in space.fixed
    ]
    touched = {name for operator in space.strategy for name in operator.touches()} | set(followers(space))
    # matched on module paths first, then named for a person (a model that is one layer: "<root>")
    return [
        dataclasses.replace(s, name=shown_name(s.name))
        for s in analysis.skipped + tuple(untouched)
        if s.name not in touched
    ]


def why_untouched(layer, strategy: Compose) -> str:
    """Why no operator takes a layer that none refused (:func:`~tightfit.operators.compose.why_not_taken`)."""
    return f"no operator of the strategy applies to it ({why_not_taken(layer, strategy)})"


def following_note(analysis, space: SearchSpace) -> list[str]:
    """A note on the weight layers compressed only with a group another layer leads (they have no
    plan entry of their own, so the plan alone would not show it)."""
    found = followers(space)
    by_operator: dict[str, list[str]] = {}
    for layer in analysis.layers:
        if layer.name in found and layer.name not in space.fixed:
            operator, leaders = found[layer.name]
            by_operator.setdefault(operator, []).append(f"{layer.name} follows {leaders[0]}")
    return [
        f"{operator} compresses {len(items)} layer(s) with the channel group another layer leads (no setting of "
        f"their own): {', '.join(items[:6])}" + (f" and {len(items) - 6} more" if len(items) > 6 else "") + "."
        for operator, items in by_operator.items()
    ]


def speed_note(measured: Measurement, baseline: Measurement) -> str:
    if measured.latency_ms is None or baseline.latency_ms is None:
        return ""
    speedup = baseline.latency_ms / measured.latency_ms
    pace = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
    return f" Measured {pace} ({measured.latency_ms:.3g} vs {baseline.latency_ms:.3g} ms per forward pass)."


def weight_norm_note(weight_normed: list[str]) -> str:
    shown = ", ".join(weight_normed[:6]) + (f" and {len(weight_normed) - 6} more" if len(weight_normed) > 6 else "")
    return (
        f"Weight norm was folded into the weights of {shown} before compression (they compute "
        "the same); result.model holds plain weights."
    )


COMPILED_NOTE = (
    "The model was a torch.compile wrapper; the module it wraps was compressed, and "
    "result.model is an eager module: call torch.compile on it again."
)
