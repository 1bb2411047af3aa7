"""The Kubernetes manifests under deploy/k8s, checked offline: no cluster, no network.

* Each document of the base's own YAML files (kustomization.yaml aside) is validated against the
  Kubernetes 1.31 OpenAPI schemas by kubernetes-validate in strict mode: wrong types, missing required
  fields and unknown fields (a typo such as `readinesProbe`) all fail. The cloud.toml files must be
  settings the server itself accepts.
* With kubectl on PATH (its built-in kustomize), the example overlay is rendered from a copy of
  deploy/k8s given throwaway credentials by make-secrets.sh, each rendered document is validated the
  same way, and what must line up across objects is checked: probes, drain timing against the TOML's
  `grace`, Services, HPA and PDB selecting the Deployment's pods, the Secret's keys, the namespace.
* The kubelet's native gRPC probes go to the server's plaintext health port, since they cannot speak TLS.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import REPO
from cryptography import x509
from splitwire.cloud.cli import SERVE_OPTIONS, config_from_values

K8S = REPO / "deploy" / "k8s"
BASE = K8S / "base"
EXAMPLE = K8S / "overlays" / "example"
KUBERNETES_VERSION = "1.31.0"  # the oldest release the manifests are meant for (preStop `sleep` is on from 1.30)
NAMESPACE = "splitwire"
SECRET_KEYS = {"tls.crt", "tls.key", "ca.crt", "token"}
HEALTH_PORT = 50052
SERVICE = "splitwire.v1.SplitInference"
CLUSTER_SCOPED = {"Namespace"}


def validate(document: dict, where: str) -> None:
    name = f"{document.get('kind')}/{document.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        field = ".".join(str(part) for part in exc.path) or "(top level)"
        problem = f"is not valid Kubernetes {KUBERNETES_VERSION}: {field}: {exc.message}"
    except kubernetes_validate.SchemaNotFoundError as exc:
        problem = exc.message
    else:
        return
    pytest.fail(f"{where}: {name} {problem}")  # outside `except`: the message, not jsonschema's whole schema


def documents(text: str) -> list[dict]:
    return [document for document in yaml.safe_load_all(text) if document is not None]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def server_settings(toml_text: str, tmp_path: Path) -> dict[str, object]:
    """The [server] values the real option parser makes of a cloud.toml (unknown keys are an error)."""
    path = tmp_path / "cloud.toml"
    path.write_text(toml_text, encoding="utf-8")
    values = {option.key: option.default for option in SERVE_OPTIONS.options} | SERVE_OPTIONS.read_file(path)
    config_from_values(values)  # raises on inconsistent settings, e.g. a TLS key without its certificate
    return values


# --- the base, file by file ---------------------------------------------------------------------------------

BASE_FILES = sorted(path for path in BASE.glob("*.yaml") if path.name != "kustomization.yaml")


@pytest.mark.parametrize("path", BASE_FILES, ids=lambda path: path.name)
def test_base_documents_are_valid_kubernetes_objects(path: Path) -> None:
    docs = documents(path.read_text(encoding="utf-8"))
    assert docs, f"{path.name} holds no documents"
    for document in docs:
        validate(document, f"base/{path.name}")


def test_base_holds_the_expected_objects_and_no_key_material() -> None:
    kinds = sorted(doc["kind"] for path in BASE_FILES for doc in documents(path.read_text(encoding="utf-8")))
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "Service"]
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text(encoding="utf-8"))
    assert sorted(kustomization["resources"]) == sorted(path.name for path in BASE_FILES)
    assert "secretGenerator" not in kustomization
    for path in BASE.iterdir():
        assert not path.is_file() or "PRIVATE KEY" not in path.read_text(encoding="utf-8"), path


@pytest.mark.parametrize("toml", [BASE / "cloud.toml", EXAMPLE / "cloud.toml"], ids=["base", "overlay"])
def test_cloud_toml_is_accepted_by_the_server(toml: Path, tmp_path: Path) -> None:
    values = server_settings(toml.read_text(encoding="utf-8"), tmp_path)
    assert values["host"] == "0.0.0.0" and values["port"] == 50051 and values["metrics_port"] == 9464
    assert values["tls_cert"] == Path("/etc/splitwire/secrets/tls.crt")
    assert values["tls_key"] == Path("/etc/splitwire/secrets/tls.key")
    assert values["auth_token_file"] == Path("/etc/splitwire/secrets/token")


# --- the example overlay, rendered ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/k8s copied without any local credentials, then given throwaway ones by make-secrets.sh
    (placeholders where openssl is missing: enough to render, not to use)."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"

    def leave_out_secrets(folder: str, names: list[str]) -> list[str]:
        if Path(folder).name != "secrets":
            return []
        return [name for name in names if name not in {".gitignore", "README.md"}]

    shutil.copytree(K8S, root, ignore=leave_out_secrets)
    example = root / "overlays" / "example"
    if shutil.which("openssl"):
        done = subprocess.run(
            ["bash", example / "make-secrets.sh", NAMESPACE], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
    else:
        for name in SECRET_KEYS:
            (example / "secrets" / name).write_text("placeholder: openssl is not installed\n")
    return root


@pytest.fixture(scope="module")
def rendered(k8s_copy: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl (with kustomize) not installed: the overlay was not rendered; the base files were still validated"
        )
    done = subprocess.run(
        [kubectl, "kustomize", k8s_copy / "overlays" / "example"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return documents(done.stdout)


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def config_data(rendered: list[dict]) -> dict[str, str]:
    (config,) = [doc for doc in rendered if doc["kind"] == "ConfigMap"]
    assert config["metadata"]["name"].startswith("splitwire-cloud-config-"), "generated: named with a content hash"
    return config["data"]


def test_rendered_overlay_documents_are_valid_kubernetes_objects(rendered: list[dict]) -> None:
    assert len(rendered) >= 8
    for document in rendered:
        validate(document, "kubectl kustomize overlays/example")


def test_rendered_objects_all_live_in_the_namespace(rendered: list[dict]) -> None:
    assert one(rendered, "Namespace")["metadata"]["name"] == NAMESPACE
    for document in rendered:
        if document["kind"] not in CLUSTER_SCOPED:
            assert document["metadata"].get("namespace") == NAMESPACE, document["metadata"]["name"]


def test_rendered_deployment_probes_ports_and_security(rendered: list[dict]) -> None:
    deployment = one(rendered, "Deployment", "splitwire-cloud")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/splitwire-cloud:0.1.0"
    assert container["args"] == ["serve", "--config", "/etc/splitwire/cloud.toml"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9464, "health": HEALTH_PORT}
    settings = tomllib.loads(config_data(rendered)["cloud.toml"])["server"]
    assert settings["port"] == 50051 and settings["metrics_port"] == 9464
    # The kubelet's native `grpc:` probe dials in plaintext: with TLS on it must use the plaintext health port.
    assert settings["health_port"] == HEALTH_PORT and "tls_cert" in settings
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[name]["grpc"]["port"] == HEALTH_PORT, name
    for name in ("startupProbe", "readinessProbe"):
        assert container[name]["grpc"]["service"] == SERVICE, name
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "a first model load can take a minute"
    liveness = container["livenessProbe"]
    grace = settings["grace"] + container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace, "a draining pod must not be restarted"
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert "emptyDir" in next(volume for volume in pod["volumes"] if volume["name"] == mounts["/tmp"])


def test_termination_grace_outlasts_prestop_plus_server_grace(rendered: list[dict]) -> None:
    pod = one(rendered, "Deployment", "splitwire-cloud")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = tomllib.loads(config_data(rendered)["cloud.toml"])["server"]["grace"]
    assert pre_stop > 0 and grace > 0
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace


def test_config_and_credentials_reach_the_paths_the_toml_names(rendered: list[dict], tmp_path: Path) -> None:
    pod = one(rendered, "Deployment", "splitwire-cloud")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (secret,) = [doc for doc in rendered if doc["kind"] == "Secret"]
    assert secret["metadata"]["name"].startswith("splitwire-cloud-credentials-")
    assert set(secret["data"]) == SECRET_KEYS
    config = next(doc for doc in rendered if doc["kind"] == "ConfigMap")
    assert set(config["data"]) == {"cloud.toml"}
    # The files the pod sees: each mount's path plus each key (or item path) its sources project.
    files: dict[str, tuple[str, str]] = {}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for mount in container["volumeMounts"]:
        for source in volumes[mount["name"]].get("projected", {}).get("sources", []):
            kind, ref = next(iter(source.items()))
            wanted = {"configMap": config, "secret": secret}[kind]
            assert ref["name"] == wanted["metadata"]["name"], "kustomize must rewrite the hashed name"
            items = ref.get("items") or [{"key": key, "path": key} for key in wanted["data"]]
            for item in items:
                assert item["key"] in wanted["data"]
                files[f"{mount['mountPath']}/{item['path']}"] = (kind, item["key"])
            assert mount.get("readOnly") is True
    assert files["/etc/splitwire/cloud.toml"] == ("configMap", "cloud.toml")
    settings = server_settings(config["data"]["cloud.toml"], tmp_path)
    assert settings["max_batch_size"] == 64, "the overlay's override"
    for key in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
        if settings[key] is not None:
            assert files[str(settings[key])][0] == "secret", key


def test_services_select_the_pods(rendered: list[dict]) -> None:
    deployment = one(rendered, "Deployment", "splitwire-cloud")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    assert labels["app.kubernetes.io/part-of"] == "splitwire"
    grpc_service = one(rendered, "Service", "splitwire-cloud")["spec"]
    assert grpc_service["clusterIP"] == "None", "headless: DNS must list every ready pod for client round_robin"
    assert selects(grpc_service["selector"], labels)
    assert [(port["port"], port["targetPort"]) for port in grpc_service["ports"]] == [(50051, "grpc")]
    metrics = one(rendered, "Service", "splitwire-cloud-metrics")
    # Prometheus finds every pod by this name's DNS records, ready or not (deploy/prometheus).
    assert metrics["spec"]["clusterIP"] == "None" and metrics["spec"]["publishNotReadyAddresses"] is True
    assert selects(metrics["spec"]["selector"], labels)
    assert [(port["port"], port["targetPort"]) for port in metrics["spec"]["ports"]] == [(9464, "metrics")]
    assert metrics["metadata"]["annotations"]["prometheus.io/port"] == "9464"


def test_hpa_and_pdb_cover_the_deployment(rendered: list[dict]) -> None:
    deployment = one(rendered, "Deployment", "splitwire-cloud")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = one(rendered, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "splitwire-cloud"}
    assert hpa["minReplicas"] == 3 and hpa["maxReplicas"] >= hpa["minReplicas"], "the overlay raises the floor"
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pdb = one(rendered, "PodDisruptionBudget")["spec"]
    assert selects(pdb["selector"]["matchLabels"], labels)
    assert pdb.get("maxUnavailable", 0) >= 1 or pdb["minAvailable"] < hpa["minReplicas"], "drains must be possible"


def test_make_secrets_issues_a_certificate_for_the_service_names(k8s_copy: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed: make-secrets.sh was not run")
    secrets = k8s_copy / "overlays" / "example" / "secrets"
    certificate = x509.load_pem_x509_certificate((secrets / "tls.crt").read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    service = f"splitwire-cloud.{NAMESPACE}.svc"
    assert set(names.get_values_for_type(x509.DNSName)) >= {
        "splitwire-cloud",
        service,
        f"{service}.cluster.local",
        f"*.{service}.cluster.local",
    }
    token = (secrets / "token").read_text().splitlines()[0]
    assert len(token) == 64 and int(token, 16) >= 0, "32 random bytes, hex"
