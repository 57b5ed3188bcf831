"""Adapter: moving the database's DNS record to a new primary — Route 53, RFC 2136 (TSIG), or none.

Every switch checks first: the record changes only while it still points at one of the
``expected`` old values, so a stale or repeated run cannot undo a newer switch. Route 53 has no
conditional write, so it is read-then-UPSERT — not atomic: a change made by someone else between
the two calls is overwritten (a DELETE+CREATE batch naming the old value would make it atomic, but
moto, which the tests run against, does not check a DELETE against the live record);
RFC 2136 sends the old value as a ``present`` prerequisite (RFC 2136 §2.4.2), which the server
checks atomically with the update. The TSIG secret is read from the environment variable the
config names and never logged.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.config import DNSConfig, Node
from tasks.errors import (
    ConfigError,
    PermanentError,
    PreconditionFailed,
    TransientError,
    botocore_transient,
    classify_aws,
)
from tasks.polling import Progress, poll_until
from tasks.postgres import dsn_field

log = logging.getLogger(__name__)


class DNSChange(BaseModel):
    model_config = ConfigDict(frozen=True)

    provider: str
    record: str | None
    before: list[str]  # what the record held when we looked
    value: str | None  # what it holds now
    changed: bool
    seconds: float
    detail: str


def node_dns_value(node: Node) -> str:
    """The record's value for a node: its ``dns_value``, else the host of its DSN."""
    value = node.dns_value or dsn_field(node.dsn, "host") or dsn_field(node.dsn, "hostaddr")
    if not value or value.startswith("/"):
        raise ConfigError(f"node {node.name}: set dns_value (its DSN has no network host)")
    return value


def record_type(value: str) -> str:
    try:
        return "A" if ipaddress.ip_address(value).version == 4 else "AAAA"
    except ValueError:
        return "CNAME"


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


def _norm(value: str) -> str:
    return value.rstrip(".").lower()


def check_dns_config(conf: DNSConfig) -> None:
    """Validate first: every field the provider needs, and the TSIG secret's presence, before acting."""
    if conf.provider == "none":
        return
    if not conf.record:
        raise ConfigError(f"dns.record is required for provider {conf.provider}")
    if conf.provider == "route53" and not conf.zone_id:
        raise ConfigError("dns.zone_id is required for provider route53")
    if conf.provider == "rfc2136":
        for key in ("server", "zone", "key_name", "key_env"):
            if not getattr(conf, key):
                raise ConfigError(f"dns.{key} is required for provider rfc2136")
        if not os.environ.get(conf.key_env or ""):
            raise ConfigError(f"dns.key_env: environment variable {conf.key_env} is not set (TSIG secret)")
        if conf.key_algorithm.lower().rstrip(".") not in ("hmac-sha256", "hmac-sha384", "hmac-sha512"):
            raise ConfigError(f"dns.key_algorithm {conf.key_algorithm} is not supported (use hmac-sha256)")


def read_record(conf: DNSConfig) -> list[str]:
    """Current values of the record (empty when it does not exist)."""
    check_dns_config(conf)
    if conf.provider == "route53":
        return _r53_read(conf)[0]
    if conf.provider == "rfc2136":
        return _rfc_read(conf)
    return []


def switch_record(
    conf: DNSConfig,
    *,
    expected: Sequence[str],
    new_value: str,
    timeout: float = 60,
    poll_interval: float = 0.2,
) -> DNSChange:
    """Point the record at ``new_value`` if it still points at one of ``expected``."""
    check_dns_config(conf)
    t0 = time.monotonic()
    if conf.provider == "none":
        return DNSChange(
            provider="none",
            record=None,
            before=[],
            value=None,
            changed=False,
            seconds=0.0,
            detail="dns.provider is none: clients must find the new primary themselves",
        )
    if conf.provider == "route53":
        return _r53_switch(conf, expected, new_value, timeout, poll_interval, t0)
    return _rfc_switch(conf, expected, new_value, timeout, t0)


def _decide(record: str, current: list[str], expected: Sequence[str], new_value: str) -> bool:
    """True to change, False when it already points at new_value; raises when CAS fails."""
    cur = sorted({_norm(v) for v in current})
    if cur == [_norm(new_value)]:
        return False
    if not cur:
        raise PreconditionFailed(
            f"DNS record {record} does not exist: create it pointing at the primary first; nothing changed"
        )
    if len(cur) == 1 and cur[0] in {_norm(e) for e in expected}:
        return True
    raise PreconditionFailed(
        f"DNS record {record} points at {', '.join(current)}, not at the old primary "
        f"({', '.join(expected)}): not changed — a newer switch may have happened"
    )


# ---------------------------------------------------------------------------- Route 53


def _r53_client(conf: DNSConfig):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client(
        "route53",
        endpoint_url=conf.endpoint_url,
        region_name=conf.region or "us-east-1",
        config=BotoConfig(
            connect_timeout=5, read_timeout=10, retries={"max_attempts": 3, "mode": "standard"}
        ),
    )


def _r53_kind(exc: Any) -> tuple[str, bool]:
    """(code, transient?) of a Route 53 ClientError, by the shared table."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code or str(status), classify_aws(code, status) == "transient"


def _r53_read(conf: DNSConfig) -> tuple[list[str], str | None]:
    from botocore.exceptions import BotoCoreError, ClientError

    name = _fqdn(conf.record or "")
    client = _r53_client(conf)
    try:
        resp = client.list_resource_record_sets(
            HostedZoneId=conf.zone_id or "", StartRecordName=name, MaxItems="10"
        )
    except ClientError as exc:
        code, transient = _r53_kind(exc)
        if transient:
            raise TransientError(f"Route 53 unavailable: {code}") from exc
        raise PermanentError(f"Route 53 zone {conf.zone_id}: {code}") from exc
    except BotoCoreError as exc:
        if botocore_transient(exc):
            raise TransientError(f"Route 53 unreachable: {exc}") from exc
        raise PermanentError(f"Route 53 client: {exc}") from exc
    for rrset in resp.get("ResourceRecordSets", []):
        if _norm(rrset["Name"]) == _norm(name) and rrset["Type"] in ("A", "AAAA", "CNAME"):
            return [r["Value"] for r in rrset.get("ResourceRecords", [])], rrset["Type"]
    return [], None


def _r53_switch(
    conf: DNSConfig, expected: Sequence[str], new_value: str, timeout: float, poll_interval: float, t0: float
) -> DNSChange:
    from botocore.exceptions import BotoCoreError, ClientError

    name = _fqdn(conf.record or "")
    current, _ = _r53_read(conf)
    if not _decide(name, current, expected, new_value):
        return DNSChange(
            provider="route53",
            record=name,
            before=current,
            value=new_value,
            changed=False,
            seconds=time.monotonic() - t0,
            detail=f"{name} already points at {new_value}",
        )
    client = _r53_client(conf)
    try:
        resp = client.change_resource_record_sets(
            HostedZoneId=conf.zone_id or "",
            ChangeBatch={
                "Comment": "gravl-dr failover",
                "Changes": [
                    {
                        "Action": "UPSERT",
                        "ResourceRecordSet": {
                            "Name": name,
                            "Type": record_type(new_value),
                            "TTL": conf.ttl,
                            "ResourceRecords": [{"Value": new_value}],
                        },
                    }
                ],
            },
        )
        change_id = resp["ChangeInfo"]["Id"]
        # The submit's reply first, then GetChange each poll. boto3's waiter polls every 30 s; we
        # poll fast so propagation does not dominate the RTO.
        statuses = itertools.chain(
            [str(resp["ChangeInfo"]["Status"])],
            iter(lambda: str(client.get_change(Id=change_id)["ChangeInfo"]["Status"]), None),
        )
        status = ""
        progress = Progress(f"Route 53 change {change_id} for {name} to be INSYNC", timeout, log)

        def insync() -> bool:
            nonlocal status
            status = next(statuses)
            if status == "INSYNC":
                return True
            progress.tick(f"status {status}")
            return False

        if not poll_until(insync, timeout=timeout - (time.monotonic() - t0), interval=poll_interval):
            raise TransientError(
                f"Route 53 change {change_id} for {name} still {status} after "
                f"{timeout:.0f}s (submitted; it will apply)"
            )
    except ClientError as exc:
        code, transient = _r53_kind(exc)
        if transient:  # throttled or PriorRequestNotComplete: the flow may try again
            raise TransientError(f"Route 53 could not take the change of {name} now: {code}") from exc
        raise PermanentError(f"Route 53 refused the change of {name}: {code}") from exc
    except BotoCoreError as exc:
        if botocore_transient(exc):
            raise TransientError(f"Route 53 unreachable while switching {name}: {exc}") from exc
        raise PermanentError(f"Route 53 client: {exc}") from exc
    return DNSChange(
        provider="route53",
        record=name,
        before=current,
        value=new_value,
        changed=True,
        seconds=time.monotonic() - t0,
        detail=f"{name} {', '.join(current)} -> {new_value} (UPSERT, {change_id} INSYNC)",
    )


# ---------------------------------------------------------------------------- RFC 2136


def _rfc_read(conf: DNSConfig) -> list[str]:
    import dns.exception
    import dns.message
    import dns.query
    import dns.rdatatype

    name = _fqdn(conf.record or "")
    values: list[str] = []
    for rdtype in ("A", "AAAA", "CNAME"):
        query = dns.message.make_query(name, rdtype)
        try:
            resp = dns.query.tcp(query, conf.server or "", port=conf.port, timeout=5)
        except (dns.exception.DNSException, OSError) as exc:
            raise TransientError(f"DNS server {conf.server}:{conf.port} unreachable: {exc}") from exc
        for rrset in resp.answer:
            if rrset.rdtype == dns.rdatatype.from_text(rdtype):
                values += [r.to_text() for r in rrset]
    return values


def _rfc_switch(
    conf: DNSConfig, expected: Sequence[str], new_value: str, timeout: float, t0: float
) -> DNSChange:
    import dns.exception
    import dns.name
    import dns.query
    import dns.rcode
    import dns.tsig
    import dns.tsigkeyring
    import dns.update

    name = _fqdn(conf.record or "")
    current = _rfc_read(conf)
    if not _decide(name, current, expected, new_value):
        return DNSChange(
            provider="rfc2136",
            record=name,
            before=current,
            value=new_value,
            changed=False,
            seconds=time.monotonic() - t0,
            detail=f"{name} already points at {new_value}",
        )
    old = current[0]
    secret = os.environ[conf.key_env or ""]
    try:
        keyring = dns.tsigkeyring.from_text({conf.key_name or "": secret})
    except Exception as exc:  # binascii.Error and friends: the secret is not base64
        raise ConfigError(f"dns.key_env: the value of {conf.key_env} is not a base64 TSIG secret") from exc
    algorithm = dns.name.from_text(conf.key_algorithm.lower().rstrip(".") + ".")
    update = dns.update.UpdateMessage(
        _fqdn(conf.zone or ""),
        keyring=keyring,
        keyname=dns.name.from_text(conf.key_name or ""),
        keyalgorithm=algorithm,
    )
    update.present(name, record_type(old), old)  # compare ...
    update.replace(name, conf.ttl, record_type(new_value), new_value)  # ... and swap, atomically
    try:
        resp = dns.query.tcp(update, conf.server or "", port=conf.port, timeout=min(timeout, 10))
    except (dns.tsig.PeerBadKey, dns.tsig.PeerBadSignature, dns.tsig.PeerBadTime) as exc:
        raise PermanentError(
            f"DNS server {conf.server} rejected TSIG key {conf.key_name}: {type(exc).__name__}"
        ) from exc
    except (dns.exception.DNSException, OSError) as exc:
        raise TransientError(f"DNS update of {name} failed: {type(exc).__name__}: {exc}") from exc
    rcode = resp.rcode()
    if rcode == dns.rcode.NXRRSET:
        now = _rfc_read(conf)
        if sorted(_norm(v) for v in now) == [_norm(new_value)]:
            return DNSChange(
                provider="rfc2136",
                record=name,
                before=current,
                value=new_value,
                changed=False,
                seconds=time.monotonic() - t0,
                detail=f"{name} was switched to {new_value} meanwhile",
            )
        raise PreconditionFailed(
            f"DNS record {name} changed under us (now {', '.join(now) or 'absent'}, "
            f"expected {old}): not changed"
        )
    if rcode != dns.rcode.NOERROR:
        raise PermanentError(
            f"DNS server {conf.server} refused the update of {name}: {dns.rcode.to_text(rcode)}"
        )
    return DNSChange(
        provider="rfc2136",
        record=name,
        before=current,
        value=new_value,
        changed=True,
        seconds=time.monotonic() - t0,
        detail=f"{name} {old} -> {new_value} (RFC 2136 update, prerequisite: present {old})",
    )
