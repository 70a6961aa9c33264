"""Read the Prometheus text every Ray node exports (``ray.nodes()`` lists each node's
``MetricsExportPort``), for tests and benchmarks that check or summarize the metrics."""

from __future__ import annotations

import urllib.request

Sample = tuple[str, dict[str, str], float]  # name, labels, value


def scrape() -> list[Sample]:
    """Every sample of every live node's Prometheus endpoint (Ray must be initialized)."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    samples: list[Sample] = []
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            samples += [(s.name, s.labels, s.value) for s in family.samples]
    return samples


def total(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The sum of ``name``'s samples with ``labels``; None when there is none."""
    values = [v for n, lab, v in samples
              if n == name and all(lab.get(k) == want for k, want in labels.items())]
    return sum(values) if values else None
