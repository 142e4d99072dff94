"""The Helm chart (helm/ember): lint, render with several value sets, validate every object
against the Kubernetes 1.32 OpenAPI schema, and check what the objects say to each other.

Rendering goes through Helm's own Go SDK (helm-python-sdk, no helm binary); validation through
kubernetes-validate's 1.32 "strict" schemas (unknown fields are errors). Neither talks to a
cluster: nothing here proves the chart runs, only that it is well-formed and self-consistent.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = Path(__file__).resolve().parent.parent / "helm" / "ember"
KUBE_VERSION = "1.32.0"  # kubernetes-validate ships 1.28-1.37 schemas; 1.32 is used as is
RELEASE = "ember"
NAMESPACE = "inference"
CRD_API_GROUPS = ("monitoring.coreos.com/",)  # kinds kubernetes-validate cannot know

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "external-redis": {
        "redis": {"enabled": False, "external": {"url": "rediss://:pw@redis.example.internal:6380/2"}},
    },
    "existing-secrets": {
        "redis": {"enabled": False, "external": {"existingSecret": "ops-redis", "existingSecretKey": "url"}},
        "auth": {"existingSecret": "ops-ember-auth"},
        "s3": {"existingSecret": "ops-s3", "accessKeyIdKey": "id", "secretAccessKeyKey": "secret"},
    },
    "ingress": {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-buffering": "off"},
            "hosts": [{"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
            "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}],
        },
        "controller": {"service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}}},
    },
    "multi-gpu": {
        "worker": {
            "gpus": 8,
            "dramCacheGB": 512,
            "shmSize": "64Gi",
            "runtimeClassName": "nvidia",
            "cache": {"type": "localPVC", "sizeGB": 3000, "localPVC": {"storageClassName": "topolvm-nvme", "size": "3300Gi"}},
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "nvidia.com/gpu.count", "operator": "In", "values": ["8"]}]}]}}},
            "resources": {"requests": {"cpu": "32", "memory": "600Gi"}, "limits": {"memory": "700Gi"}},
            "podDisruptionBudget": {"enabled": True, "minAvailable": 3},
        },
        "monitoring": {"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prometheus"}}},
    },
    "s3-cache-source": {
        "s3": {"endpoint": "http://minio.storage.svc:9000", "region": "us-east-1",
               "accessKeyId": "AKIAEXAMPLEKEYID0001", "secretAccessKey": "wJalrXUtnFEMI-example-secret-0001"},
        "deployments": [
            {"name": "llama-8b", "checkpoint": "s3://models/llama-3.1-8b.ember", "min_instances": 1, "max_instances": 8,
             "target_concurrency": 16, "keep_alive_s": 300},
            {"name": "tiny", "checkpoint": "s3://models/tiny.ember"},
        ],
    },
    "cpu-only": {
        # Helm merges maps with the defaults: null removes the default GPU node label.
        "worker": {"gpus": 0, "dramCacheGB": 4, "nodeSelector": {"nvidia.com/gpu.present": None}, "tolerations": [],
                   "cache": {"type": "emptyDir", "sizeGB": 20},
                   "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "12Gi"}}},
        "controller": {"watchNodes": False},
        "redis": {"password": "a-fixed-password-0123456789"},
    },
    "hardened": {
        "controller": {
            "tls": {"enabled": True, "secretName": "ember-controller-tls"},
            "checkpointRoots": [
                {"path": "/models",
                 "volume": {"persistentVolumeClaim": {"claimName": "shared-models", "readOnly": True}}},
                {"path": "/mnt/nfs/checkpoints",
                 "volume": {"nfs": {"server": "nfs.storage.internal", "path": "/exports/ckpt", "readOnly": True}}},
            ],
            "allowedBuckets": ["models", "team-a.checkpoints"],
            "migrationMinGain": 0.5,
            "limits": {"maxBodyBytes": 8388608, "maxTokens": 4096, "rateLimit": 2.5, "burst": 10,
                       "maxStreamsPerKey": 4},
        },
        "deployments": [
            {"name": "llama-8b", "checkpoint": "s3://models/llama-3.1-8b.ember", "max_instances": 4},
            {"name": "tiny-local", "checkpoint": "/models/tiny.ember"},
            {"name": "nfs-file-uri", "checkpoint": "file:///mnt/nfs/checkpoints/qwen.ember"},
        ],
        "ingress": {
            "enabled": True,
            "annotations": {"nginx.ingress.kubernetes.io/backend-protocol": "HTTPS"},
            "hosts": [{"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
        },
        "monitoring": {"serviceMonitor": {"enabled": True}},
    },
    "tls-self-signed": {
        # `kubectl create secret tls` holds no ca.crt: the workers trust the certificate itself.
        "controller": {"tls": {"enabled": True, "secretName": "ember-self-signed", "ca": {"key": "tls.crt"}},
                       "limits": {"maxTokens": 2048}},
        "worker": {"gpus": 0, "nodeSelector": {"nvidia.com/gpu.present": None}, "cache": {"type": "emptyDir"}},
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objects = []
    for path, text in sorted(manifests.items()):
        if not path.endswith(".yaml"):
            continue
        objects.extend(obj for obj in yaml.safe_load_all(text) if obj)
    return objects


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every value set rendered once for the whole module."""
    return {name: render(values) for name, values in VALUE_SETS.items()}


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict, name: str) -> dict:
    return next(c for c in pod_spec(workload)["containers"] if c["name"] == name)


def workloads(objects: list[dict]) -> Iterator[dict]:
    yield from (o for o in objects if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet"))


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def controller(objects: list[dict]) -> dict:
    return one(objects, "Deployment", f"{RELEASE}-controller")


def worker(objects: list[dict]) -> dict:
    return one(objects, "DaemonSet", f"{RELEASE}-worker")


def secret_data(objects: list[dict]) -> dict[str, str]:
    (secret,) = find(objects, "Secret", RELEASE) or [{"data": {}}]
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


# ---- lint and schema-valid objects ---------------------------------------------------------------


def test_lint_is_clean_for_every_value_set() -> None:
    for name, values in VALUE_SETS.items():
        report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]  # 1 = info ("icon is recommended")
        assert not problems and not report["errors"], f"{name}: {problems or report['errors']}"


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_every_object_validates_against_kubernetes_1_32(rendered: dict, value_set: str) -> None:
    for obj in rendered[value_set]:
        if obj["apiVersion"].startswith(CRD_API_GROUPS):
            check_service_monitor_shape(obj, rendered[value_set])
            continue
        try:
            version = kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{value_set}: {obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}")
        assert version == "1.32"


def test_the_validator_is_not_vacuous(rendered: dict) -> None:
    broken = json.loads(json.dumps(controller(rendered["default"])))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)


def check_service_monitor_shape(obj: dict, objects: list[dict]) -> None:
    """ServiceMonitor is a CRD (Prometheus operator): check by hand what Prometheus relies on."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "ServiceMonitor"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    spec = obj["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels"}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    services = [s for s in find(objects, "Service")
                if spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert services, f"ServiceMonitor {obj['metadata']['name']} selects no Service"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scheme", "tlsConfig", "relabelings", "metricRelabelings"}
        if "tlsConfig" in endpoint:
            # Prometheus checks the controller's certificate against the CA the workers trust, by
            # the Service name the certificate must carry anyway.
            assert endpoint["scheme"] == "https"
            tls = endpoint["tlsConfig"]
            assert set(tls) == {"ca", "serverName"} and set(tls["ca"]) == {"secret"}
            assert set(tls["ca"]["secret"]) == {"name", "key"}
            assert tls["serverName"] == f"{obj['metadata']['name']}.{NAMESPACE}.svc"
        assert re.fullmatch(r"([0-9]+(ms|s|m|h))+", endpoint["interval"])
        assert endpoint["path"] == "/metrics"
        for service in services:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, (
                f"ServiceMonitor {obj['metadata']['name']} scrapes port {endpoint['port']!r}, "
                f"which Service {service['metadata']['name']} does not name"
            )


# ---- what the objects say ------------------------------------------------------------------------


def test_worker_claims_the_configured_gpus(rendered: dict) -> None:
    for value_set, gpus in (("default", 1), ("multi-gpu", 8)):
        w = container(worker(rendered[value_set]), "worker")
        assert w["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert w["args"][w["args"].index("--device") + 1] == "cuda"
    cpu = container(worker(rendered["cpu-only"]), "worker")
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert cpu["args"][cpu["args"].index("--device") + 1] == "cpu"
    assert env_of(cpu)["NVIDIA_VISIBLE_DEVICES"]["value"] == "void"


def test_worker_runs_on_gpu_nodes_from_values(rendered: dict) -> None:
    spec = pod_spec(worker(rendered["default"]))
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    multi = pod_spec(worker(rendered["multi-gpu"]))
    assert multi["nodeSelector"] == {"nvidia.com/gpu.present": "true", **VALUE_SETS["multi-gpu"]["worker"]["nodeSelector"]}
    assert multi["affinity"] == VALUE_SETS["multi-gpu"]["worker"]["affinity"]
    assert multi["runtimeClassName"] == "nvidia"
    cpu = pod_spec(worker(rendered["cpu-only"]))
    assert "nodeSelector" not in cpu and "tolerations" not in cpu


def test_worker_arguments_carry_node_identity_and_cache_sizes(rendered: dict) -> None:
    objects = rendered["multi-gpu"]
    w = container(worker(objects), "worker")
    args = w["args"]
    flag = {args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("--")}
    assert args[0] == "worker"
    assert flag["--node-id"] == "$(NODE_NAME)"
    assert flag["--advertise-address"] == "$(POD_IP):50052"
    assert flag["--disk-cache-gb"] == "3000" and flag["--dram-cache-gb"] == "512"
    assert flag["--cache-dir"] == "/var/cache/ember"
    env = env_of(w)
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # The worker dials the controller's Service on its gRPC port.
    service = one(objects, "Service", f"{RELEASE}-controller")
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert flag["--controller"] == f"{service['metadata']['name']}.{NAMESPACE}.svc:{grpc['port']}"
    shm = next(v for v in pod_spec(worker(objects))["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}


def test_cache_volume_follows_the_switch(rendered: dict) -> None:
    def cache_volume(value_set: str) -> dict:
        return next(v for v in pod_spec(worker(rendered[value_set]))["volumes"] if v["name"] == "cache")

    assert cache_volume("default")["hostPath"] == {"path": "/var/lib/ember/cache", "type": "DirectoryOrCreate"}
    init = pod_spec(worker(rendered["default"]))["initContainers"]
    assert [c["name"] for c in init] == ["cache-permissions"]
    assert init[0]["command"] == ["chown", "10001:10001", "/var/cache/ember"]

    claim = cache_volume("multi-gpu")["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["storageClassName"] == "topolvm-nvme"
    assert claim["resources"]["requests"]["storage"] == "3300Gi"
    assert "initContainers" not in pod_spec(worker(rendered["multi-gpu"]))

    assert cache_volume("cpu-only")["emptyDir"] == {"sizeLimit": "22G"}


def test_probes(rendered: dict) -> None:
    objects = rendered["default"]
    c = container(controller(objects), "controller")
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    for value_set, objs in rendered.items():
        for workload in workloads(objs):
            for cont in pod_spec(workload)["containers"]:
                assert "livenessProbe" in cont and "readinessProbe" in cont, (
                    f"{value_set}: {workload['metadata']['name']}/{cont['name']} lacks a probe"
                )


def test_probe_and_service_ports_name_container_ports(rendered: dict) -> None:
    for value_set, objs in rendered.items():
        pods = {w["metadata"]["name"]: w for w in workloads(objs)}
        for workload in pods.values():
            for cont in pod_spec(workload)["containers"]:
                names = {p["name"] for p in cont.get("ports", [])}
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    handler = cont.get(probe, {})
                    port = (handler.get("httpGet") or handler.get("tcpSocket") or {}).get("port")
                    assert port is None or port in names, f"{value_set}: {cont['name']} {probe} port {port!r}"
        for service in find(objs, "Service"):
            selected = [w for w in pods.values()
                        if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
            assert len(selected) == 1, f"{value_set}: Service {service['metadata']['name']} selects {len(selected)} workloads"
            ports = {p["name"]: p["containerPort"] for c in pod_spec(selected[0])["containers"] for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                target = port["targetPort"]
                assert target in ports or target in ports.values(), (
                    f"{value_set}: Service {service['metadata']['name']} targets {target!r}; the pods expose {ports}"
                )
                if isinstance(target, str):
                    assert ports[target] == port["port"], "service and container port numbers should agree"


def test_selectors_match_pod_labels(rendered: dict) -> None:
    for value_set, objs in rendered.items():
        for workload in workloads(objs):
            selector = workload["spec"]["selector"]["matchLabels"]
            labels = workload["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{value_set}: {workload['metadata']['name']}"
        # No two workloads are selected by one selector (components are distinct).
        selectors = [json.dumps(w["spec"]["selector"], sort_keys=True) for w in workloads(objs)]
        assert len(selectors) == len(set(selectors))
        for pdb in find(objs, "PodDisruptionBudget"):
            matched = [w for w in workloads(objs)
                       if pdb["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
            assert [w["kind"] for w in matched] == ["DaemonSet"]
            assert isinstance(pdb["spec"]["minAvailable"], int), "DaemonSet pods allow only an integer minAvailable"
    assert len(find(rendered["multi-gpu"], "PodDisruptionBudget")) == 1
    assert not find(rendered["default"], "PodDisruptionBudget")


def test_redis_statefulset_keeps_its_data_on_a_claim(rendered: dict) -> None:
    objects = rendered["default"]
    redis = one(objects, "StatefulSet", f"{RELEASE}-redis")
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    mounts = {m["name"]: m["mountPath"] for m in container(redis, "redis")["volumeMounts"]}
    assert mounts["data"] == "/data"
    assert redis["spec"]["serviceName"] == one(objects, "Service", f"{RELEASE}-redis")["metadata"]["name"]
    # The controller reaches it with the generated password, through the Secret.
    data = secret_data(objects)
    assert len(data["redis-password"]) >= 32
    assert data["state-url"] == f"redis://:{data['redis-password']}@{RELEASE}-redis.{NAMESPACE}.svc:6379/0"
    assert secret_data(rendered["cpu-only"])["redis-password"] == "a-fixed-password-0123456789"


def test_external_redis_renders_no_redis_objects(rendered: dict) -> None:
    for value_set in ("external-redis", "existing-secrets"):
        objects = rendered[value_set]
        assert not [o for o in objects if o["metadata"]["name"].endswith("-redis")], value_set
        assert "redis-password" not in secret_data(objects)
    assert secret_data(rendered["external-redis"])["state-url"] == VALUE_SETS["external-redis"]["redis"]["external"]["url"]
    env = env_of(container(controller(rendered["existing-secrets"]), "controller"))
    assert env["EMBER_STATE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "ops-redis", "key": "url"}


def test_controller_arguments(rendered: dict) -> None:
    c = container(controller(rendered["s3-cache-source"]), "controller")
    args = c["args"]
    assert args[:7] == ["controller", "--host", "0.0.0.0", "--port", "8080", "--grpc-port", "50051"]
    assert args[args.index("--state") + 1] == "$(EMBER_STATE_URL)"
    assert "EMBER_STATE_URL" in env_of(c), "$(EMBER_STATE_URL) must name a variable of the container"
    # API keys are enforced: the bootstrap admin key is the Secret's, mounted next to the deployments file.
    assert args[args.index("--admin-key-file") + 1] == "/etc/ember/admin-key"
    assert args[args.index("--deployments-file") + 1] == "/etc/ember/deployments.yaml"
    assert "--kubernetes" in args
    assert "--kubernetes" not in container(controller(rendered["cpu-only"]), "controller")["args"]
    assert controller(rendered["default"])["spec"]["strategy"] == {"type": "Recreate"}


def test_deployments_configmap_is_what_the_controller_reads(rendered: dict, tmp_path: Path) -> None:
    from ember.controller.deployments_file import read_deployments_file

    objects = rendered["s3-cache-source"]
    configmap = one(objects, "ConfigMap", f"{RELEASE}-deployments")
    path = tmp_path / "deployments.yaml"
    path.write_text(configmap["data"]["deployments.yaml"])
    specs = read_deployments_file(path)
    assert [s.name for s in specs] == ["llama-8b", "tiny"]
    assert specs[0].checkpoint == "s3://models/llama-3.1-8b.ember" and specs[0].max_instances == 8
    # Mounted where --deployments-file points, next to the admin key from the Secret.
    spec = pod_spec(controller(objects))
    sources = next(v for v in spec["volumes"] if v["name"] == "config")["projected"]["sources"]
    assert sources[0]["configMap"]["name"] == configmap["metadata"]["name"]
    assert sources[1]["secret"] == {"name": RELEASE, "items": [{"key": "admin-key", "path": "admin-key"}]}
    mount = next(m for m in container(controller(objects), "controller")["volumeMounts"] if m["name"] == "config")
    assert mount == {"name": "config", "mountPath": "/etc/ember", "readOnly": True}
    # A change of deployments restarts the controller (they are applied at start).
    before = controller(rendered["default"])["spec"]["template"]["metadata"]["annotations"]["checksum/deployments"]
    after = controller(objects)["spec"]["template"]["metadata"]["annotations"]["checksum/deployments"]
    assert before != after


CREDENTIAL_NAME = re.compile(r"(key|token|secret|password|passwd|credential|auth)", re.IGNORECASE)


def test_credentials_live_only_in_secrets(rendered: dict) -> None:
    for value_set, objs in rendered.items():
        for configmap in find(objs, "ConfigMap"):
            for key, text in configmap["data"].items():
                assert not CREDENTIAL_NAME.search(key), f"{value_set}: ConfigMap key {key!r}"
                parsed = yaml.safe_load(text)
                flat = json.dumps(parsed)
                assert not re.search(r'"[^"]*(token|secret|password|access_key)[^"]*":', flat, re.IGNORECASE), (
                    f"{value_set}: ConfigMap {configmap['metadata']['name']} holds a credential-looking field"
                )
        # Every credential-looking variable comes from a Secret, never a literal.
        for workload in workloads(objs):
            for cont in pod_spec(workload)["containers"]:
                for env in cont.get("env", []):
                    if CREDENTIAL_NAME.search(env["name"]) or env["name"] in ("EMBER_STATE_URL", "REDIS_PASSWORD"):
                        assert "secretKeyRef" in env.get("valueFrom", {}), f"{value_set}: {cont['name']} {env['name']}"
        # And the literal values given in values.yaml appear in Secrets only.
        secret_values = [v for v in secret_data(objs).values() if len(v) >= 12]
        elsewhere = json.dumps([o for o in objs if o["kind"] != "Secret"])
        for value in secret_values:
            assert value not in elsewhere, f"{value_set}: a secret value leaks outside the Secret"
    s3 = secret_data(rendered["s3-cache-source"])
    assert s3["AWS_ACCESS_KEY_ID"] == "AKIAEXAMPLEKEYID0001"
    for workload in (controller(rendered["s3-cache-source"]), worker(rendered["s3-cache-source"])):
        env = env_of(pod_spec(workload)["containers"][0])
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage.svc:9000"
        assert env["AWS_REGION"]["value"] == "us-east-1"
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": RELEASE, "key": "AWS_SECRET_ACCESS_KEY"}


def test_existing_secrets_are_referenced_not_copied(rendered: dict) -> None:
    objects = rendered["existing-secrets"]
    assert not find(objects, "Secret"), "with every credential in an existing Secret the chart renders none"
    env = env_of(container(worker(objects), "worker"))
    assert env["EMBER_WORKER_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ops-ember-auth", "key": "worker-token"}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "ops-s3", "key": "id"}
    sources = next(v for v in pod_spec(controller(objects))["volumes"] if v["name"] == "config")["projected"]["sources"]
    assert sources[1]["secret"]["name"] == "ops-ember-auth"
    # Without credentials, pods use their own identity: no AWS key variables at all.
    assert "AWS_ACCESS_KEY_ID" not in env_of(container(worker(rendered["default"]), "worker"))


def test_generated_credentials_are_shared_by_controller_and_workers(rendered: dict) -> None:
    objects = rendered["default"]
    data = secret_data(objects)
    assert len(data["admin-key"]) >= 32 and len(data["worker-token"]) >= 32
    assert data["admin-key"] != data["worker-token"]
    for workload in (controller(objects), worker(objects)):
        ref = env_of(pod_spec(workload)["containers"][0])["EMBER_WORKER_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": RELEASE, "key": "worker-token"}


def test_pods_run_as_non_root_with_a_read_only_root(rendered: dict) -> None:
    for value_set, objs in rendered.items():
        for workload in workloads(objs):
            spec = pod_spec(workload)
            where = f"{value_set}: {workload['metadata']['name']}"
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            assert spec["securityContext"]["runAsUser"] > 0, where
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for cont in spec["containers"]:
                sc = cont["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
                assert sc["capabilities"] == {"drop": ["ALL"]}, where
                assert sc.get("runAsUser", 1) != 0 and sc.get("runAsNonRoot", True) is True, where
                assert any(m["mountPath"] == "/tmp" for m in cont["volumeMounts"]), f"{where}: no writable /tmp"
            # The one root container: chown of a hostPath cache directory, with CHOWN and nothing else.
            for init in spec.get("initContainers", []):
                assert init["name"] == "cache-permissions", where
                assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
                assert init["securityContext"]["allowPrivilegeEscalation"] is False
                assert init["command"][0] == "chown"


def test_rbac_is_only_node_list_and_watch(rendered: dict) -> None:
    objects = rendered["default"]
    (role,) = find(objects, "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]}]
    (binding,) = find(objects, "ClusterRoleBinding")
    account = pod_spec(controller(objects))["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert not find(objects, "Role") and not find(objects, "RoleBinding")
    # Workers never call the API; without the node watcher neither does the controller.
    assert pod_spec(worker(objects))["automountServiceAccountToken"] is False
    cpu = rendered["cpu-only"]
    assert not find(cpu, "ClusterRole") and not find(cpu, "ClusterRoleBinding")
    assert pod_spec(controller(cpu))["automountServiceAccountToken"] is False


def test_ingress_routes_http_to_the_controller(rendered: dict) -> None:
    assert not find(rendered["default"], "Ingress")
    (ingress,) = find(rendered["ingress"], "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{RELEASE}-controller", "port": {"name": "http"}}
    assert ingress["spec"]["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]


def test_service_monitors_scrape_controller_and_workers(rendered: dict) -> None:
    assert not find(rendered["default"], "ServiceMonitor")
    monitors = find(rendered["multi-gpu"], "ServiceMonitor")
    assert sorted(m["spec"]["endpoints"][0]["port"] for m in monitors) == ["http", "metrics"]
    assert all(m["metadata"]["labels"]["release"] == "prometheus" for m in monitors)
    metrics = one(rendered["multi-gpu"], "Service", f"{RELEASE}-worker-metrics")
    assert metrics["spec"]["ports"][0]["port"] == 9400


# ---- bad values fail with messages that name the key ---------------------------------------------

BAD_VALUES = [
    ({"worker": {"gpus": -1}}, ["/worker/gpus", "minimum"]),
    ({"worker": {"gpus": "two"}}, ["/worker/gpus", "integer"]),
    ({"worker": {"gpus": 1.5}}, ["/worker/gpus", "integer"]),
    ({"worker": {"gpu": 2}}, ["/worker", "gpu"]),  # misspelt key
    ({"wrker": {"gpus": 2}}, ["wrker"]),
    ({"worker": {"cache": {"type": "nfs"}}}, ["/worker/cache/type", "must be one of 'hostPath', 'localPVC', 'emptyDir'"]),
    ({"controller": {"service": {"type": "Ingress"}}}, ["/controller/service/type"]),
    ({"controller": {"replicas": 2}}, ["/controller/replicas", "maximum"]),
    ({"controller": {"httpPort": 70000}}, ["/controller/httpPort"]),
    ({"worker": {"dramCacheGB": -4}}, ["/worker/dramCacheGB", "minimum"]),
    ({"worker": {"shmSize": "8 GB"}}, ["/worker/shmSize"]),
    ({"redis": {"password": "p@ss/word"}}, ["/redis/password"]),
    ({"deployments": [{"name": "tiny"}]}, ["/deployments/0", "checkpoint"]),
    ({"deployments": [{"name": "tiny", "checkpoint": "s3://m/t", "max_instance": 3}]}, ["/deployments/0", "max_instance"]),
    ({"securityContext": {"runAsUser": 0}}, ["/securityContext/runAsUser", "minimum"]),
    ({"controller": {"tls": {"enable": True}}}, ["/controller/tls", "enable"]),
    ({"controller": {"tls": {"enabled": "yes"}}}, ["/controller/tls/enabled", "boolean"]),
    ({"controller": {"tls": {"enabled": True, "secretName": "My TLS"}}}, ["/controller/tls/secretName", "pattern"]),
    ({"controller": {"checkpointRoots": ["/models"]}}, ["/controller/checkpointRoots/0", "object"]),
    ({"controller": {"checkpointRoots": [{"path": "models", "volume": {"emptyDir": {}}}]}},
     ["/controller/checkpointRoots/0/path", "'models' does not match pattern"]),
    ({"controller": {"checkpointRoots": [{"path": "/models/", "volume": {"emptyDir": {}}}]}},
     ["/controller/checkpointRoots/0/path"]),
    ({"controller": {"checkpointRoots": [{"path": "/", "volume": {"emptyDir": {}}}]}},
     ["/controller/checkpointRoots/0/path"]),
    ({"controller": {"checkpointRoots": [{"path": "/models"}]}}, ["/controller/checkpointRoots/0", "volume"]),
    ({"controller": {"allowedBuckets": ["My_Bucket"]}}, ["/controller/allowedBuckets/0", "'My_Bucket' does not match"]),
    ({"controller": {"allowedBuckets": ["models/prefix"]}}, ["/controller/allowedBuckets/0", "does not match"]),
    ({"controller": {"allowedBuckets": ["s3://models"]}}, ["/controller/allowedBuckets/0", "does not match"]),
    ({"controller": {"allowedBuckets": "models"}}, ["/controller/allowedBuckets", "array"]),
    ({"controller": {"migrationMinGain": -1}}, ["/controller/migrationMinGain", "minimum"]),
    ({"controller": {"migrationMinGain": "fast"}}, ["/controller/migrationMinGain"]),
    ({"controller": {"limits": {"maxBodyBytes": 0}}}, ["/controller/limits/maxBodyBytes", "minimum"]),
    ({"controller": {"limits": {"maxTokens": "lots"}}}, ["/controller/limits/maxTokens"]),
    ({"controller": {"limits": {"rateLimit": 0}}}, ["/controller/limits/rateLimit", "exclusiveMinimum"]),
    ({"controller": {"limits": {"maxStreams": 4}}}, ["/controller/limits", "maxStreams"]),
]


@pytest.mark.parametrize(("values", "expected"), BAD_VALUES, ids=[json.dumps(v) for v, _ in BAD_VALUES])
def test_schema_rejects_bad_values_naming_the_key(values: dict, expected: list[str]) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.validate_schema(values)
        with pytest.raises(helm.HelmError) as render_err:  # an install fails the same way
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
    for text in expected:
        assert text in str(err.value), f"{text!r} not in: {err.value}"
    assert str(err.value).splitlines()[-1] in str(render_err.value)


def test_schema_accepts_every_value_set() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        for values in VALUE_SETS.values():
            chart.validate_schema(values)


BAD_COMBINATIONS = [
    ({"redis": {"enabled": False}}, "no external Redis is given"),
    ({"redis": {"external": {"url": "redis://r:6379/0"}}}, "set redis.enabled=false"),
    ({"s3": {"accessKeyId": "AKIA0000"}}, "go together"),
    ({"s3": {"existingSecret": "x", "accessKeyId": "a", "secretAccessKey": "b"}}, "use one or the other"),
    ({"worker": {"cache": {"type": "localPVC"}}}, "storageClassName is empty"),
    ({"controller": {"tls": {"enabled": True}}}, "controller.tls.secretName is empty: name a Secret of type kubernetes.io/tls"),
    ({"controller": {"limits": {"burst": 20}}}, "burst is set but controller.limits.rateLimit is not"),
    ({"controller": {"checkpointRoots": [{"path": "/models/../etc", "volume": {"emptyDir": {}}}]}},
     "has a '.' or '..' segment"),
    ({"controller": {"checkpointRoots": [{"path": "/etc", "volume": {"emptyDir": {}}}]}}, "overlaps /etc"),
    ({"controller": {"checkpointRoots": [{"path": "/var/cache", "volume": {"emptyDir": {}}}]}},
     "overlaps /var/cache/ember"),
    ({"controller": {"checkpointRoots": [{"path": "/models", "volume": {"emptyDir": {}}},
                                         {"path": "/models", "volume": {"emptyDir": {}}}]}}, "lists \"/models\" twice"),
    ({"deployments": [{"name": "tiny", "checkpoint": "/models/tiny.ember"}]}, "under none of controller.checkpointRoots"),
    ({"controller": {"allowedBuckets": ["models"]}, "deployments": [{"name": "t", "checkpoint": "s3://other/t"}]},
     "does not list"),
]


@pytest.mark.parametrize(("values", "message"), BAD_COMBINATIONS, ids=[m for _, m in BAD_COMBINATIONS])
def test_inconsistent_values_fail_with_a_message(values: dict, message: str) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError, match=message):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)


# ---- TLS, checkpoint restrictions and limits -----------------------------------------------------


def parse_controller_args(args: list[str]) -> dict[str, Any]:
    """The controller's container args parsed by the real `ember controller` command (not run)."""
    import typer

    from ember.cli.main import app

    assert args[0] == "controller"
    command = typer.main.get_command(app).commands["controller"]
    return command.make_context("controller", list(args[1:])).params


def volume(workload: dict, name: str) -> dict:
    return next(v for v in pod_spec(workload)["volumes"] if v["name"] == name)


def mount(cont: dict, name: str) -> dict:
    return next(m for m in cont["volumeMounts"] if m["name"] == name)


def test_tls_mounts_the_secret_and_serves_probes_over_https(rendered: dict) -> None:
    objects = rendered["hardened"]
    c = container(controller(objects), "controller")
    params = parse_controller_args(c["args"])
    tls_volume = volume(controller(objects), "tls")
    assert tls_volume["secret"]["secretName"] == "ember-controller-tls"
    # Readable by the container's group (fsGroup) only, not by the world.
    assert tls_volume["secret"]["defaultMode"] == 0o440
    files = {item["key"]: item["path"] for item in tls_volume["secret"]["items"]}
    tls_mount = mount(c, "tls")
    assert tls_mount["readOnly"] is True
    assert str(params["tls_cert"]) == f"{tls_mount['mountPath']}/{files['tls.crt']}"
    assert str(params["tls_key"]) == f"{tls_mount['mountPath']}/{files['tls.key']}"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS", probe
        assert c[probe]["httpGet"]["port"] == "http"
    # Without TLS: plain HTTP probes and no certificate anywhere.
    plain = container(controller(rendered["default"]), "controller")
    assert all("scheme" not in plain[p]["httpGet"] for p in ("startupProbe", "livenessProbe", "readinessProbe"))
    assert "--tls-cert" not in plain["args"] and "tls" not in {v["name"] for v in pod_spec(controller(rendered["default"]))["volumes"]}


def test_workers_trust_the_controller_ca_under_the_name_they_dial(rendered: dict) -> None:
    for value_set, ca_key in (("hardened", "ca.crt"), ("tls-self-signed", "tls.crt")):
        objects = rendered[value_set]
        w = container(worker(objects), "worker")
        ca_volume = volume(worker(objects), "controller-ca")["secret"]
        secret = VALUE_SETS[value_set]["controller"]["tls"]["secretName"]
        # Only the CA (or the self-signed certificate): the private key never reaches a worker.
        assert ca_volume == {"secretName": secret, "items": [{"key": ca_key, "path": "ca.crt"}]}
        ca_mount = mount(w, "controller-ca")
        assert ca_mount["readOnly"] is True
        assert env_of(w)["EMBER_CONTROLLER_CA"]["value"] == f"{ca_mount['mountPath']}/ca.crt"
        # gRPC checks the certificate against the host in --controller: the Service's DNS name.
        args = w["args"]
        host = args[args.index("--controller") + 1].rsplit(":", 1)[0]
        assert host == f"{RELEASE}-controller.{NAMESPACE}.svc"
    plain = container(worker(rendered["default"]), "worker")
    assert "EMBER_CONTROLLER_CA" not in env_of(plain)
    assert "controller-ca" not in {m["name"] for m in plain["volumeMounts"]}


def test_the_ca_may_come_from_its_own_secret() -> None:
    objects = render({"controller": {"tls": {"enabled": True, "secretName": "ember-tls",
                                             "ca": {"secretName": "corp-root-ca", "key": "root.pem"}}},
                      "monitoring": {"serviceMonitor": {"enabled": True}}})
    assert volume(worker(objects), "controller-ca")["secret"]["secretName"] == "corp-root-ca"
    assert volume(controller(objects), "tls")["secret"]["secretName"] == "ember-tls"
    monitor = one(objects, "ServiceMonitor", f"{RELEASE}-controller")
    assert monitor["spec"]["endpoints"][0]["tlsConfig"]["ca"] == {"secret": {"name": "corp-root-ca", "key": "root.pem"}}


def test_checkpoint_roots_are_flags_and_mounted_read_only_in_controller_and_workers(rendered: dict) -> None:
    objects = rendered["hardened"]
    roots = VALUE_SETS["hardened"]["controller"]["checkpointRoots"]
    params = parse_controller_args(container(controller(objects), "controller")["args"])
    assert [str(p) for p in params["checkpoint_root"]] == [r["path"] for r in roots]
    # The controller checks a checkpoint under the path a worker then loads it from: both pods
    # mount every root at the same path from the same volume source.
    for workload in (controller(objects), worker(objects)):
        cont = pod_spec(workload)["containers"][0]
        mounted = {m["mountPath"]: m for m in cont["volumeMounts"]}
        for root in roots:
            m = mounted[root["path"]]
            assert m["readOnly"] is True
            source = {k: v for k, v in volume(workload, m["name"]).items() if k != "name"}
            assert source == root["volume"], workload["metadata"]["name"]
    for value_set in ("default", "tls-self-signed"):
        assert parse_controller_args(container(controller(rendered[value_set]), "controller")["args"])["checkpoint_root"] == []


def test_buckets_and_limits_become_the_controller_configuration(rendered: dict) -> None:
    from ember.cli.controller_commands import _limits

    params = parse_controller_args(container(controller(rendered["hardened"]), "controller")["args"])
    assert params["allowed_bucket"] == ["models", "team-a.checkpoints"]
    limits = _limits(params["max_body_bytes"], params["max_tokens_cap"], params["rate_limit"], params["burst"],
                     params["max_streams_per_key"])
    limits.validate()
    assert (limits.max_body_bytes, limits.max_tokens, limits.rate_per_s, limits.burst, limits.max_streams_per_key) == (
        8388608, 4096, 2.5, 10, 4)
    # Unset limits pass no flag: the controller's own defaults apply.
    default = container(controller(rendered["default"]), "controller")["args"]
    limit_flags = {"--max-body-bytes", "--max-tokens-cap", "--rate-limit", "--burst", "--max-streams-per-key",
                   "--allowed-bucket", "--checkpoint-root"}
    assert not limit_flags & set(default)
    self_signed = container(controller(rendered["tls-self-signed"]), "controller")["args"]
    assert limit_flags & set(self_signed) == {"--max-tokens-cap"}
    assert not parse_controller_args(default)["allowed_bucket"]  # `ember controller` then admits any bucket


def test_the_migration_gain_threshold_becomes_the_controller_flag(rendered: dict) -> None:
    from ember.controller.config import DEFAULT_MIGRATION_MIN_GAIN_S

    hardened = container(controller(rendered["hardened"]), "controller")["args"]
    assert hardened[hardened.index("--migration-min-gain") + 1] == "0.5"
    assert parse_controller_args(hardened)["migration_min_gain"] == 0.5
    default = container(controller(rendered["default"]), "controller")["args"]
    assert "--migration-min-gain" not in default  # null: the controller's own default applies
    assert parse_controller_args(default)["migration_min_gain"] == DEFAULT_MIGRATION_MIN_GAIN_S
    zero = container(controller(render({"controller": {"migrationMinGain": 0}})), "controller")["args"]
    assert parse_controller_args(zero)["migration_min_gain"] == 0.0  # 0 is a value, not "unset"


CANDIDATE_CHECKPOINTS = [
    "/models/llama.ember", "/models", "/models-old/llama.ember", "/mnt/nfs/checkpoints/a/b.ember",
    "/mnt/nfs/other.ember", "/etc/passwd", "file:///models/x.ember", "file:///var/lib/x.ember", "relative/x.ember",
    "s3://models/x.ember", "s3://team-a.checkpoints/y", "s3://other-bucket/z", "s3://models",
]


@pytest.mark.parametrize("checkpoint", CANDIDATE_CHECKPOINTS)
def test_chart_admits_exactly_the_deployments_the_controller_admits(checkpoint: str) -> None:
    """A deployment the controller would refuse (403) fails the install, rather than being logged
    and skipped at every start; one it accepts renders."""
    from ember.controller.checkpoint_policy import CheckpointForbidden, CheckpointPolicy

    controller_values = {k: VALUE_SETS["hardened"]["controller"][k] for k in ("checkpointRoots", "allowedBuckets")}
    policy = CheckpointPolicy([Path(r["path"]) for r in controller_values["checkpointRoots"]],
                              controller_values["allowedBuckets"])
    try:
        policy.check(checkpoint)
        admitted = True
    except CheckpointForbidden:
        admitted = False
    values = {"controller": controller_values, "deployments": [{"name": "m", "checkpoint": checkpoint}]}
    if admitted:
        render(values)
    else:
        with pytest.raises(helm.HelmError, match="controller.(checkpointRoots|allowedBuckets)"):
            render(values)


def test_the_documented_hardened_example_renders_valid_objects() -> None:
    """docs/kubernetes.md's hardened-values.yaml is what users copy: it must install as written."""
    text = (CHART.parent.parent / "docs" / "kubernetes.md").read_text()
    match = re.search(r"```yaml\n(# hardened-values\.yaml\n.*?)```", text, re.DOTALL)
    assert match, "docs/kubernetes.md lost its hardened-values.yaml example"
    objects = render(yaml.safe_load(match.group(1)))
    for obj in objects:
        if not obj["apiVersion"].startswith(CRD_API_GROUPS):
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    args = container(controller(objects), "controller")["args"]
    assert {"--tls-cert", "--checkpoint-root", "--allowed-bucket", "--rate-limit"} <= set(args)
