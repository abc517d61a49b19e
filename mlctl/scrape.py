"""Reading a Prometheus text endpoint back, with prometheus-client's own parser: for tests, the
monitoring docs and tools that check a run's metrics from outside."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = list[tuple[dict[str, str], float]]


def scrape(url: str, timeout: float = 5.0) -> dict[str, Samples]:
    """GET a Prometheus text endpoint and parse it with prometheus-client's parser.

    Returns ``{name: [(labels, value), ...]}`` keyed by every exposed sample name
    (``mlctl_train_steps_total``, ``mlctl_train_step_seconds_bucket``, ...). A histogram's base
    name (``mlctl_train_step_seconds``) maps to its ``_count`` samples, so a check for a name or for
    its growth works the same for every metric type.
    """
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode("utf-8")
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, Samples]:
    """The parsing half of :func:`scrape`."""
    out: dict[str, Samples] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
        if family.type in ("histogram", "summary"):
            out[family.name] = list(out.get(family.name + "_count", []))
    return out
