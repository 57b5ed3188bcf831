"""infra/: promtool on the alert rules, metric names the code really pushes, the dashboard,
Kubernetes manifests, PostgreSQL snippets and the IAM policy (no kubectl, no cloud)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gravl_testlib import REPO_ROOT
from tasks.config import parse_config
from tasks.metrics import CATALOG
from tasks.pgcluster import LocalCluster

INFRA = REPO_ROOT / "infra"
PROM = INFRA / "prometheus"
RULES = PROM / "alerts.yml"
RULE_TESTS = [PROM / "alerts_test.yml", PROM / "alerts_test_weekly.yml"]
DASHBOARD = INFRA / "grafana" / "gravl-dr.json"
K8S = INFRA / "kubernetes"
POLICY = INFRA / "iam" / "gravl-dr-policy.json"
METRIC_RE = re.compile(r"\bgravl_[a-z0-9_]+")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool") or "/usr/bin/promtool"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=str(PROM))


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


# ---------------------------------------------------------------- Prometheus rules


@pytest.mark.integration  # starts a process
def test_promtool_check_rules() -> None:
    proc = promtool("check", "rules", RULES.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.integration  # starts a process
def test_promtool_unit_tests_pass() -> None:
    proc = promtool("test", "rules", *[p.name for p in RULE_TESTS])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts - fired == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested staying quiet"


def test_the_documented_alerts_exist() -> None:
    alerts = {r["alert"] for r in rules() if "alert" in r}
    for name in (
        "GravlBackupMissing",
        "GravlBackupSizeDeviation",
        "GravlWalArchiveLag",
        "GravlBackupSlowUpload",
        "GravlReplicationLag",
        "GravlDrillFailed",
        "GravlPrimaryDown",
        "GravlBackupFailed",
    ):
        assert name in alerts
    missing = next(r for r in rules() if r.get("alert") == "GravlBackupMissing")
    assert "26 * 3600" in missing["expr"]


# ---------------------------------------------------------------- metric names


def used_metric_names() -> dict[str, set[str]]:
    """gravl_* names read by the alert/recording rules and by the dashboard, with where."""
    used: dict[str, set[str]] = {}
    for r in rules():
        for name in METRIC_RE.findall(r["expr"]):
            used.setdefault(name, set()).add(f"rule {r.get('alert') or r.get('record')}")
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            for name in METRIC_RE.findall(target["expr"]):
                used.setdefault(name, set()).add(f"panel {panel['title']!r}")
    return used


def test_every_metric_in_rules_and_dashboard_is_in_the_catalog() -> None:
    # the catalog's metrics are the ones the flows can push (push_metrics refuses any other name)
    used = used_metric_names()
    unknown = {name: sorted(where) for name, where in used.items() if name not in CATALOG}
    assert unknown == {}, (
        "metrics outside tasks/metrics.py's catalog (the alert or panel would never show anything)"
    )


def test_every_metric_the_rule_tests_feed_is_in_the_catalog() -> None:
    # a rule test fed a series no flow pushes would test an alert that can never fire that way
    fed = {name for path in RULE_TESTS for name in METRIC_RE.findall(path.read_text())}
    assert sorted(fed - set(CATALOG)) == []


def test_the_rules_and_dashboard_read_the_backup_metrics() -> None:
    assert {
        "gravl_backup_last_success_timestamp_seconds",
        "gravl_backup_stored_bytes",
        "gravl_backup_stream_seconds",
        "gravl_backup_last_failure_timestamp_seconds",
    } <= set(used_metric_names())


# ---------------------------------------------------------------- Grafana


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "gravl-dr"
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "cluster"} <= names
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'cluster="$cluster"' in target["expr"], panel["title"]
            assert target["datasource"]["uid"] == "${datasource}"


# ---------------------------------------------------------------- Kubernetes


def k8s_docs() -> dict[tuple[str, str], dict[str, Any]]:
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path.name
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def test_kubernetes_manifests_parse_and_kustomization_lists_them_all() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    kinds = {kind for kind, _ in k8s_docs()}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Job"} <= kinds


def test_kubernetes_holds_no_secret_values() -> None:
    docs = k8s_docs()
    assert not [k for k in docs if k[0] == "Secret"], "secrets are referenced, never committed"
    text = "\n".join(p.read_text() for p in K8S.glob("*.yaml"))
    assert not re.search(r"(?i)(aws_secret_access_key|password\s*[:=]\s*\S)", text)
    worker = docs[("Deployment", "gravl-dr-worker")]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in worker["containers"][0]["env"]}
    assert env["GRAVL_DR_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "gravl-dr-secrets"


def test_worker_matches_prefect_yaml_and_the_configmap_is_a_valid_config() -> None:
    docs = k8s_docs()
    prefect_yaml = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    worker = docs[("Deployment", "gravl-dr-worker")]["spec"]["template"]["spec"]
    container = worker["containers"][0]
    # (node-step deployments run on each node's own pool: test_node_step_pod_runs_the_node_pools_worker)
    pool = {
        d["work_pool"]["name"]
        for d in prefect_yaml["deployments"]
        if not d["entrypoint"].startswith("flows/node_step.py")
    }
    # the Kubernetes-only values live in the pool's base job template, not in prefect.yaml
    template = json.loads((K8S / "process-pool-template.json").read_text())
    defaults = template["variables"]["properties"]
    config_path = {defaults["env"]["default"]["GRAVL_DR_CONFIG"]}
    assert defaults["working_dir"]["default"] == container["workingDir"]
    # same pool, and the config mounted where the job variables point
    words = " ".join([*container["command"], *container.get("args", [])]).split()
    assert pool == {words[words.index("--pool") + 1]}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert config_path <= mounts
    assert worker["securityContext"]["runAsNonRoot"] is True  # PostgreSQL refuses root
    job = docs[("Job", "gravl-dr-deploy")]["spec"]["template"]["spec"]["containers"][0]
    assert f"work-pool create {pool.pop()} --type process" in job["args"][0]
    assert "--base-job-template /etc/gravl-dr-pool/process-pool-template.json" in job["args"][0]
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["configMapGenerator"] == [
        {"name": "gravl-dr-pool-template", "files": ["process-pool-template.json"]}
    ]
    assert "deploy --all" in job["args"][0]
    # the embedded gravl-dr.yaml is accepted by the real config model
    cfg = parse_config(yaml.safe_load(docs[("ConfigMap", "gravl-dr-config")]["data"]["gravl-dr.yaml"]))
    assert cfg.repository.encryption_key_env in {e["name"] for e in container["env"]}


def test_node_step_pod_runs_the_node_pools_worker_next_to_its_data() -> None:
    # GIVEN the Kubernetes variant of node steps: a worker inside the database node's own pod
    node_dir = K8S / "node-step"
    kust = yaml.safe_load((node_dir / "kustomization.yaml").read_text())
    assert set(kust["resources"]) == {p.name for p in node_dir.glob("*.yaml")} - {"kustomization.yaml"}
    docs = {d["kind"]: d for p in node_dir.glob("*.yaml") for d in yaml.safe_load_all(p.read_text())}
    pod = docs["StatefulSet"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    script = container["args"][0]
    # THEN the guard runs before PostgreSQL, and the worker polls the node's pool
    assert script.index("gravl-dr guard") < script.index("pg_ctl") < script.index("prefect worker start")
    assert '--pool "gravl-dr-node-$NODE"' in script and "--type process" in script
    assert pod["securityContext"]["runAsNonRoot"] is True  # PostgreSQL refuses root
    # AND the node's own config is valid, names this node's pgdata on the mounted volume, and only it
    cfg = parse_config(yaml.safe_load(docs["ConfigMap"]["data"]["gravl-dr.yaml"]))
    mine = [n for n in [cfg.primary, *cfg.replicas] if n.pgdata]
    assert [n.name for n in mine] == [env["NODE"]] and mine[0].pgdata == env["PGDATA"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["PGDATA"].startswith(mounts["data"] + "/")  # old copies kept next to it, same volume
    assert docs["StatefulSet"]["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert docs["ConfigMap"]["metadata"]["name"] in {
        v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v
    }
    # AND prefect.yaml's node-step deployments are each on the pool they are named after
    prefect_yaml = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    nodes = [d for d in prefect_yaml["deployments"] if d["entrypoint"] == "flows/node_step.py:node_step_flow"]
    assert nodes and all(d["name"] == d["work_pool"]["name"] for d in nodes)
    assert all(d["name"].startswith("gravl-dr-node-") for d in nodes)


def test_rbac_allows_exactly_the_configured_rollout_restarts() -> None:
    docs = k8s_docs()
    cfg = parse_config(yaml.safe_load(docs[("ConfigMap", "gravl-dr-config")]["data"]["gravl-dr.yaml"]))
    hooks = [h.kubernetes for h in cfg.reconnect if h.kubernetes is not None]
    role = docs[("Role", "gravl-dr-rollout-restart")]
    binding = docs[("RoleBinding", "gravl-dr-rollout-restart")]
    assert {h.namespace for h in hooks} == {role["metadata"]["namespace"]}
    deployments = sorted({d for h in hooks for d in h.deployments})
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["apps"]
        assert sorted(rule["resourceNames"]) == deployments
        assert set(rule["verbs"]) <= {"get", "patch"}
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "gravl-dr-worker", "namespace": "gravl-dr"}
    ]


# ---------------------------------------------------------------- PostgreSQL snippets


def conf_settings(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if "=" in line:
            name, value = line.split("=", 1)
            out[name.strip()] = value.strip().strip("'")
    return out


def test_postgres_snippets_name_real_settings_and_the_hooks(pg_primary: LocalCluster) -> None:
    import psycopg

    with psycopg.connect(pg_primary.dsn("postgres")) as conn:
        known = {row[0] for row in conn.execute("SELECT name FROM pg_settings")}
    server = conf_settings(INFRA / "postgres" / "gravl-dr.conf")
    recovery = conf_settings(INFRA / "postgres" / "recovery.conf.sample")
    assert set(server) - known == set()
    assert set(recovery) - known == set()
    assert server["archive_command"].endswith("wal-push %p") and server["archive_command"].startswith(
        "gravl-dr"
    )
    assert recovery["restore_command"].endswith("wal-fetch %f %p")
    assert server["wal_log_hints"] == "on" and server["archive_mode"] == "on"
    assert 0 < int(server["archive_timeout"]) <= 60


# ---------------------------------------------------------------- IAM

# Every boto3 client call in tasks/ and the IAM action that authorises it.
BOTO_ACTIONS = {
    "head_bucket": "s3:ListBucket",
    "list_objects_v2": "s3:ListBucket",
    "get_paginator": None,  # resolved by the paginated operation's name
    "list_multipart_uploads": "s3:ListBucketMultipartUploads",
    "list_parts": "s3:ListMultipartUploadParts",  # sizing an abandoned upload before expire aborts it
    "get_object": "s3:GetObject",
    "head_object": "s3:GetObject",
    "put_object": "s3:PutObject",
    "create_multipart_upload": "s3:PutObject",
    "upload_part": "s3:PutObject",
    "complete_multipart_upload": "s3:PutObject",
    "abort_multipart_upload": "s3:AbortMultipartUpload",
    "delete_object": "s3:DeleteObject",
    "change_resource_record_sets": "route53:ChangeResourceRecordSets",
    "list_resource_record_sets": "route53:ListResourceRecordSets",
    "get_change": "route53:GetChange",
}


def test_iam_policy_allows_every_call_the_code_makes_and_nothing_broad() -> None:
    policy = json.loads(POLICY.read_text())
    allowed: set[str] = set()
    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if st["Effect"] == "Allow":
            assert not any(a.endswith("*") for a in actions), st["Sid"]
            assert "*" not in resources, st["Sid"]
            allowed.update(actions)
    calls: set[str] = set()
    for path in REPO_ROOT.glob("tasks/*.py"):
        text = path.read_text()
        calls.update(re.findall(r"client\.([a-z_0-9]+)\(", text))
        calls.update(re.findall(r"get_paginator\(\s*[\"']([a-z_0-9]+)[\"']", text))
    unknown = calls - set(BOTO_ACTIONS)
    assert unknown == set(), "a new boto3 call: add it to BOTO_ACTIONS and the policy"
    needed = {BOTO_ACTIONS[c] for c in calls if BOTO_ACTIONS[c]}
    assert needed - allowed == set()
    assert allowed - needed <= {"kms:GenerateDataKey", "kms:Decrypt"}, "least privilege: nothing unused"
    r53 = [s for s in policy["Statement"] if any(a.startswith("route53:Change") for a in s["Action"])]
    assert [s["Resource"] for s in r53] == ["arn:aws:route53:::hostedzone/Z123"]


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_infra_yaml_parses(path: Path) -> None:
    assert list(yaml.safe_load_all(path.read_text()))
