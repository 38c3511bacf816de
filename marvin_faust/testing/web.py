"""The worker's HTTP side as a client sees it: its views (JSON) and its Prometheus metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def get(url: str, token: str | None = None) -> tuple[int, dict | str]:
    """``(status, body)`` of a GET, the body parsed as JSON when it is JSON; an HTTP error status
    is returned, not raised (a refused connection raises ``OSError``)."""
    return call("GET", url, token)


def delete(url: str, token: str | None = None) -> tuple[int, dict | str]:
    """``(status, body)`` of a DELETE, as :func:`get`."""
    return call("DELETE", url, token)


def call(method: str, url: str, token: str | None = None) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode()
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


def counter(worker_url: str, name: str, **labels: str) -> float:
    """The value of sample ``name`` with ``labels`` on the worker's ``/metrics`` (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = get(f"{worker_url}/metrics")
    assert status == 200, (status, text)
    assert isinstance(text, str)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
