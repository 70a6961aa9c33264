"""Worker addresses in the transfer parameters (kvtransfer.params)."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import pytest

from kvtransfer.params import own_host, parse_addresses


def test_addresses_arrive_as_json_lists_and_become_tuples() -> None:
    value = [["10.0.0.1", 5000], ("10.0.1.1", 5001)]
    assert parse_addresses(value) == [("10.0.0.1", 5000), ("10.0.1.1", 5001)]


@pytest.mark.parametrize(
    "value",
    [None, [], "10.0.0.1:5000", ["10.0.0.1", 5000], [["10.0.0.1"]], [["10.0.0.1", 5000, 1]],
     [["", 5000]], [[None, 5000]], [["10.0.0.1", 0]], [["10.0.0.1", 65536]],
     [["10.0.0.1", True]], [["10.0.0.1", "5000"]], [["10.0.0.1", 5000.0]]],
    ids=repr,
)
def test_malformed_addresses_are_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_addresses(value)


def fake_ray(initialized: bool, node_ip: str) -> SimpleNamespace:
    return SimpleNamespace(is_initialized=lambda: initialized,
                           util=SimpleNamespace(get_node_ip_address=lambda: node_ip))


def test_a_worker_outside_ray_binds_the_configured_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert own_host("10.0.0.1") == "10.0.0.1"
    assert "ray" not in sys.modules  # never imported to find out
    monkeypatch.setitem(sys.modules, "ray", fake_ray(False, "10.0.9.9"))
    assert own_host("10.0.0.1") == "10.0.0.1"


def test_a_ray_executor_worker_binds_its_own_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", fake_ray(True, "10.0.1.1"))
    assert own_host("10.0.0.1") == "10.0.1.1"
