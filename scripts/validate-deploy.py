"""Offline validation of everything under helm/ and deploy/ (run by
scripts/validate-deploy inside the test virtualenv).

- The chart: `helm lint --strict`, values.schema.json accepting the shipped
  values files and rejecting bad ones, rendered for each values file, every
  object validated strictly against the Kubernetes schemas of each supported
  version, and the chart's own rules (probes, security context, never an HPA
  and a ScaledObject on one Deployment, hooks).
- The kustomize base: every resource it lists, validated the same way.
- The Grafana dashboard and the collector config: well-formed, and they only
  name metrics stampede exports.
"""
import json
import pathlib
import re
import sys

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "stampede"
BASE = ROOT / "deploy" / "kubernetes" / "base"
KUBE_VERSIONS = ["1.28.0", "1.31.0", "1.34.0"]
CUSTOM = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL {msg}")


def validate_objects(where, docs):
    for d in docs:
        kind, name = d.get("kind"), d.get("metadata", {}).get("name")
        if kind in CUSTOM:
            # CRDs: no bundled schema; check the shape we rely on.
            if not (d.get("apiVersion") and name and isinstance(d.get("spec"), dict)):
                fail(f"{where}: {kind} {name} is incomplete")
            continue
        for v in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(d, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{where}: {kind} {name} (k8s {v}): {e.message} at {list(e.path)}")
                break
            except Exception as e:  # noqa: BLE001 - a schema problem is a failure too
                fail(f"{where}: {kind} {name} (k8s {v}): {e}")
                break


def chart_rules(where, docs):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    if len(deployments) != 4:
        fail(f"{where}: expected 4 Deployments, got {sorted(deployments)}")
    hpa_targets = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind.get("HorizontalPodAutoscaler", [])}
    keda_targets = {s["spec"]["scaleTargetRef"]["name"] for s in by_kind.get("ScaledObject", [])}
    if hpa_targets & keda_targets:
        fail(f"{where}: HPA and ScaledObject on the same Deployment: {hpa_targets & keda_targets}")
    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        if not pod.get("securityContext", {}).get("runAsNonRoot"):
            fail(f"{where}: {name} may run as root")
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem") or sc.get("allowPrivilegeEscalation") is not False:
                fail(f"{where}: {name}/{c['name']} security context too loose")
            probe = c.get("readinessProbe", {}).get("grpc", {})
            component = d["metadata"]["labels"]["app.kubernetes.io/component"]
            if probe.get("service") != f"stampede.{component}":
                fail(f"{where}: {name} readiness is not the named gRPC health service")
            if "grpc" not in c.get("livenessProbe", {}):
                fail(f"{where}: {name} has no gRPC liveness probe")
        if name in hpa_targets or name in keda_targets:
            if "replicas" in d["spec"]:
                fail(f"{where}: {name} sets replicas while autoscaled")
    for pdb_name in (p["metadata"]["name"] for p in by_kind.get("PodDisruptionBudget", [])):
        if pdb_name not in deployments:
            fail(f"{where}: PodDisruptionBudget {pdb_name} has no Deployment")
    for j in by_kind.get("Job", []):
        hooks = j["metadata"].get("annotations", {}).get("helm.sh/hook", "")
        if "pre-install" not in hooks or "pre-upgrade" not in hooks:
            fail(f"{where}: migration Job is not a pre-install/pre-upgrade hook")


def shard_triggers(where, values, docs):
    """Delivery's KEDA triggers name every shard of every class."""
    shards = (values.get("config") or {}).get("deliveryShards", 1)
    for d in docs:
        if d.get("kind") != "ScaledObject" or not d["metadata"]["name"].endswith("-delivery"):
            continue
        queues = {
            t["metadata"]["queueName"] for t in d["spec"]["triggers"] if t["type"] == "rabbitmq"
        }
        want = set()
        for c in ("delivery.interactive", "delivery", "delivery.bulk"):
            want.add(f"stampede.{c}")
            want.update(f"stampede.{c}.shard{i}" for i in range(1, shards))
        if queues != want:
            fail(f"{where}: delivery's KEDA queues {sorted(queues)} are not every shard {sorted(want)}")


def render(chart, values, where):
    out = chart.render(values, name="stampede", namespace="federation", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if not path.endswith(".yaml"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    print(f"ok   {where}: rendered {len(docs)} objects")
    return docs


def check_chart():
    report = helm.lint(str(CHART), strict=True)
    for m in report.get("messages", []):
        if m.get("severity", 0) >= 2:
            fail(f"helm lint: {m.get('path')}: {m.get('error')}")
    for e in report.get("errors", []):
        fail(f"helm lint: {e}")
    chart = helm.Chart.load(str(CHART))
    values_files = [None] + sorted((CHART / "ci").glob("*.yaml"))
    for vf in values_files:
        values = yaml.safe_load(vf.read_text()) if vf else {}
        where = f"chart [{vf.name if vf else 'defaults'}]"
        try:
            chart.validate_schema(values)
        except helm.HelmError as e:
            fail(f"{where}: schema rejected shipped values: {e}")
            continue
        docs = render(chart, values, where)
        validate_objects(where, docs)
        chart_rules(where, docs)
        shard_triggers(where, values, docs)
    for bad in [
        {"secrets": {"apiToken": "short"}},
        {"config": {"publicUrl": "ftp://x"}},
        {"delivery": {"keda": {"enabled": "yes"}}},
        {"ingest": {"replicaz": 3}},
    ]:
        try:
            chart.validate_schema(bad)
            fail(f"chart schema accepted bad values {bad}")
        except helm.HelmError:
            pass


def check_kustomize():
    k = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs = []
    for r in k["resources"]:
        docs.extend(d for d in yaml.safe_load_all((BASE / r).read_text()) if d)
    for g in k.get("secretGenerator", []):
        for env in g.get("envs", []):
            if not (BASE / env).exists():
                fail(f"kustomize: secretGenerator file {env} missing")
    validate_objects("kustomize base", docs)
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    if names != {f"stampede-{c}" for c in ("ingest", "inbox", "fanout", "delivery")}:
        fail(f"kustomize base Deployments: {sorted(names)}")
    if not any(d["kind"] == "Job" for d in docs):
        fail("kustomize base has no migration Job")
    print(f"ok   kustomize base: {len(docs)} objects")


def exported_metrics():
    """Names in the exposition, from the registrations in metrics.rs."""
    src = (ROOT / "services" / "runtime" / "src" / "metrics.rs").read_text()
    out = set()
    chunks = src.split("registry.register(")
    for before, after in zip(chunks, chunks[1:]):
        m = re.match(r'\s*"(\w+)"', after)
        if not m:
            continue
        base = f"stampede_{m.group(1)}"
        declared = before[before.rfind("let "):]
        if "Counter" in declared:
            out.add(base + "_total")
        elif "Histogram" in declared:
            out |= {base + "_bucket", base + "_sum", base + "_count"}
        else:
            out.add(base)
    return out


def check_dashboard_and_collector():
    dash = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    known = exported_metrics()
    used = set()
    for p in dash["panels"]:
        for t in p.get("targets", []):
            used |= set(re.findall(r"stampede_\w+", t["expr"]))
    unknown = used - known
    if unknown:
        fail(f"dashboard names metrics stampede does not export: {sorted(unknown)}")
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for want in ["deliveries/s by outcome", "queue depth", "queue head age", "inbound verified/s", "failing hosts", "latency"]:
        if want not in titles:
            fail(f"dashboard has no '{want}' panel")
    print(f"ok   dashboard: {len(dash['panels'])} panels, {len(used)} metrics, all exported")
    col = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    for name, pipe in col["service"]["pipelines"].items():
        for section in ("receivers", "processors", "exporters"):
            for c in pipe.get(section, []):
                if c not in col.get(section, {}):
                    fail(f"collector pipeline {name}: {section[:-1]} {c} is not defined")
    print("ok   collector config")


check_chart()
check_kustomize()
check_dashboard_and_collector()
if failures:
    print(f"{len(failures)} deployment check(s) failed")
    sys.exit(1)
print("deployment checks passed")
