"""DNS switch as compare-and-swap, against moto's Route 53 over HTTP and a real BIND 9 (RFC 2136 + TSIG)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest_failover import RECORD, TSIG_ENV, BindServer, route53_values, wrong_secret

from tasks.config import DNSConfig, Node
from tasks.dns_switch import check_dns_config, node_dns_value, read_record, record_type, switch_record
from tasks.errors import ConfigError, PermanentError, PreconditionFailed


def test_node_value_is_dns_value_else_the_dsn_host() -> None:
    assert node_dns_value(Node(name="a", dsn="host=10.0.0.7 port=5432")) == "10.0.0.7"
    assert node_dns_value(Node(name="a", dsn="host=10.0.0.7", dns_value="db-a.internal.")) == "db-a.internal."
    with pytest.raises(ConfigError, match="set dns_value"):
        node_dns_value(Node(name="a", dsn="host=/var/run/postgresql"))


@pytest.mark.parametrize(
    ("value", "kind"), [("127.0.0.2", "A"), ("::1", "AAAA"), ("db-b.internal.", "CNAME")]
)
def test_record_type(value: str, kind: str) -> None:
    assert record_type(value) == kind


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"provider": "route53", "record": RECORD}, "dns.zone_id"),
        ({"provider": "route53", "zone_id": "Z1"}, "dns.record"),
        (
            {"provider": "rfc2136", "record": RECORD, "server": "127.0.0.1", "zone": "x.", "key_name": "k"},
            "dns.key_env",
        ),
        (
            {
                "provider": "rfc2136",
                "record": RECORD,
                "server": "127.0.0.1",
                "zone": "x.",
                "key_name": "k",
                "key_env": "GRAVL_DR_UNSET_FOR_TEST",
            },
            "GRAVL_DR_UNSET_FOR_TEST is not set",
        ),
    ],
)
def test_incomplete_provider_settings_are_rejected_before_any_call(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check_dns_config(DNSConfig(**fields))


def test_none_provider_changes_nothing() -> None:
    change = switch_record(DNSConfig(provider="none"), expected=["127.0.0.1"], new_value="127.0.0.2")
    assert not change.changed and "none" in change.detail


# ---------------------------------------------------------------------------- Route 53 (moto)


def test_route53_switches_when_the_record_points_at_the_old_primary(route53_dns: dict[str, Any]) -> None:
    change = switch_record(DNSConfig(**route53_dns), expected=["127.0.0.1"], new_value="127.0.0.2")
    assert change.changed and change.before == ["127.0.0.1"] and "INSYNC" in change.detail
    assert route53_values(route53_dns) == ["127.0.0.2"]


def test_route53_repeat_is_a_no_op(route53_dns: dict[str, Any]) -> None:
    conf = DNSConfig(**route53_dns)
    switch_record(conf, expected=["127.0.0.1"], new_value="127.0.0.2")
    again = switch_record(conf, expected=["127.0.0.1"], new_value="127.0.0.2")
    assert not again.changed and "already points" in again.detail


def test_route53_stale_run_cannot_undo_a_newer_switch(route53_dns: dict[str, Any]) -> None:
    # GIVEN the record was moved on to a third node by a newer run
    conf = DNSConfig(**route53_dns)
    switch_record(conf, expected=["127.0.0.1"], new_value="127.0.0.3")
    # WHEN a stale run tries to move it from the original primary
    with pytest.raises(PreconditionFailed, match="not at the old primary"):
        switch_record(conf, expected=["127.0.0.1"], new_value="127.0.0.2")
    # THEN it is untouched
    assert route53_values(route53_dns) == ["127.0.0.3"]


def test_route53_missing_record_is_refused(route53_dns: dict[str, Any]) -> None:
    conf = DNSConfig(**{**route53_dns, "record": "nothing-here.gravl.internal."})
    with pytest.raises(PreconditionFailed, match="does not exist"):
        switch_record(conf, expected=["127.0.0.1"], new_value="127.0.0.2")


def test_route53_unknown_zone_is_a_permanent_error(route53_dns: dict[str, Any]) -> None:
    conf = DNSConfig(**{**route53_dns, "zone_id": "/hostedzone/ZNOSUCHZONE"})
    with pytest.raises(PermanentError, match="ZNOSUCHZONE"):
        read_record(conf)


# ---------------------------------------------------------------------------- BIND 9 (RFC 2136)


def test_bind_switch_uses_a_present_prerequisite(bind_server: BindServer, bind_dns: dict[str, Any]) -> None:
    change = switch_record(DNSConfig(**bind_dns), expected=["127.0.0.1"], new_value="127.0.0.2")
    assert change.changed and "present 127.0.0.1" in change.detail
    assert bind_server.query() == ["127.0.0.2"]


def test_bind_repeat_is_a_no_op(bind_server: BindServer, bind_dns: dict[str, Any]) -> None:
    conf = DNSConfig(**bind_dns)
    switch_record(conf, expected=["127.0.0.1"], new_value="127.0.0.2")
    assert not switch_record(conf, expected=["127.0.0.1"], new_value="127.0.0.2").changed


def test_bind_stale_run_cannot_undo_a_newer_switch(bind_server: BindServer, bind_dns: dict[str, Any]) -> None:
    bind_server.set_record("127.0.0.3")
    with pytest.raises(PreconditionFailed, match="not at the old primary"):
        switch_record(DNSConfig(**bind_dns), expected=["127.0.0.1"], new_value="127.0.0.2")
    assert bind_server.query() == ["127.0.0.3"]


def test_bind_rejects_a_wrong_tsig_key_without_leaking_it(
    bind_server: BindServer,
    bind_dns: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = wrong_secret()
    monkeypatch.setenv(TSIG_ENV, secret)
    with pytest.raises(PermanentError, match="rejected TSIG key") as err:
        switch_record(DNSConfig(**bind_dns), expected=["127.0.0.1"], new_value="127.0.0.2")
    assert secret not in str(err.value) and bind_server.secret not in str(err.value)
    assert bind_server.query() == ["127.0.0.1"]
