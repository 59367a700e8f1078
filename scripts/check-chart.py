#!/usr/bin/env python3
"""Checks the Helm chart (helm/herald) and the compose file (deploy/compose.yaml) offline.

No helm binary and no cluster: `helm-python-sdk` embeds Helm's Go SDK and renders and lints the
chart; `kubernetes-validate --strict` validates the rendered manifests against a pinned
Kubernetes version. Both are installed into .tools/python (git-ignored) when missing.

For the default values and every override set in helm/herald/ci/<name>-values.yaml it:
  - lints strictly (warnings fail);
  - renders, and validates every manifest with kubernetes-validate --strict;
  - checks the custom resources' key fields itself (ServiceMonitor, PrometheusRule, ScaledObject),
    which kubernetes-validate only warns about;
  - checks the three Deployments: one image, each role's command, the ports (DESIGN's defaults),
    probes, grace period above shutdown_timeout_seconds, hardening, the TOML config they read,
    and that every Secret, ConfigMap and Service port they name exists or was asked for;
  - checks that every value in values.yaml has a comment, that the config checksum changes
    with the config (pods roll), that impossible values are refused with a message, and that
    the chart has no dependencies;
  - checks deploy/nats/values.yaml (3 servers, JetStream file storage, sync_interval always).
Then it checks deploy/compose.yaml (ports, commands, Prometheus targets, Grafana provisioning)
and deploy/Dockerfile against the same defaults.

Every failure is printed; the exit code is 1 when anything failed.
Usage: scripts/check-chart.py
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "herald"
DEPLOY = ROOT / "deploy"
TOOLS = ROOT / ".tools" / "python"

HELM_SDK = "helm-python-sdk==0.2.2"
KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"
PYYAML = "pyyaml==6.0.4"
# The Kubernetes version the manifests are validated (and linted) against.
KUBE_VERSION = "1.33.0"

RELEASE = "herald"
NAMESPACE = "herald"

ROLES = ("ingest", "processor", "activator")
# DESIGN.md "Defaults a user can rely on".
PORTS = {
    "ingest": {"http": 8080, "grpc": 50051, "admin": 9091},
    "processor": {"http": 8081, "grpc": 50052, "admin": 9092},
    "activator": {"grpc": 50053, "admin": 9093},
}
CONFIG_KEYS = {"http": "http_addr", "grpc": "grpc_addr", "admin": "admin_addr"}
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS = 10


def ensure_tools() -> None:
    """Makes helm_python, kubernetes_validate and yaml importable, installing them when missing."""
    sys.path.insert(0, str(TOOLS))
    try:
        import helm_python  # noqa: F401
        import kubernetes_validate  # noqa: F401
        import yaml  # noqa: F401

        if importlib.metadata.version("helm-python-sdk") == HELM_SDK.split("==")[1]:
            return
    except ImportError:
        pass
    print(f"installing {HELM_SDK}, {KUBERNETES_VALIDATE} into {TOOLS}", file=sys.stderr)
    TOOLS.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--upgrade", "--target", str(TOOLS), HELM_SDK, KUBERNETES_VALIDATE, PYYAML],
        check=True,
    )
    importlib.invalidate_caches()


class Checker:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.context = ""

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.failures.append(f"[{self.context}] {message}" if self.context else message)
        return ok


def herald_metric_names() -> set[str]:
    """Every metric name the services' source mentions (the ones alerts and KEDA may query)."""
    names: set[str] = set()
    for path in (ROOT / "services").glob("*/src/**/*.rs"):
        names.update(re.findall(r'"(herald_[a-z0-9_]+)"', path.read_text()))
    return names


def load_docs(rendered: dict[str, str]) -> list[dict]:
    import yaml

    docs = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__source"] = path
                docs.append(doc)
    return docs


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def check_set(c: Checker, name: str, values: dict, docs: list[dict], metrics: set[str]) -> None:
    full = RELEASE  # the release name contains "herald": resources are named herald-<role>
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    configmaps = by_kind(docs, "ConfigMap")
    secrets = by_kind(docs, "Secret")
    get = lambda d, *ks, default=None: _dig(d, ks, default)  # noqa: E731

    c.check(sorted(deployments) == sorted(f"{full}-{r}" for r in ROLES),
            f"Deployments are {sorted(deployments)}, expected one per role {ROLES}")
    images = {get(d, "spec", "template", "spec", "containers", 0, "image") for d in deployments.values()}
    c.check(len(images) == 1, f"the Deployments run different images: {sorted(map(str, images))}")

    # The config every Deployment mounts.
    cm = configmaps.get(f"{full}-config")
    config: dict = {}
    if c.check(cm is not None, f"no ConfigMap {full}-config"):
        try:
            config = tomllib.loads(cm["data"]["herald.toml"])
        except (KeyError, tomllib.TOMLDecodeError) as e:
            c.check(False, f"ConfigMap {full}-config: herald.toml does not parse as TOML: {e}")
    nats_url = get(values, "nats", "url", default="nats://nats:4222")
    c.check(get(config, "nats", "servers") == nats_url,
            f"config nats.servers is {get(config, 'nats', 'servers')!r}, values say {nats_url!r}")
    declared_secrets = set(secrets)
    for key in (("controlToken",), ("nats", "auth"), ("nats", "tls")):
        if get(values, *key, "existingSecret"):
            declared_secrets.add(get(values, *key, "existingSecret"))

    for role in ROLES:
        dep = deployments.get(f"{full}-{role}")
        if dep is None:
            continue
        pod = dep["spec"]["template"]["spec"]
        ctr = pod["containers"][0]
        where = f"Deployment {full}-{role}"
        c.check(ctr.get("command") == ["herald", role],
                f"{where}: command is {ctr.get('command')}, expected ['herald', '{role}']")
        want_args = ["--config", "/etc/herald/herald.toml"]
        threads = get(values, role, "workerThreads", default="")
        if threads not in ("", None):
            want_args += ["--worker-threads", str(threads)]
        c.check(ctr.get("args") == want_args,
                f"{where}: args are {ctr.get('args')}, expected {' '.join(want_args)}")
        mounts = {m["name"]: m for m in (ctr.get("volumeMounts") or [])}
        volumes = {v["name"]: v for v in (pod.get("volumes") or [])}
        c.check(get(mounts, "config", "mountPath") == "/etc/herald"
                and get(volumes, "config", "configMap", "name") == f"{full}-config",
                f"{where}: ConfigMap {full}-config is not mounted at /etc/herald")
        checksum = get(dep, "spec", "template", "metadata", "annotations", "checksum/config", default="")
        c.check(re.fullmatch(r"[0-9a-f]{64}", str(checksum)) is not None,
                f"{where}: no checksum/config annotation")
        # Ports: container, config and DESIGN's defaults agree.
        want = PORTS[role]
        got = {p["name"]: p["containerPort"] for p in ctr.get("ports", [])}
        c.check(got == want, f"{where}: container ports {got}, expected {want}")
        for port_name, port in want.items():
            addr = get(config, role, CONFIG_KEYS[port_name])
            c.check(addr == f"0.0.0.0:{port}",
                    f"config {role}.{CONFIG_KEYS[port_name]} is {addr!r}, expected '0.0.0.0:{port}'")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            hg = get(ctr, probe, "httpGet", default={})
            c.check(hg.get("path") == path and hg.get("port") in ("admin", want["admin"]),
                    f"{where}: {probe} is {hg}, expected {path} on the admin port")
        shutdown = get(config, role, "shutdown_timeout_seconds", default=DEFAULT_SHUTDOWN_TIMEOUT_SECONDS)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        c.check(grace > shutdown, f"{where}: terminationGracePeriodSeconds {grace} is not above "
                f"{role}.shutdown_timeout_seconds {shutdown}")
        # Hardening.
        psc, csc = pod.get("securityContext", {}), ctr.get("securityContext", {})
        c.check(psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True, f"{where}: not runAsNonRoot")
        c.check(csc.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem not read-only")
        c.check(csc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation allowed")
        c.check(get(csc, "capabilities", "drop") == ["ALL"], f"{where}: capabilities not all dropped")
        c.check(get(csc, "seccompProfile", "type") == "RuntimeDefault"
                or get(psc, "seccompProfile", "type") == "RuntimeDefault", f"{where}: no seccomp RuntimeDefault")
        # Every Secret the pod names exists (rendered, or an existingSecret the values name).
        named = {get(v, "secret", "secretName") for v in volumes.values() if "secret" in v}
        named |= {get(e, "valueFrom", "secretKeyRef", "name") for e in (ctr.get("env") or [])
                  if get(e, "valueFrom", "secretKeyRef")}
        for secret in sorted(filter(None, named)):
            c.check(secret in declared_secrets, f"{where}: names Secret {secret}, which neither the chart "
                    "renders nor the values name as an existingSecret")
        # The files the config points at are mounted.
        for key in ("creds_file", "tls_ca_file", "tls_cert_file", "tls_key_file"):
            if path := get(config, "nats", key):
                c.check(any(path.startswith(m["mountPath"] + "/") for m in mounts.values()),
                        f"{where}: config nats.{key} = {path} is not in a mounted volume")
        token_file = get(config, "control", "token_file", default="")
        c.check(any(token_file.startswith(m["mountPath"] + "/") and "secret" in volumes.get(n, {})
                    for n, m in mounts.items()),
                f"{where}: control.token_file {token_file!r} is not in a mounted Secret")
        # Service with gRPC and admin (and the processor's profile API).
        svc = services.get(f"{full}-{role}")
        if c.check(svc is not None, f"no Service {full}-{role}"):
            sp = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
            expect = {n: (p, n) for n, p in want.items() if not (role == "ingest" and n == "http")}
            c.check(sp == expect, f"Service {full}-{role}: ports {sp}, expected {expect}")
            c.check(svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items(),
                    f"Service {full}-{role}: selector does not match the {role} pods")
        pdb = by_kind(docs, "PodDisruptionBudget").get(f"{full}-{role}")
        if get(values, role, "pdb", "enabled", default=True):
            c.check(pdb is not None and pdb["spec"]["selector"]["matchLabels"].items()
                    <= dep["spec"]["template"]["metadata"]["labels"].items(),
                    f"no PodDisruptionBudget selecting the {role} pods")
        hpa = by_kind(docs, "HorizontalPodAutoscaler").get(f"{full}-{role}")
        if get(values, role, "hpa", "enabled"):
            c.check(hpa is not None and hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"],
                    f"hpa enabled for {role} but no HorizontalPodAutoscaler targets its Deployment")
            c.check("replicas" not in dep["spec"], f"{where}: sets replicas while autoscaled")
        else:
            c.check(hpa is None, f"HorizontalPodAutoscaler for {role} without hpa.enabled")

    http = services.get(f"{full}-ingest-http")
    if c.check(http is not None, f"no Service {full}-ingest-http"):
        ports = {p["name"]: (p["port"], p["targetPort"]) for p in http["spec"]["ports"]}
        c.check(ports == {"http": (8080, "http")}, f"Service {full}-ingest-http: ports {ports}")

    if get(values, "controlToken", "existingSecret"):
        c.check(f"{full}-control-token" not in secrets, "a control token Secret is rendered with existingSecret")
    else:
        c.check(get(secrets, f"{full}-control-token", "data", "token") is not None,
                f"no Secret {full}-control-token with key token")

    for ing in by_kind(docs, "Ingress").values():
        for rule in ing["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                backend = p["backend"]["service"]
                c.check(backend["name"] == f"{full}-ingest-http" and backend["port"].get("name") == "http",
                        f"Ingress {ing['metadata']['name']}: backend {backend} is not ingest's HTTP Service")
    c.check(bool(by_kind(docs, "Ingress")) == bool(get(values, "ingress", "enabled")),
            "an Ingress is rendered exactly when ingress.enabled")

    for np in by_kind(docs, "NetworkPolicy").values():
        role = np["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
        for rule in np["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                c.check(p["port"] in PORTS.get(role, {}),
                        f"NetworkPolicy {np['metadata']['name']}: port {p['port']} is not a {role} port")

    # The helm test pod reaches each service's admin port.
    tests = [d for d in docs if d.get("kind") == "Pod"
             and get(d, "metadata", "annotations", "helm.sh/hook") == "test"]
    if c.check(len(tests) == 1, f"expected one `helm test` pod, found {len(tests)}"):
        script = " ".join(tests[0]["spec"]["containers"][0]["command"])
        for role in ROLES:
            url = f"http://{full}-{role}:{PORTS[role]['admin']}/readyz"
            c.check(url in script, f"the helm test pod does not check {url}")

    check_custom_resources(c, values, docs, services, deployments, metrics)


def check_custom_resources(c, values, docs, services, deployments, metrics) -> None:
    get = lambda d, *ks, default=None: _dig(d, ks, default)  # noqa: E731
    # ServiceMonitor: monitoring.coreos.com/v1, selects the three role Services, scrapes "admin".
    sms = [d for d in docs if d.get("kind") == "ServiceMonitor"]
    c.check(bool(sms) == bool(get(values, "metrics", "serviceMonitor", "enabled")),
            "a ServiceMonitor is rendered exactly when metrics.serviceMonitor.enabled")
    for sm in sms:
        where = f"ServiceMonitor {sm['metadata']['name']}"
        c.check(sm.get("apiVersion") == "monitoring.coreos.com/v1", f"{where}: apiVersion {sm.get('apiVersion')}")
        sel = get(sm, "spec", "selector", "matchLabels", default={})
        picked = sorted(n for n, s in services.items() if sel and sel.items() <= s["metadata"]["labels"].items())
        c.check(picked == sorted(f"{RELEASE}-{r}" for r in ROLES),
                f"{where}: selects Services {picked}, expected the three role Services")
        eps = get(sm, "spec", "endpoints", default=[])
        c.check(bool(eps), f"{where}: no endpoints")
        for ep in eps:
            c.check(ep.get("port") == "admin" and ep.get("path", "/metrics") == "/metrics",
                    f"{where}: endpoint {ep} does not scrape the admin port's /metrics")
            for key in ("interval", "scrapeTimeout"):
                if key in ep:
                    c.check(re.fullmatch(r"\d+(ms|s|m|h)", str(ep[key])) is not None,
                            f"{where}: {key} {ep[key]!r} is not a duration")
        for picked_name in picked:
            names = {p["name"] for p in services[picked_name]["spec"]["ports"]}
            c.check("admin" in names, f"{where}: Service {picked_name} has no port named admin")
    # PrometheusRule: groups of rules with alert, expr, for, a severity; the rules of deploy/prometheus/rules.yml.
    prs = [d for d in docs if d.get("kind") == "PrometheusRule"]
    c.check(bool(prs) == bool(get(values, "metrics", "prometheusRule", "enabled")),
            "a PrometheusRule is rendered exactly when metrics.prometheusRule.enabled")
    for pr in prs:
        where = f"PrometheusRule {pr['metadata']['name']}"
        c.check(pr.get("apiVersion") == "monitoring.coreos.com/v1", f"{where}: apiVersion {pr.get('apiVersion')}")
        alerts = {}
        for group in get(pr, "spec", "groups", default=[]):
            c.check(bool(group.get("name")) and bool(group.get("rules")), f"{where}: a group without name or rules")
            for rule in group.get("rules", []):
                alerts[rule.get("alert")] = rule
                c.check(bool(rule.get("alert")) and bool(str(rule.get("expr", "")).strip()),
                        f"{where}: rule without alert or expr: {rule}")
                c.check(re.fullmatch(r"\d+(s|m|h)", str(rule.get("for", ""))) is not None,
                        f"{where}: {rule.get('alert')}: 'for' {rule.get('for')!r} is not a duration")
                c.check(get(rule, "labels", "severity") in ("critical", "warning", "info"),
                        f"{where}: {rule.get('alert')}: no severity label")
                c.check(expr_balanced(str(rule.get("expr", ""))), f"{where}: {rule.get('alert')}: unbalanced expr")
        # The metric names the rules use are checked against freshly started services' /metrics
        # by tests/e2e/tests/metrics.rs.
        for required in ("HeraldIngest5xxRate", "HeraldReplicaDown", "HeraldPartitionUnowned"):
            c.check(required in alerts, f"{where}: no alert {required}")
        # One source: the chart embeds helm/herald/files/rules.yml, which
        # deploy/prometheus/rules.yml (what Prometheus in compose loads and promtool tests) is.
        import yaml

        source = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
        c.check(get(pr, "spec", "groups") == source.get("groups"),
                f"{where}: its groups differ from deploy/prometheus/rules.yml (the chart must embed that file)")
        # promtool parses the expressions when it is installed (Debian package prometheus).
        if promtool := shutil.which("promtool"):
            with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
                yaml.safe_dump({"groups": get(pr, "spec", "groups", default=[])}, f)
                f.flush()
                res = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
            c.check(res.returncode == 0, f"{where}: promtool check rules: {res.stdout}{res.stderr}")
    # ScaledObject: keda.sh/v1alpha1, targets a rendered Deployment, a prometheus trigger.
    sos = by_kind(docs, "ScaledObject")
    for role in ("processor", "activator"):
        want = bool(get(values, role, "keda", "enabled"))
        c.check((f"{RELEASE}-{role}" in sos) == want, f"a ScaledObject for {role} is rendered exactly when keda is on")
    for name, so in sos.items():
        where = f"ScaledObject {name}"
        c.check(so.get("apiVersion") == "keda.sh/v1alpha1", f"{where}: apiVersion {so.get('apiVersion')}")
        target = get(so, "spec", "scaleTargetRef", default={})
        c.check(target.get("name") in deployments and target.get("kind", "Deployment") == "Deployment",
                f"{where}: scaleTargetRef {target} is not a rendered Deployment")
        c.check("replicas" not in get(deployments, target.get("name"), "spec", default={}),
                f"{where}: its Deployment sets replicas (KEDA owns them)")
        lo, hi = get(so, "spec", "minReplicaCount"), get(so, "spec", "maxReplicaCount")
        c.check(isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi >= 1,
                f"{where}: minReplicaCount {lo} / maxReplicaCount {hi}")
        triggers = get(so, "spec", "triggers", default=[])
        c.check(len(triggers) >= 1, f"{where}: no triggers")
        for t in triggers:
            md = t.get("metadata", {})
            c.check(t.get("type") == "prometheus", f"{where}: trigger type {t.get('type')}, expected prometheus")
            c.check(re.match(r"https?://", str(md.get("serverAddress", ""))) is not None,
                    f"{where}: serverAddress {md.get('serverAddress')!r}")
            for key in ("query", "threshold"):
                c.check(isinstance(md.get(key), str) and md[key] != "", f"{where}: metadata.{key} must be a non-empty string")
            for key in ("threshold", "activationThreshold"):
                if key in md:
                    c.check(re.fullmatch(r"\d+(\.\d+)?", str(md[key])) is not None, f"{where}: {key} {md[key]!r} is not a number")
            query = str(md.get("query", ""))
            c.check(expr_balanced(query), f"{where}: unbalanced query {query!r}")
            for used in re.findall(r"\bherald_[a-z0-9_]+", query):
                c.check(used in metrics, f"{where}: the query uses {used}, which Herald does not export")
        if name.endswith("-processor"):
            c.check("herald_processor_partition_lag_events" in str(triggers),
                    f"{where}: the processor scales on herald_processor_partition_lag_events")


def expr_balanced(expr: str) -> bool:
    stack = []
    for ch in expr:
        if ch in "([{":
            stack.append(ch)
        elif ch in ")]}":
            if not stack or "([{"[")]}".index(ch)] != stack.pop():
                return False
    return not stack


def _dig(d, keys, default=None):
    for k in keys:
        if isinstance(d, dict) and k in d:
            d = d[k]
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return default
    return d


def check_values_documented(c: Checker) -> None:
    """Every value in values.yaml has a comment: a leaf key needs a comment line right above it,
    unless an ancestor key with a comment holds it as one documented block (e.g. resources)."""
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the open parent keys
    prev = ""
    for n, line in enumerate((CHART / "values.yaml").read_text().splitlines(), 1):
        m = re.match(r"^(\s*)([A-Za-z0-9_.-]+):(.*)$", line)
        if m:
            indent, key, rest = len(m.group(1)), m.group(2), m.group(3).split(" #")[0].strip()
            while stack and stack[-1][0] >= indent:
                stack.pop()
            documented = prev.lstrip().startswith("#")
            covered = any(doc for _, doc in stack)
            if rest and not documented and not covered:
                c.check(False, f"helm/herald/values.yaml:{n}: {key} has no comment")
            if not rest:
                stack.append((indent, documented))
        if line.strip():
            prev = line


def check_refusals(c: Checker) -> None:
    """Values that cannot work are refused at render time with a message saying what to set."""
    import helm_python as helm

    cases = [
        ({"processor": {"hpa": {"enabled": True}, "keda": {"enabled": True}}}, "not both"),
        ({"nats": {"auth": {"method": "userPassword", "user": "herald"}}}, "nats.auth.password is required"),
        ({"nats": {"tls": {"enabled": True}}}, "nats.tls.ca is required"),
        ({"nats": {"auth": {"method": "kerberos"}}}, "method"),
    ]
    for values, expected in cases:
        try:
            with helm.Chart.load(str(CHART)) as chart:
                chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            c.check(False, f"values {values} render, but should be refused ({expected!r})")
        except helm.HelmError as e:
            c.check(expected in str(e), f"values {values} are refused with {e!s:.200}, expected {expected!r}")


def check_chart_metadata(c: Checker) -> None:
    import yaml

    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    c.check(not meta.get("dependencies"), "Chart.yaml has dependencies: NATS is its own release, nothing is fetched")
    c.check(not (CHART / "charts").exists(), "helm/herald/charts/ exists: the chart has no subcharts")
    nats = yaml.safe_load((DEPLOY / "nats" / "values.yaml").read_text())
    cfg = nats.get("config", {})
    c.check(_dig(cfg, ("cluster", "enabled")) is True and _dig(cfg, ("cluster", "replicas")) == 3,
            "deploy/nats/values.yaml: not a 3-server cluster")
    c.check(_dig(cfg, ("jetstream", "enabled")) is True and _dig(cfg, ("jetstream", "fileStore", "enabled")) is True,
            "deploy/nats/values.yaml: JetStream file storage is not enabled")
    c.check(_dig(cfg, ("merge", "jetstream", "sync_interval")) == "always",
            "deploy/nats/values.yaml: jetstream sync_interval is not 'always'")
    c.check(isinstance(_dig(cfg, ("merge", "max_payload")), int), "deploy/nats/values.yaml: no max_payload")


def check_checksum_rolls(c: Checker) -> None:
    """Changing the config changes the pods' checksum/config annotation (a rollout)."""
    import helm_python as helm

    def checksums(values):
        with helm.Chart.load(str(CHART)) as chart:
            docs = load_docs(chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))
        return {n: _dig(d, ("spec", "template", "metadata", "annotations", "checksum/config"))
                for n, d in by_kind(docs, "Deployment").items()}

    before = checksums({})
    after = checksums({"config": {"log": {"filter": "debug"}}})
    c.check(all(before[n] != after.get(n) for n in before),
            "checksum/config does not change when the config changes")


def check_compose(c: Checker, chart_image_roles: dict[str, list[str]]) -> None:
    import yaml

    c.context = "deploy/compose.yaml"
    path = DEPLOY / "compose.yaml"
    try:
        compose = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        c.check(False, f"does not parse: {e}")
        return
    services = compose.get("services", {})
    for needed in ("nats", *ROLES, "prometheus", "grafana"):
        c.check(needed in services, f"no service {needed}")
    nats = services.get("nats", {})
    nats_cmd = " ".join(map(str, _as_list(nats.get("command"))))
    c.check("-js" in nats_cmd.split() or "--jetstream" in nats_cmd, "nats runs without JetStream (-js)")
    images = set()
    for role in ROLES:
        svc = services.get(role)
        if svc is None:
            continue
        images.add(svc.get("image"))
        cmd = _as_list(svc.get("command"))
        c.check(cmd == chart_image_roles[role], f"{role}: command {cmd}, the chart runs {chart_image_roles[role]}")
        env = _env(svc.get("environment"))
        c.check(env.get("HERALD__NATS__SERVERS", "").startswith("nats://nats:4222"),
                f"{role}: HERALD__NATS__SERVERS is {env.get('HERALD__NATS__SERVERS')!r}, expected nats://nats:4222")
        published = {}
        for p in svc.get("ports", []):
            m = re.fullmatch(r"(?:[\d.]+:)?(\d+):(\d+)(?:/tcp)?", str(p))
            if c.check(m is not None, f"{role}: port mapping {p!r} is not HOST:CONTAINER"):
                published[int(m.group(2))] = int(m.group(1))
        for name, port in PORTS[role].items():
            key = f"HERALD__{role.upper()}__{CONFIG_KEYS[name].upper()}"
            c.check(env.get(key) == f"0.0.0.0:{port}", f"{role}: {key} is {env.get(key)!r}, expected '0.0.0.0:{port}'")
            c.check(published.get(port) == port, f"{role}: port {port} ({name}) is not published as {port}:{port}")
        c.check(set(published) <= set(PORTS[role].values()), f"{role}: publishes ports {sorted(published)} "
                f"beyond its own {sorted(PORTS[role].values())}")
    c.check(len(images) == 1 and None not in images, f"the three services run different images: {images}")
    # Prometheus scrapes every admin port.
    prom_cfg = _compose_mount(services.get("prometheus", {}), "/etc/prometheus/prometheus.yml")
    if c.check(prom_cfg is not None and prom_cfg.is_file(), "prometheus: no prometheus.yml mounted from deploy/"):
        cfg = yaml.safe_load(prom_cfg.read_text())
        targets = {t for job in cfg.get("scrape_configs", []) for sc in job.get("static_configs", [])
                   for t in sc.get("targets", [])}
        for role in ROLES:
            c.check(f"{role}:{PORTS[role]['admin']}" in targets, f"prometheus does not scrape {role}:{PORTS[role]['admin']}")
    # Grafana: datasource provisioned, pointing at prometheus; a dashboards provider folder.
    graf = services.get("grafana", {})
    prov = _compose_mount(graf, "/etc/grafana/provisioning")
    if c.check(prov is not None and prov.is_dir(), "grafana: provisioning folder not mounted from deploy/"):
        ds = [yaml.safe_load(p.read_text()) for p in (prov / "datasources").glob("*.y*ml")]
        urls = [d.get("url") for f in ds for d in f.get("datasources", [])]
        c.check("http://prometheus:9090" in urls, f"grafana: no datasource at http://prometheus:9090 ({urls})")
        dash = [yaml.safe_load(p.read_text()) for p in (prov / "dashboards").glob("*.y*ml")]
        folders = [_dig(p, ("options", "path")) for f in dash for p in f.get("providers", [])]
        mounted = [_dig(v, ("target",)) if isinstance(v, dict) else str(v).split(":")[1]
                   for v in graf.get("volumes", [])]
        c.check(any(f in mounted for f in folders), f"grafana: dashboards provider folder {folders} is not mounted")
    c.context = ""


def _as_list(cmd) -> list:
    if cmd is None:
        return []
    return cmd.split() if isinstance(cmd, str) else list(cmd)


def _env(env) -> dict[str, str]:
    if isinstance(env, dict):
        return {k: str(v) for k, v in env.items()}
    return dict(str(e).split("=", 1) for e in env or [])


def _compose_mount(svc: dict, target: str) -> Path | None:
    for v in svc.get("volumes", []):
        src, _, rest = str(v).partition(":")
        if rest.split(":")[0] == target and src.startswith("."):
            return (DEPLOY / src).resolve()
    return None


def check_dockerfile(c: Checker) -> None:
    c.context = "deploy/Dockerfile"
    try:
        text = (DEPLOY / "Dockerfile").read_text()
    except OSError as e:
        c.check(False, str(e))
        return
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    c.check(len(stages) >= 3, f"expected a multi-stage build (dependencies, build, runtime), found {len(stages)} stage(s)")
    c.check(re.search(r"cargo build --release[^\n]*-p herald\b", text) is not None, "no `cargo build --release ... -p herald`")
    c.check(re.search(r"^USER\s+(nonroot|65532)", text, re.M) is not None, "the runtime does not run as a non-root USER")
    c.check("/usr/local/bin/herald" in text, "the binary is not installed as /usr/local/bin/herald (the chart runs `herald`)")
    for role in ROLES:
        for port in PORTS[role].values():
            c.check(re.search(rf"^EXPOSE\b[^\n]*\b{port}\b", text, re.M) is not None, f"port {port} not EXPOSEd")
    c.context = ""


def main() -> int:
    started = time.monotonic()
    ensure_tools()
    import helm_python as helm
    import yaml

    c = Checker()
    metrics = herald_metric_names()
    sets = [("defaults", None)] + [
        (p.name.removesuffix("-values.yaml"), p) for p in sorted((CHART / "ci").glob("*-values.yaml"))
    ]
    for name in ("existing-secrets", "hpa", "keda", "tls", "ingress"):
        c.check(any(n == name for n, _ in sets), f"no override set helm/herald/ci/{name}-values.yaml")
    commands: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="herald-chart-") as tmp:
        manifests = []
        for name, path in sets:
            c.context = f"chart, {name}"
            values = yaml.safe_load(path.read_text()) if path else {}
            try:
                report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE,
                                   kube_version=f"v{KUBE_VERSION}")
            except helm.HelmError as e:
                report = {"errors": [str(e)]}
            for err in report.get("errors", []):
                c.check(False, f"helm lint: {err}")
            for msg in report.get("messages", []):
                c.check(msg.get("severity", 0) < 2, f"helm lint: {msg.get('path')}: {msg.get('error')}")
            try:
                with helm.Chart.load(str(CHART)) as chart:
                    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            except helm.HelmError as e:
                c.check(False, f"render failed: {e}")
                continue
            docs = load_docs(rendered)
            for i, doc in enumerate(docs):
                out = Path(tmp) / f"{name}-{i:03}-{doc['kind']}-{doc['metadata']['name']}.yaml"
                out.write_text(yaml.safe_dump({k: v for k, v in doc.items() if k != "__source"}))
                manifests.append(out)
            c.check(bool(rendered.get("herald/templates/NOTES.txt", "").strip()), "NOTES.txt renders empty")
            check_set(c, name, values, docs, metrics)
            if name == "defaults":
                commands = {r: _dig(d, ("spec", "template", "spec", "containers", 0, "command"))
                            for r in ROLES for n, d in by_kind(docs, "Deployment").items() if n.endswith(f"-{r}")}
        c.context = "kubernetes-validate"
        res = subprocess.run(
            [sys.executable, "-c", "import sys; from kubernetes_validate.__main__ import main; sys.exit(main())",
             "--strict", "--quiet", "--kubernetes-version", KUBE_VERSION, *map(str, manifests)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(TOOLS)},
        )
        for line in (res.stdout + res.stderr).splitlines():
            # Custom resources have no schema there: their fields are checked above.
            if line.strip() and not re.search(r"(ServiceMonitor|PrometheusRule|ScaledObject).*(no schema|couldn't find|not find)|"
                                              r"WARN.*(ServiceMonitor|PrometheusRule|ScaledObject)", line):
                c.check(res.returncode == 0 and not line.startswith("ERROR"), line)
        c.check(res.returncode == 0, f"kubernetes-validate --strict exited {res.returncode}")
        c.context = ""
    c.context = "chart"
    check_values_documented(c)
    check_chart_metadata(c)
    try:
        check_checksum_rolls(c)
        check_refusals(c)
    except helm.HelmError as e:
        c.check(False, f"render failed: {e}")
    c.context = ""
    check_compose(c, commands or {r: ["herald", r] for r in ROLES})
    check_dockerfile(c)

    elapsed = time.monotonic() - started
    if c.failures:
        print(f"chart checks: {len(c.failures)} failure(s) ({elapsed:.1f} s):", file=sys.stderr)
        for f in c.failures:
            print(f"  FAIL {f}", file=sys.stderr)
        return 1
    print(f"chart checks: {len(sets)} value sets rendered, linted and validated against Kubernetes "
          f"{KUBE_VERSION}; compose and Dockerfile match ({elapsed:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
