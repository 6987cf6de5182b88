"""Deployment artefacts agree with each other, with the config loader and with the docs.

Static checks only (no cluster, no Docker daemon): every Kubernetes manifest parses and has
the expected kind; the ConfigMap's gateway.yaml and deploy/examples/gateway.yaml load with the
real loader; ports, probes, scrape settings, the grace period and the user agree across the
ConfigMap, the Deployment, the Services, the ServiceMonitor and the Dockerfile; and the docs
still name every config key, metric and catalog id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from fastgate.config import (
    AccessLogConfig,
    ApiKey,
    ApiKeyRule,
    ApiKeysConfig,
    AuthConfig,
    CacheConfig,
    DpopConfig,
    GatewayConfig,
    JwksCacheConfig,
    Limits,
    OtelConfig,
    ProviderConfig,
    RedisStoreConfig,
    ReplayStoreConfig,
    RouteConfig,
    RouteMatch,
    Timeouts,
    TlsCertificate,
    TlsConfig,
    TracingConfig,
    UpstreamConfig,
    UpstreamTlsConfig,
    load_config,
    parse_config,
)
from fastgate.errors import ConfigError
from fastgate.ops.supervisor import STOP_MARGIN
from fastgate.token.reasons import REJECT_REASONS
from tests.gateway_fixtures import dead_port

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
EXAMPLES = ROOT / "deploy" / "examples"
DOCS = ROOT / "docs"

# File -> the (apiVersion, kind) of each YAML document in it, in order.
EXPECTED_KINDS: dict[str, list[tuple[str, str]]] = {
    "configmap.yaml": [("v1", "ConfigMap")],
    "deployment.yaml": [("apps/v1", "Deployment")],
    "service.yaml": [("v1", "Service")],
    "hpa.yaml": [("autoscaling/v2", "HorizontalPodAutoscaler")],
    "pdb.yaml": [("policy/v1", "PodDisruptionBudget")],
    "networkpolicy.yaml": [("networking.k8s.io/v1", "NetworkPolicy")],
    "kustomization.yaml": [("kustomize.config.k8s.io/v1beta1", "Kustomization")],
}
# Optional pieces, outside the base: the ServiceMonitor component, the overlay that uses it,
# and examples that are never applied by `kubectl apply -k deploy/kubernetes`.
OPTIONAL_KINDS: dict[str, list[tuple[str, str]]] = {
    "components/servicemonitor/kustomization.yaml": [
        ("kustomize.config.k8s.io/v1alpha1", "Component")],
    "components/servicemonitor/servicemonitor.yaml": [
        ("v1", "Service"), ("monitoring.coreos.com/v1", "ServiceMonitor")],
    "examples/ingress-tls.yaml": [("networking.k8s.io/v1", "Ingress")],
    "examples/gateway-api.yaml": [("gateway.networking.k8s.io/v1", "Gateway"),
                                  ("gateway.networking.k8s.io/v1", "HTTPRoute")],
    "examples/sidecar.yaml": [("v1", "ConfigMap"), ("apps/v1", "Deployment"),
                              ("v1", "Service")],
}
SERVICEMONITOR = "components/servicemonitor/servicemonitor.yaml"
OVERLAY = ROOT / "deploy" / "kubernetes-prometheus-operator"

# Values for the ${NAME} references of deploy/examples/gateway.yaml (each must pass the
# loader's checks: a URL, an HS256 secret of >= 32 bytes, a SHA-256 hex digest).
EXAMPLE_ENV = {
    "ORDERS_UPSTREAM": "http://127.0.0.1:9000",
    "INTERNAL_JWT_SECRET": "0123456789abcdef0123456789abcdef0123456789abcdef",
    "BATCH_API_KEY_SHA256": "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8",
}

_ENV_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# -- helpers ------------------------------------------------------------------------------------


def load_docs(name: str) -> list[dict[str, Any]]:
    with open(K8S / name, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def only(name: str, kind: str) -> dict[str, Any]:
    found = [d for d in load_docs(name) if d["kind"] == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = only("deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def resolve_port(port: int | str) -> int:
    """A port number, or a named containerPort of the fastgate container."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert port in named, f"no containerPort named {port!r} (have {sorted(named)})"
    return int(named[port])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = only("deployment.yaml", "Deployment")["spec"]["template"][
        "metadata"]["labels"]
    return labels


def gateway_yaml_text() -> str:
    text: str = only("configmap.yaml", "ConfigMap")["data"]["gateway.yaml"]
    return text


def secret_env_names() -> set[str]:
    return {e["name"] for e in container().get("env", []) if "valueFrom" in e}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def docker(instruction: str) -> list[str]:
    return [args for word, args in dockerfile_instructions() if word == instruction]


@pytest.fixture
def k8s_config(tmp_path: Path) -> GatewayConfig:
    """The ConfigMap's gateway.yaml, loaded by the real loader from a file (so duplicate YAML
    keys are caught too), with the Deployment's secret environment variables set."""
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml_text(), encoding="utf-8")
    environ = {name: "s3cr3t-" + "x" * 57 for name in secret_env_names()}
    return load_config(path, environ)


def all_mapping_keys(node: Any) -> set[str]:
    keys: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            keys.add(str(k))
            keys |= all_mapping_keys(v)
    elif isinstance(node, list):
        for item in node:
            keys |= all_mapping_keys(item)
    return keys


def env_refs(node: Any) -> set[str]:
    """The ${NAME} references in the string values of a parsed document."""
    if isinstance(node, str):
        return set(_ENV_REF.findall(node))
    if isinstance(node, dict):
        return set().union(*(env_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(env_refs(v) for v in node))
    return set()


def code_words(markdown: str) -> set[str]:
    """Every identifier that appears inside a `code span` of a Markdown text."""
    return {w for span in re.findall(r"`([^`\n]+)`", markdown) for w in re.findall(r"\w+", span)}


def config_keys() -> set[str]:
    """Every key name the loader accepts, derived from the data model (so a new field fails
    this test until the example and the docs show it)."""
    keys: set[str] = set()
    for cls in (GatewayConfig, Limits, CacheConfig, UpstreamConfig, JwksCacheConfig,
                ProviderConfig, ApiKeysConfig, ApiKey, RouteConfig, RouteMatch, AuthConfig,
                ApiKeyRule, AccessLogConfig, Timeouts, TlsConfig, TlsCertificate,
                UpstreamTlsConfig, TracingConfig, OtelConfig, DpopConfig, ReplayStoreConfig,
                RedisStoreConfig):
        keys |= {f.name for f in fields(cls)}
    keys -= {"source", "name", "key_source"}  # not keys (the name is the mapping key)
    keys |= {"name"}  # routes[].name is a key
    keys |= {"memory"}  # replay_store.memory: {max_entries} (ReplayStoreConfig.max_entries)
    keys |= {"discovery", "header", "query", "cookie", "prefix",  # key source, token_from
             "all", "any", "equals", "one_of", "contains", "present"}  # scopes, claim rules
    return keys


# -- manifests ----------------------------------------------------------------------------------


def test_every_manifest_parses_with_its_kind() -> None:
    present = {p.name for p in K8S.glob("*.yaml")} | {p.name for p in K8S.glob("*.yml")}
    assert present == set(EXPECTED_KINDS)
    nested = {str(p.relative_to(K8S)) for p in K8S.glob("*/**/*.y*ml")}
    assert nested == set(OPTIONAL_KINDS)
    for name, expected in {**EXPECTED_KINDS, **OPTIONAL_KINDS}.items():
        docs = load_docs(name)
        assert [(d["apiVersion"], d["kind"]) for d in docs] == expected, name


def test_base_needs_no_operator_crds() -> None:
    """`kubectl apply -k deploy/kubernetes` on a plain cluster: only built-in API groups."""
    builtin = {"v1", "apps/v1", "autoscaling/v2", "policy/v1", "networking.k8s.io/v1"}
    kust = only("kustomization.yaml", "Kustomization")
    assert "components" not in kust
    for name in kust["resources"]:
        for doc in load_docs(name):
            assert doc["apiVersion"] in builtin, (name, doc["apiVersion"])


def test_servicemonitor_is_an_optional_component_used_by_the_overlay() -> None:
    component = only("components/servicemonitor/kustomization.yaml", "Component")
    assert component["resources"] == ["servicemonitor.yaml"]
    # The component removes the scrape annotations (one discovery mechanism per pod) - each
    # JSON patch `remove` must name an annotation that exists, or kustomize fails.
    (patch,) = component["patches"]
    target = patch["target"]
    deployment = only("deployment.yaml", "Deployment")
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    ops = yaml.safe_load(patch["patch"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    prefix = "/spec/template/metadata/annotations/"
    removed = {op["path"].removeprefix(prefix).replace("~1", "/") for op in ops
               if op["op"] == "remove" and op["path"].startswith(prefix)}
    assert len(removed) == len(ops)
    assert removed == {k for k in annotations if k.startswith("prometheus.io/")}
    # Beside the base, not inside it (kustomize refuses an overlay below its own base).
    with open(OVERLAY / "kustomization.yaml", encoding="utf-8") as f:
        (overlay,) = [d for d in yaml.safe_load_all(f) if d]
    assert overlay["kind"] == "Kustomization"
    assert not OVERLAY.resolve().is_relative_to(K8S.resolve())
    base = (OVERLAY / overlay["resources"][0]).resolve()
    assert overlay["resources"] == ["../kubernetes"] and base == K8S.resolve()
    (comp,) = overlay["components"]
    assert (OVERLAY / comp / "kustomization.yaml").resolve() == (
        K8S / "components/servicemonitor/kustomization.yaml").resolve()


def test_networkpolicy_admits_the_data_plane_and_only_prometheus_on_admin(
        k8s_config: GatewayConfig) -> None:
    assert k8s_config.admin is not None
    policy = only("networkpolicy.yaml", "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels())
    assert policy["policyTypes"] == ["Ingress"]
    by_port: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            by_port.setdefault(resolve_port(port["port"]), []).append(rule)
    assert set(by_port) == {k8s_config.listen.port, k8s_config.admin.port}
    (data_rule,) = by_port[k8s_config.listen.port]
    assert "from" not in data_rule  # clients (through a Service or an ingress) from anywhere
    (admin_rule,) = by_port[k8s_config.admin.port]
    assert admin_rule["from"] and all("namespaceSelector" in peer or "podSelector" in peer
                                      for peer in admin_rule["from"])
    assert admin_rule is not data_rule


def test_tls_examples_route_to_the_data_plane_service() -> None:
    svc = only("service.yaml", "Service")
    http_port = next(p for p in svc["spec"]["ports"] if p["name"] == "http")
    ingress = only("examples/ingress-tls.yaml", "Ingress")["spec"]
    assert ingress["tls"] and ingress["tls"][0]["secretName"]
    for rule in ingress["rules"]:
        assert rule["host"] in ingress["tls"][0]["hosts"]
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == svc["metadata"]["name"]
            assert backend["port"] == {"name": "http"}
    gateway = only("examples/gateway-api.yaml", "Gateway")
    (listener,) = gateway["spec"]["listeners"]
    assert listener["protocol"] == "HTTPS" and listener["tls"]["mode"] == "Terminate"
    route = only("examples/gateway-api.yaml", "HTTPRoute")["spec"]
    assert route["parentRefs"][0]["name"] == gateway["metadata"]["name"]
    assert route["parentRefs"][0]["sectionName"] == listener["name"]
    for rule in route["rules"]:
        for ref in rule["backendRefs"]:
            assert (ref["name"], ref["port"]) == (svc["metadata"]["name"], http_port["port"])


def test_sidecar_example_loads_and_exposes_only_fastgate(tmp_path: Path) -> None:
    cm = only("examples/sidecar.yaml", "ConfigMap")
    path = tmp_path / "gateway.yaml"
    path.write_text(cm["data"]["gateway.yaml"], encoding="utf-8")
    config = load_config(path, {})
    assert config.admin is not None and config.admin.host == "0.0.0.0"
    # The app is reached over the pod's loopback only.
    assert all(u.url.startswith("http://127.0.0.1:") for u in config.upstreams.values())
    deployment = only("examples/sidecar.yaml", "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    gate = containers["fastgate"]
    assert "ports" not in containers["app"]
    ports = {p["name"]: p["containerPort"] for p in gate["ports"]}
    assert ports == {"http": config.listen.port, "admin": config.admin.port}
    assert gate["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gate["livenessProbe"]["httpGet"]["path"] == "/healthz"
    mount = next(m for m in gate["volumeMounts"] if m["mountPath"] == "/etc/fastgate")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    pre_stop = float(gate["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + config.drain_timeout + STOP_MARGIN
    svc = only("examples/sidecar.yaml", "Service")
    assert selects(svc["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]


def test_kustomization_lists_every_manifest_and_the_image() -> None:
    kust = only("kustomization.yaml", "Kustomization")
    assert sorted(kust["resources"]) == sorted(set(EXPECTED_KINDS) - {"kustomization.yaml"})
    image = container()["image"]
    assert image == "fastgate:0.1.0"
    name, tag = image.split(":")
    assert {"name": name, "newTag": tag} in kust["images"]


def test_configmap_loads_with_the_loader(k8s_config: GatewayConfig) -> None:
    assert k8s_config.listen.host == "0.0.0.0"
    assert k8s_config.admin is not None
    # kubelet probes and Prometheus connect to the pod IP: loopback would fail every probe.
    assert k8s_config.admin.host == "0.0.0.0"
    assert k8s_config.admin.port != k8s_config.listen.port
    assert k8s_config.metrics
    # `workers: 0` would count the node's CPUs, not the pod's limit.
    assert k8s_config.workers >= 1


def test_every_env_reference_comes_from_the_deployment() -> None:
    refs = env_refs(yaml.safe_load(gateway_yaml_text()))
    assert refs, "the example should show a secret taken from the environment"
    assert refs == secret_env_names()
    for env in container()["env"]:
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "fastgate-secrets" and ref["key"]


def test_container_ports_match_listen_and_admin(k8s_config: GatewayConfig) -> None:
    assert k8s_config.admin is not None
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"http": k8s_config.listen.port, "admin": k8s_config.admin.port}


def test_service_exposes_only_the_data_plane(k8s_config: GatewayConfig) -> None:
    svc = only("service.yaml", "Service")
    assert selects(svc["spec"]["selector"], pod_labels())
    targets = [resolve_port(p["targetPort"]) for p in svc["spec"]["ports"]]
    assert targets == [k8s_config.listen.port]


def test_probes_use_the_admin_port(k8s_config: GatewayConfig) -> None:
    assert k8s_config.admin is not None
    c = container()
    ready = c["readinessProbe"]["httpGet"]
    live = c["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz"
    assert live["path"] == "/healthz"  # never /readyz: an IdP outage must not restart pods
    assert resolve_port(ready["port"]) == k8s_config.admin.port
    assert resolve_port(live["port"]) == k8s_config.admin.port


def test_scrape_annotations_point_at_metrics(k8s_config: GatewayConfig) -> None:
    assert k8s_config.admin is not None
    annotations = only("deployment.yaml", "Deployment")["spec"]["template"]["metadata"][
        "annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(k8s_config.admin.port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_servicemonitor_scrapes_the_admin_port(k8s_config: GatewayConfig) -> None:
    assert k8s_config.admin is not None
    metrics_svc = only(SERVICEMONITOR, "Service")
    monitor = only(SERVICEMONITOR, "ServiceMonitor")
    assert metrics_svc["spec"]["clusterIP"] == "None"  # discovery only, no virtual IP
    assert selects(metrics_svc["spec"]["selector"], pod_labels())
    assert selects(monitor["spec"]["selector"]["matchLabels"], metrics_svc["metadata"]["labels"])
    # ...and not the data-plane Service.
    data_svc = only("service.yaml", "Service")
    assert not selects(monitor["spec"]["selector"]["matchLabels"], data_svc["metadata"]["labels"])
    svc_ports = {p["name"]: resolve_port(p["targetPort"]) for p in metrics_svc["spec"]["ports"]}
    assert list(svc_ports.values()) == [k8s_config.admin.port]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in svc_ports
    assert endpoint["path"] == "/metrics"


def test_grace_period_covers_prestop_and_drain(k8s_config: GatewayConfig) -> None:
    spec = pod_spec()
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert spec["terminationGracePeriodSeconds"] > k8s_config.drain_timeout
    # The kubelet counts the grace period from before preStop: the sleep, the drain and the
    # supervisor's margin before it kills straggling workers must all fit.
    assert spec["terminationGracePeriodSeconds"] > (
        pre_stop + k8s_config.drain_timeout + STOP_MARGIN)


def test_deployment_runs_as_non_root_with_a_read_only_root() -> None:
    spec = pod_spec()
    pod_ctx = spec["securityContext"]
    ctx = container()["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True
    assert pod_ctx["runAsUser"] == 10001
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    # The same uid as the image, so runAsNonRoot never depends on the image's USER line.
    assert docker("USER") == [str(pod_ctx["runAsUser"])]
    mounts = {m["mountPath"] for m in container()["volumeMounts"]}
    assert "/tmp" in mounts  # scratch space (tempfile, metrics files) on a read-only root


def test_config_is_mounted_where_the_image_reads_it() -> None:
    (cmd,) = docker("CMD")
    args = json.loads(cmd)
    assert args[:2] == ["run", "-c"]
    config_path = Path(args[2])
    assert container().get("args", args) == args
    mount = next(m for m in container()["volumeMounts"] if m["mountPath"] == str(
        config_path.parent))
    assert "subPath" not in mount  # subPath mounts never see ConfigMap updates (SIGHUP reload)
    volume = next(v for v in pod_spec()["volumes"] if v["name"] == mount["name"])
    configmap = only("configmap.yaml", "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]


def test_hpa_and_pdb_target_the_deployment() -> None:
    deployment = only("deployment.yaml", "Deployment")
    hpa = only("hpa.yaml", "HorizontalPodAutoscaler")
    pdb = only("pdb.yaml", "PodDisruptionBudget")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1", "Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels())
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels())
    assert "cpu" in container()["resources"]["requests"]  # HPA utilization needs a request


# -- Dockerfile ---------------------------------------------------------------------------------


def docker_arg_defaults() -> dict[str, str]:
    return dict(a.split("=", 1) for a in docker("ARG") if "=" in a)


def _docker_value(word: str) -> str:
    """``${NAME}`` of an ARG resolved to its default."""
    return re.sub(r"\$\{(\w+)\}", lambda m: docker_arg_defaults()[m.group(1)], word)


def test_dockerfile_exposes_listen_and_admin(k8s_config: GatewayConfig) -> None:
    assert k8s_config.admin is not None
    exposed = {int(_docker_value(p).split("/")[0]) for args in docker("EXPOSE")
               for p in args.split()}
    assert exposed == {k8s_config.listen.port, k8s_config.admin.port}


def test_dockerfile_healthcheck_follows_the_admin_port_variable(tmp_path: Path) -> None:
    """No port in the health check itself: it reads FASTGATE_ADMIN_PORT (ENV, from the
    ADMIN_PORT build argument, also EXPOSEd), which the config can use for `admin` too. The
    check is run for real against a live admin server on another port, and against none."""
    env_lines = [e for e in docker("ENV") if e.startswith("FASTGATE_ADMIN_PORT=")]
    assert env_lines == ["FASTGATE_ADMIN_PORT=${ADMIN_PORT}"]
    assert "${ADMIN_PORT}" in docker("EXPOSE")[0].split()
    (healthcheck,) = docker("HEALTHCHECK")
    cmd = json.loads(healthcheck.split("CMD", 1)[1])
    assert "FASTGATE_ADMIN_PORT" in cmd[-1] and "9901" not in cmd[-1].replace(
        "or '9901'", "")  # only the fallback when the variable is unset
    # A config with `admin: 127.0.0.1:${FASTGATE_ADMIN_PORT}` loads with the same variable.
    port = dead_port()
    cfg = parse_config(yaml.safe_load(
        "admin: '127.0.0.1:${FASTGATE_ADMIN_PORT}'\n"
        "upstreams: {u: {url: 'http://127.0.0.1:1'}}\n"
        "routes: [{name: r, match: {path_prefix: /}, upstream: u, auth: none}]\n"),
        {"FASTGATE_ADMIN_PORT": str(port)})
    assert cfg.admin is not None and cfg.admin.port == port
    import asyncio
    import threading

    from fastgate.ops.admin import AdminServer

    loop = asyncio.new_event_loop()
    admin = AdminServer(cfg.admin, metrics_body=lambda: b"", ready=lambda: {})
    loop.run_until_complete(admin.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "FASTGATE_ADMIN_PORT": str(port)}
        assert subprocess.run(cmd, env=env, timeout=30).returncode == 0
        env["FASTGATE_ADMIN_PORT"] = str(dead_port())  # nothing listens there
        assert subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode != 0
    finally:
        asyncio.run_coroutine_threadsafe(admin.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()



def test_dockerfile_build_and_runtime_stages(k8s_config: GatewayConfig) -> None:
    assert k8s_config.admin is not None
    froms = docker("FROM")
    assert [f.split()[0] for f in froms] == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    # The base image is one build argument: a tag by default, a digest when pinned.
    defaults = [a for a in docker("ARG") if a.startswith("PYTHON_IMAGE=")]
    assert len(defaults) == 1
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(@sha256:[0-9a-f]{64})?", defaults[0])
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "--build-arg PYTHON_IMAGE=python:3.11-slim@sha256:" in text  # how to pin: documented
    runs = " ".join(docker("RUN"))
    assert "pip wheel --no-deps -w /wheels ." in runs
    assert "--no-index" in runs  # the runtime installs only the builder's wheels
    assert json.loads(docker("ENTRYPOINT")[0]) == ["fastgate"]
    (healthcheck,) = docker("HEALTHCHECK")
    assert "http://127.0.0.1:{port}/healthz" in healthcheck
    assert docker_arg_defaults()["ADMIN_PORT"] == str(k8s_config.admin.port)
    assert "curl" not in healthcheck  # not in the slim image


def test_dockerfile_builds_from_the_constraints_file() -> None:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    copied = " ".join(docker("COPY"))
    assert "constraints.txt" in copied
    runs = " ".join(docker("RUN"))
    assert "pip wheel -c constraints.txt" in runs
    env = " ".join(docker("ENV"))
    assert "PIP_CONSTRAINT=/src/constraints.txt" in env  # isolated build envs too
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    with open(ROOT / "pyproject.toml", "rb") as f:
        import tomllib

        project = tomllib.load(f)
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name]), (text, pins[name])


def test_dockerfile_has_oci_labels() -> None:
    labels = " ".join(docker("LABEL"))
    for key in ("title", "description", "version", "revision", "created", "licenses",
                "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels
    with open(ROOT / "pyproject.toml", "rb") as f:
        import tomllib

        project = tomllib.load(f)["project"]
    assert project["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")[:200]
    assert f'ARG VERSION={project["version"]}' in (ROOT / "Dockerfile").read_text("utf-8")


def test_dockerignore_keeps_host_build_outputs_out() -> None:
    text = (ROOT / ".dockerignore").read_text(encoding="utf-8")
    lines = {line.strip() for line in text.splitlines() if not line.startswith("#")}
    # The extensions live in subpackages (fastgate/token/_verify.pyx ...): a top-level-only
    # pattern such as fastgate/*.so would let their host-built outputs into the image.
    for entry in (".git", "build/", "dist/", "fastgate/**/*.so", "fastgate/**/*.c",
                  "__pycache__/", ".pytest_cache/"):
        assert entry in lines, entry
    for needed in ("fastgate", "pyproject.toml", "setup.py", "README.md"):
        assert needed not in lines, needed


# -- the annotated example ----------------------------------------------------------------------


def test_example_config_loads() -> None:
    path = EXAMPLES / "gateway.yaml"
    with open(path, encoding="utf-8") as f:
        assert env_refs(yaml.safe_load(f)) == set(EXAMPLE_ENV)  # comments do not count
    config = load_config(path, EXAMPLE_ENV)
    local = config.providers["local"]
    # A relative jwks_file resolves against the config file's directory.
    assert local.jwks_file is not None
    assert Path(local.jwks_file) == EXAMPLES / "jwks.json"
    keys = json.loads(Path(local.jwks_file).read_text(encoding="utf-8"))["keys"]
    assert keys and all("d" not in k for k in keys)  # public keys only
    assert config.providers["internal"].secret == EXAMPLE_ENV["INTERNAL_JWT_SECRET"].encode()
    assert {p.key_source for p in config.providers.values()} == {
        "discovery", "jwks_uri", "jwks_file", "jwks", "secret"}


def test_example_config_without_a_secret_is_an_error() -> None:
    environ = {k: v for k, v in EXAMPLE_ENV.items() if k != "INTERNAL_JWT_SECRET"}
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLES / "gateway.yaml", environ)
    assert any("INTERNAL_JWT_SECRET" in e for e in info.value.errors)


def test_example_config_shows_every_key() -> None:
    with open(EXAMPLES / "gateway.yaml", encoding="utf-8") as f:
        data = yaml.safe_load(f)
    text = (EXAMPLES / "gateway.yaml").read_text(encoding="utf-8")
    shown = all_mapping_keys(data)
    missing = {k for k in config_keys() if k not in shown and f"# {k}:" not in text}
    assert not missing


# -- docs ---------------------------------------------------------------------------------------


def test_identity_provider_recipes_load() -> None:
    """Every YAML recipe of docs/identity-providers.md is a valid providers + routes config."""
    text = (DOCS / "identity-providers.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 7  # Okta, Auth0, Entra ID, Cognito, Keycloak, ADFS, Ping, own issuer
    for block in blocks:
        data = yaml.safe_load(block)
        assert "providers" in data
        for provider in data["providers"].values():
            if "jwks_file" in provider:  # the recipe's path is a placeholder
                provider["jwks_file"] = str(EXAMPLES / "jwks.json")
        data.setdefault("upstreams", {"orders": {"url": "http://127.0.0.1:9000"}})
        data.setdefault("routes", [{"name": "all", "match": {"path_prefix": "/"},
                                    "upstream": "orders", "auth": {"providers": list(
                                        data["providers"])}}])
        environ = {name: "0123456789abcdef" * 4 for name in env_refs(data)}
        parse_config(data, environ, str(EXAMPLES / "recipe.yaml"))


def test_configuration_doc_names_every_key_and_reason() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    missing = config_keys() - code_words(text)
    assert not missing
    assert not {r.label for r in REJECT_REASONS if f"`{r.label}`" not in text}
    assert "printf %s" in text and "sha256sum" in text


def test_operations_doc_names_every_metric() -> None:
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    for name in ("fastgate_requests_total", "fastgate_request_duration_seconds",
                 "fastgate_rejects_total", "fastgate_verify_duration_seconds",
                 "fastgate_upstream_duration_seconds", "fastgate_upstream_errors_total",
                 "fastgate_token_cache_lookups_total", "fastgate_token_cache_entries",
                 "fastgate_jwks_fetches_total", "fastgate_jwks_fetch_duration_seconds",
                 "fastgate_jwks_keys", "fastgate_jwks_age_seconds",
                 "fastgate_inflight_requests", "fastgate_build_info",
                 "fastgate_config_reloads_total", "fastgate_replay_store_checks_total",
                 "fastgate_replay_store_errors_total",
                 "fastgate_replay_store_duration_seconds"):
        assert f"`{name}`" in text, name
    for endpoint in ("/metrics", "/healthz", "/readyz"):
        assert f"`{endpoint}`" in text


def test_security_doc_maps_every_catalog_id_to_a_test_file() -> None:
    text = (DOCS / "security.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| ([A-H]\d+) \|(.*)$", text, flags=re.MULTILINE))
    sizes = {"A": 15, "B": 15, "C": 9, "D": 11, "E": 10, "F": 10, "G": 7, "H": 14}
    expected = {f"{letter}{i}" for letter, n in sizes.items() for i in range(1, n + 1)}
    assert set(rows) == expected
    for ident, row in rows.items():
        named = re.findall(r"tests/(?:\w+/)?test_\w+\.py", row)
        assert named, ident
        assert all((ROOT / name).is_file() for name in named), (ident, named)


# -- Prometheus alert rules (deploy/prometheus) -------------------------------------------------

RULES = ROOT / "deploy" / "prometheus" / "fastgate-rules.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed "
                                    "(.ci/run installs Debian's prometheus package)")
SPEC_METRICS = {
    "fastgate_requests_total", "fastgate_request_duration_seconds", "fastgate_rejects_total",
    "fastgate_verify_duration_seconds", "fastgate_upstream_duration_seconds",
    "fastgate_upstream_errors_total", "fastgate_token_cache_lookups_total",
    "fastgate_token_cache_entries", "fastgate_jwks_fetches_total",
    "fastgate_jwks_fetch_duration_seconds", "fastgate_jwks_keys", "fastgate_jwks_age_seconds",
    "fastgate_inflight_requests", "fastgate_build_info", "fastgate_config_reloads_total",
}


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alert_rules_cover_the_operators_list_and_name_real_metrics() -> None:
    rules = {r["alert"]: r for r in _rules()}
    for name in ("FastgateRejectRatioSpike", "FastgateJwksFetchFailing",
                 "FastgateJwksNearMaxStale", "FastgateUpstream5xxRatio",
                 "FastgateNoReadyWorkers", "FastgateHighP99Latency"):
        assert name in rules, name
    for name, rule in rules.items():
        used = set(re.findall(r"\bfastgate_[a-z_]+", rule["expr"]))
        bases = {re.sub(r"_(bucket|count|sum)$", "", m) for m in used}
        assert used and bases <= SPEC_METRICS, (name, bases - SPEC_METRICS)
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"], name
    # The staleness threshold is below the default max_stale (the keys are dropped there).
    stale = rules["FastgateJwksNearMaxStale"]["expr"]
    threshold = float(stale.rsplit(">", 1)[1])
    assert 0 < threshold < JwksCacheConfig().max_stale


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    assert PROMTOOL is not None
    p = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in p.stdout


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    text = ",".join(f'{k}="{v}"' for k, v in {"job": "fg", "instance": "a", **labels}.items())
    return {"series": f"{name}{{{text}}}", "values": values}


# Per minute: 600 = 10/s. "a" is a broken instance, "b" a healthy one.
_BROKEN = [
    _series("fastgate_rejects_total", "0+600x40", route="orders", reason="audience_mismatch"),
    _series("fastgate_rejects_total", "0+6000x40", instance="b", route="catalog",
            reason="token_missing"),  # rejects every API sees: never an alert
    _series("fastgate_requests_total", "0+600x40", route="orders", status_class="4xx"),
    _series("fastgate_requests_total", "0+600x40", route="orders", status_class="2xx"),
    _series("fastgate_requests_total", "0+300x40", route="billing", status_class="5xx"),
    _series("fastgate_requests_total", "0+900x40", route="billing", status_class="2xx"),
    _series("fastgate_requests_total", "0+6000x40", instance="b", route="catalog",
            status_class="4xx"),
    _series("fastgate_requests_total", "0+6000x40", instance="b", route="catalog",
            status_class="2xx"),
    _series("fastgate_request_duration_seconds_bucket", "0x40", route="orders", le="0.1"),
    _series("fastgate_request_duration_seconds_bucket", "0+1200x40", route="orders",
            le="2.5"),
    _series("fastgate_request_duration_seconds_bucket", "0+1200x40", route="orders",
            le="+Inf"),
    _series("fastgate_request_duration_seconds_count", "0+1200x40", route="orders"),
    _series("fastgate_jwks_fetches_total", "0+1x40", provider="okta", result="failure"),
    _series("fastgate_jwks_fetches_total", "3x40", provider="okta", result="success"),
    _series("fastgate_jwks_fetches_total", "0x40", instance="b", provider="okta",
            result="failure"),
    _series("fastgate_jwks_fetches_total", "0+1x40", instance="b", provider="okta",
            result="success"),
    _series("fastgate_jwks_age_seconds", "70000+60x40", provider="okta"),
    _series("fastgate_jwks_age_seconds", "30x40", instance="b", provider="okta"),
    _series("fastgate_jwks_keys", "0x40", provider="okta"),
    _series("fastgate_jwks_keys", "2x40", instance="b", provider="okta"),
    _series("fastgate_build_info", "1x40", instance="b", version="0.1.0", extension="cython"),
]


def _expect(alert: str, **labels: str) -> dict[str, Any]:
    return {"eval_time": "30m", "alertname": alert,
            "exp_alerts": [{"exp_labels": labels}] if labels else []}


@needs_promtool
def test_alert_rules_fire_on_a_broken_instance_and_not_on_a_healthy_one(tmp_path: Path) -> None:
    """`promtool test rules` with synthetic series: every alert fires for instance "a" (or its
    routes) and for nothing else. The copy of the rules has no annotations (their templates are
    checked by `promtool check rules`), so only the expressions and labels are compared."""
    assert PROMTOOL is not None
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(doc))
    w, c = "warning", "critical"
    cases = [
        _expect("FastgateRejectRatioSpike", severity=w, job="fg", route="orders"),
        _expect("FastgateJwksFetchFailing", severity=w, job="fg", instance="a", provider="okta"),
        _expect("FastgateJwksNearMaxStale", severity=c, job="fg", instance="a", provider="okta"),
        _expect("FastgateProviderWithoutKeys", severity=c, job="fg", instance="a",
                provider="okta"),
        _expect("FastgateNoReadyWorkers", severity=c, job="fg", instance="a"),
        _expect("FastgateAbsent"),  # instance b has a live worker
        _expect("FastgateUpstream5xxRatio", severity=w, job="fg", route="billing"),
        _expect("FastgateHighP99Latency", severity=w, job="fg", route="orders"),
    ]
    assert {case["alertname"] for case in cases} == {r["alert"] for r in _rules()}
    spec = {"rule_files": [str(rules)], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": _BROKEN, "alert_rule_test": cases},
                      # Nothing scraped at all: only the absence alert.
                      {"interval": "1m", "input_series": [],
                       "alert_rule_test": [_expect("FastgateAbsent", severity=c)]}]}
    test_file = tmp_path / "test.yaml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    p = subprocess.run([PROMTOOL, "test", "rules", str(test_file)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


# -- the Kubernetes set as kustomize renders it: scraped once ------------------------------------

KUSTOMIZE = ([k, "kustomize"] if (k := shutil.which("kubectl")) else
             [k] if (k := shutil.which("kustomize")) else None)
needs_kustomize = pytest.mark.skipif(KUSTOMIZE is None, reason="neither kubectl nor kustomize")


def _render(directory: Path) -> list[dict[str, Any]]:
    assert KUSTOMIZE is not None
    p = subprocess.run([*KUSTOMIZE, str(directory)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def _scrape_mechanisms(docs: list[dict[str, Any]]) -> list[str]:
    """Each way Prometheus would find the gateway pods: annotated pod templates and
    ServiceMonitors selecting a Service that selects those pods."""
    out: list[str] = []
    pods = [d for d in docs if d["kind"] == "Deployment"]
    for dep in pods:
        annotations = dep["spec"]["template"]["metadata"].get("annotations") or {}
        if annotations.get("prometheus.io/scrape") == "true":
            out.append(f"annotations on {dep['metadata']['name']}")
    services = [d for d in docs if d["kind"] == "Service"]
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        wanted = monitor["spec"]["selector"]["matchLabels"]
        for svc in services:
            if selects(wanted, svc["metadata"].get("labels", {})) and any(
                    selects(svc["spec"]["selector"],
                            dep["spec"]["template"]["metadata"]["labels"]) for dep in pods):
                out.append(f"ServiceMonitor {monitor['metadata']['name']} via "
                           f"{svc['metadata']['name']}")
    return out


@needs_kustomize
def test_rendered_base_and_overlay_are_each_scraped_exactly_once() -> None:
    base = _scrape_mechanisms(_render(K8S))
    assert base == ["annotations on fastgate"]
    overlay = _scrape_mechanisms(_render(OVERLAY))
    assert overlay == ["ServiceMonitor fastgate via fastgate-metrics"]
