"""Guardrails: bounds judged only over a minimum sample, each bound able to trip."""

from __future__ import annotations

from proxy.control.guardrails import Guardrails, GuardrailSettings

SETTINGS = GuardrailSettings(window=100, min_sample=10, max_answer_change=0.2,
                             max_error_increase=0.1, max_latency_ratio=1.5)


def feed(g: Guardrails, mode: str, n: int, *, error=False, latency=1.0, same=True):
    breaches = []
    for _ in range(n):
        b = g.observe("*", mode, error, latency, "5", "5" if same else "6", decided=True)
        if b:
            breaches.append(b)
    return breaches


def test_healthy_groups_never_trip():
    g = Guardrails(SETTINGS)
    assert feed(g, "shadow", 50) == [] and feed(g, "enforce", 50, latency=0.5) == []
    assert g.status()["*"]["tripped"] is None


def test_answer_changes_in_shadow_trip_after_the_minimum_sample():
    g = Guardrails(SETTINGS)
    assert feed(g, "shadow", 9, same=False) == []  # below the minimum sample: not judged yet
    (breach,) = feed(g, "shadow", 5, same=False)
    assert "answers changed" in breach
    assert g.status()["*"]["tripped"] == breach
    assert feed(g, "shadow", 5, same=False) == []  # reported once


def test_error_rate_rise_in_the_enforced_group_trips():
    g = Guardrails(SETTINGS)
    feed(g, "shadow", 20)
    (breach,) = feed(g, "enforce", 20, error=True)
    assert "upstream errors" in breach


def test_slower_enforced_group_trips_on_latency():
    g = Guardrails(SETTINGS)
    feed(g, "shadow", 20, latency=1.0)
    (breach,) = feed(g, "enforce", 20, latency=2.0)
    assert "latency" in breach


def test_observe_traffic_is_not_judged_and_reset_forgets():
    g = Guardrails(SETTINGS)
    assert feed(g, "observe", 50, error=True) == [] and g.status() == {}
    feed(g, "shadow", 20, same=False)
    g.reset("*")
    assert g.status() == {}
