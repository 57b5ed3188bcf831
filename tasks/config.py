"""Pure logic: the configuration model (DESIGN.md's contract) and its loader.

Secrets never live here: AWS credentials come from boto3's chain, the client-side encryption
key and the TSIG key from environment variables the config names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Node(_Strict):
    name: str = "primary"
    dsn: str = Field(description="libpq connection string; no password (use .pgpass or PGPASSWORD)")
    pgdata: str | None = Field(
        default=None, description="the node's data directory, when it is on the host reading this config"
    )
    dns_value: str | None = None
    work_pool: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
        description=(
            "Prefect process work pool whose worker runs on this node's host: node-local steps "
            "(fence by stopping, rebuild, start/stop) run there as `node-step/<work_pool>` runs "
            "when this config has no pgdata for the node"
        ),
    )

    @field_validator("dsn")
    @classmethod
    def _dsn_parses(cls, value: str) -> str:
        from psycopg import conninfo

        try:
            conninfo.conninfo_to_dict(value)
        except Exception as exc:  # psycopg.ProgrammingError
            raise ValueError("not a valid libpq connection string") from exc
        return value


class RepositoryConfig(_Strict):
    url: str = Field(description="s3://bucket/prefix or file:///path")
    endpoint_url: str | None = None
    region: str | None = None
    storage_class: str | None = None
    sse: Literal["AES256", "aws:kms"] | None = None
    kms_key_id: str | None = None
    compression: Literal["zstd", "lz4", "gzip", "none"] = "zstd"
    compression_level: Annotated[int, Field(ge=1, le=19)] | None = None
    encryption_key_env: str | None = None
    part_size_mb: Annotated[int, Field(ge=5, le=512)] = 16
    upload_concurrency: Annotated[int, Field(ge=1, le=32)] = 4

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: str) -> str:
        if not (value.startswith("s3://") or value.startswith("file://")):
            raise ValueError("must start with s3:// or file://")
        if value.startswith("s3://") and len(value) <= len("s3://"):
            raise ValueError("s3 url needs a bucket")
        return value


class RetentionConfig(_Strict):
    full_days: Annotated[int, Field(ge=0)] = 30
    min_full: Annotated[int, Field(ge=1)] = 2
    # Before counting a backup toward min_full, expire re-reads it in full ("content"), or only
    # checks that its objects are there with their sizes ("size"). Every backup gets the size check.
    verify: Literal["content", "size"] = "content"
    # Leftovers of killed or failed runs (open multipart uploads, temporary files, backup folders
    # without a manifest) are swept by expire once this old; a running backup holds the lock.
    incomplete_grace_hours: Annotated[float, Field(ge=0)] = 24
    # Node-step outcomes (node-steps/<flow-run id>.json) are deleted once this old (by the time
    # their step recorded them). An orchestrator reads one as soon as its run ends, and waits at most
    # node_steps.timeout_seconds (at most 1 day): the 1-day floor keeps every one it could still read.
    node_step_days: Annotated[float, Field(ge=1, le=3650)] = 7


class DNSConfig(_Strict):
    provider: Literal["route53", "rfc2136", "none"] = "none"
    record: str | None = None
    ttl: Annotated[int, Field(ge=1, le=86400)] = 30
    zone_id: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    server: str | None = None
    port: Annotated[int, Field(ge=1, le=65535)] = 53
    zone: str | None = None
    key_name: str | None = None
    key_env: str | None = None
    key_algorithm: str = "hmac-sha256"


class MetricsConfig(_Strict):
    pushgateway: str | None = None


class DrillConfig(_Strict):
    suites_dir: str | None = Field(
        default=None, description="directory of user expectation suites (*.yaml); relative to the config file"
    )
    row_count_tolerance: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            description="only where counts cannot be compared exactly at the LSN they were read at",
        ),
    ] = 0.01
    freshness_max_seconds: Annotated[
        int,
        Field(
            ge=0,
            description=(
                "where not compared exactly: how much older than the source's newest timestamp "
                "the copy's may be (backups without recorded timestamps: age before the recovered "
                "point)"
            ),
        ),
    ] = 86400
    freshness_columns: list[str] | None = Field(
        default=None,
        description="schema.table.column timestamps whose newest value must be recent; default: all",
    )
    work_dir: str | None = Field(default=None, description="parent of the drill's temporary directory")
    superuser: str | None = Field(
        default=None,
        description="role the drill connects as to the restored instance (default: the DSN's user)",
    )
    amcheck_jobs: Annotated[int, Field(ge=1, le=32)] = 2
    heapallindexed_max_mb: Annotated[int, Field(ge=0)] | None = Field(
        default=1024,
        description=(
            "amcheck's heapallindexed pass (one core, about 6 s per GiB of heap) runs for the indexes "
            "of tables up to this size; larger tables' indexes get the structure check; "
            "null: every index"
        ),
    )
    recovery_timeout_seconds: Annotated[int, Field(ge=10)] = 6 * 3600


class KubernetesHook(_Strict):
    namespace: str
    deployments: list[str]
    kubeconfig: str | None = None  # default: in-cluster service account, else ~/.kube/config
    context: str | None = None
    wait: bool = True  # wait for the rollout to finish (within the hook's timeout)


class ReconnectHook(_Strict):
    command: list[str] | None = None
    webhook: str | None = None
    kubernetes: KubernetesHook | None = None
    timeout: Annotated[float, Field(gt=0, le=3600)] = 60

    @model_validator(mode="after")
    def _exactly_one(self) -> ReconnectHook:
        kinds = [k for k in ("command", "webhook", "kubernetes") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError("each reconnect hook needs exactly one of command, webhook, kubernetes")
        return self


class PostgresConfig(_Strict):
    bindir: str = "auto"
    os_user: str = "postgres"
    config_dir: str | None = Field(
        default=None,
        description=(
            "where the source keeps postgresql.conf / pg_hba.conf when they are outside PGDATA "
            "(Debian: /etc/postgresql/<version>/<cluster>); a restored server gets its own copy"
        ),
    )


class BackupConfig(_Strict):
    databases: Literal["all"] | list[str] = Field(
        default="all", description="databases a logical backup dumps: all (every connectable one) or names"
    )
    lock_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=30,
        description="lock_timeout of every statement on the source, and pg_dump --lock-wait-timeout",
    )
    statement_timeout_seconds: Annotated[float, Field(gt=0)] = Field(
        default=6 * 3600, description="statement_timeout of gravl-dr's own queries on the source (row counts)"
    )
    inactivity_timeout_seconds: Annotated[float, Field(gt=0)] = Field(
        default=600, description="a backup stream that sends nothing for this long is aborted"
    )
    max_rate_kb: Annotated[int, Field(ge=32, le=1048576)] | None = Field(
        default=None, description="physical backups: server-side rate limit in kB/s (BASE_BACKUP MAX_RATE)"
    )
    jobs: Annotated[int, Field(ge=1, le=32)] = Field(
        default=2, description="logical backups: databases dumped at the same time"
    )

    @field_validator("databases")
    @classmethod
    def _names(cls, value: Literal["all"] | list[str]) -> Literal["all"] | list[str]:
        if isinstance(value, list) and (not value or any(not n for n in value)):
            raise ValueError("a list of database names, or 'all'")
        return value


class NodeStepsConfig(_Strict):
    pickup_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=60, description="a node step no worker of the node's pool picked up by then is withdrawn"
    )
    observe_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=30, description="the same for reading a node's data directory while planning (an RTO cost)"
    )
    timeout_seconds: Annotated[float, Field(gt=0, le=86400)] = Field(
        default=3600, description="a node step still running after this is reported as unknown, not success"
    )
    worker_lost_seconds: Annotated[float, Field(gt=0, le=86400)] = Field(
        default=90,
        description="a node step whose work pool has had no worker heartbeat for this long (or no ONLINE "
        "worker) is given up as unknown and its run marked Crashed: 3 of Prefect's default 30 s heartbeats",
    )


class Config(_Strict):
    cluster: str = Field(default="gravl", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    primary: Node
    replicas: list[Node] = []
    repository: RepositoryConfig
    retention: RetentionConfig = RetentionConfig()
    dns: DNSConfig = DNSConfig()
    metrics: MetricsConfig = MetricsConfig()
    drill: DrillConfig = DrillConfig()
    reconnect: list[ReconnectHook] = []
    postgres: PostgresConfig = PostgresConfig()
    backup: BackupConfig = BackupConfig()
    node_steps: NodeStepsConfig = NodeStepsConfig()


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{where}'"
    if kind == "missing":
        return f"missing key '{where}'"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"invalid value for '{where}': {first['msg']}{more}"


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate a mapping into a Config, or raise ConfigError naming the offending key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None


def config_path(explicit: str | None) -> Path:
    """--config, then $GRAVL_DR_CONFIG, then ./gravl-dr.yaml."""
    return Path(explicit or os.environ.get("GRAVL_DR_CONFIG") or "gravl-dr.yaml")


def load_config(explicit: str | None = None) -> Config:
    path = config_path(explicit)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    return parse_config(data, str(path))
