"""Kubernetes manifests under cluster/: valid against the KubeRay v1.7.0 CRDs, and safe by the project's rules.

Fast (a few seconds; one `--dry-run` subprocess). Nothing here talks to a Kubernetes cluster.

Schema validation. Each RayJob / RayCluster document is validated with `jsonschema` against
`spec.versions[name == "v1"].schema.openAPIV3Schema` of its CRD (shared/kuberay/crd, next to the repository;
the schema tests skip when that directory is absent). An OpenAPI v3 structural schema is not quite JSON Schema,
so it is translated first (`to_json_schema`):

* `x-kubernetes-int-or-string: true` -> `anyOf: [integer, string]` (KubeRay's generator already writes the anyOf
  next to the flag; the translation adds it where it is missing and drops any `type`).
* `nullable: true` -> the type also admits null.
* `format: int32 / int64` are checked as integer ranges (jsonschema does not know these formats).
* Unknown fields: the CRD schema never says `additionalProperties: false`; the API server prunes unknown fields
  (or rejects them under strict field validation). Every object node that lists `properties` (and is not
  `x-kubernetes-preserve-unknown-fields`) is therefore closed with `additionalProperties: false`, which makes a
  misspelt key anywhere (e.g. `shutdownAfterJobFinish`, `resource:` in a container) a validation error.
* `x-kubernetes-validations` (CEL rules) cannot be evaluated here and are dropped; the other `x-kubernetes-*`
  list/map annotations do not constrain a single document and are dropped too.
* The v1.7.0 CRD leaves `spec.submissionMode` a free string (the operator checks it at run time), so the enum of
  KubeRay's API reference (K8sJobMode, HTTPMode, InteractiveMode, SidecarMode) is added; `apiVersion` and `kind`
  are pinned; `metadata.name` must be a DNS-1123 subdomain.

Negative tests corrupt copies of the real manifests and assert that validation (or a policy check) fails.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRD_DIR = ROOT.parent / "shared" / "kuberay" / "crd"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
IMAGE_REPO_DIR = "/workspace/eopd-ray"  # WORKDIR of cluster/Dockerfile: where the repository is in the image
SUBMISSION_MODES = ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL", re.IGNORECASE)
EXPOSED_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
INT_RANGES = {"int32": (-(2 ** 31), 2 ** 31 - 1), "int64": (-(2 ** 63), 2 ** 63 - 1)}
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------

def manifest_files() -> list[Path]:
    return sorted(p for p in CLUSTER.iterdir() if p.suffix in (".yaml", ".yml"))


@lru_cache(maxsize=None)
def _docs_of(path: Path) -> tuple:
    return tuple(d for d in yaml.load_all(path.read_text(), Loader=Loader) if d is not None)


def all_docs() -> list[tuple[str, dict]]:
    """(file name, document) for every YAML document under cluster/."""
    return [(p.name, copy.deepcopy(d)) for p in manifest_files() for d in _docs_of(p)]


def ray_docs() -> list[tuple[str, dict]]:
    return [(name, d) for name, d in all_docs() if d.get("kind") in CRD_FILES]


def the_doc(kind: str) -> dict:
    docs = [d for _, d in all_docs() if d.get("kind") == kind]
    assert len(docs) == 1, f"expected exactly one {kind} under cluster/, found {len(docs)}"
    return docs[0]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


# ---------------------------------------------------------------------------------------------------------------
# OpenAPI v3 (structural CRD schema) -> JSON Schema
# ---------------------------------------------------------------------------------------------------------------

def to_json_schema(node, strict: bool = True):
    """Translate a CRD openAPIV3Schema node into Draft 7 JSON Schema (see the module docstring)."""
    if isinstance(node, list):
        return [to_json_schema(x, strict) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v, strict) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-embedded-resource")
    if strict and "properties" in node and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def crd_openapi_schema(kind: str) -> dict:
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=Loader)
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@lru_cache(maxsize=None)
def json_schema(kind: str) -> dict:
    schema = to_json_schema(crd_openapi_schema(kind))
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    props = schema["properties"]
    props["apiVersion"] = {"type": "string", "enum": ["ray.io/v1"]}
    props["kind"] = {"type": "string", "enum": [kind]}
    props["metadata"] = {
        "type": "object", "required": ["name"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN},
                       "namespace": {"type": "string", "pattern": DNS1123_SUBDOMAIN},
                       "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                       "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
    if kind == "RayJob":
        mode = props["spec"]["properties"]["submissionMode"]
        mode.setdefault("enum", SUBMISSION_MODES)
    return schema


def validator(kind: str):
    jsonschema = pytest.importorskip("jsonschema", reason="schema tests need the jsonschema package")
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (shared/kuberay/crd next to the repository)")
    checker = jsonschema.FormatChecker()
    for fmt, (lo, hi) in INT_RANGES.items():
        checker.checks(fmt)(lambda v, lo=lo, hi=hi: not isinstance(v, int) or isinstance(v, bool) or lo <= v <= hi)
    return jsonschema.Draft7Validator(json_schema(kind), format_checker=checker)


def schema_errors(doc: dict) -> list[str]:
    v = validator(doc["kind"])
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


# ---------------------------------------------------------------------------------------------------------------
# project policy checks: each returns a list of problems (empty = fine), so the negative tests can call them
# ---------------------------------------------------------------------------------------------------------------

def walk(node, path=""):
    """Yield (path, dict) for every mapping in a document."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def containers(doc: dict):
    """(path, container) for every container / initContainer in any pod template of the document."""
    for path, node in walk(doc):
        for key in ("containers", "initContainers"):
            for i, c in enumerate(node.get(key) or []):
                if isinstance(c, dict) and "image" in c:
                    yield f"{path}/{key}[{i}]({c.get('name')})", c


def exposure_problems(doc: dict) -> list[str]:
    """No LoadBalancer / NodePort Service and no Ingress, however declared."""
    problems = []
    if doc.get("kind") == "Ingress":
        problems.append("an Ingress exposes the cluster")
    for path, node in walk(doc):
        for key in ("type", "serviceType"):
            if node.get(key) in EXPOSED_SERVICE_TYPES:
                problems.append(f"{path}/{key}: {node[key]} exposes a Service outside the cluster")
        if node.get("enableIngress") is True:
            problems.append(f"{path}/enableIngress: true exposes the dashboard through an Ingress")
    return problems


def secret_env_problems(doc: dict) -> list[str]:
    """Env vars named like credentials come from a Secret (valueFrom.secretKeyRef), never a literal value."""
    problems = []
    for path, node in walk(doc):
        for i, env in enumerate(node.get("env") or [] if isinstance(node.get("env"), list) else []):
            if not isinstance(env, dict) or not SECRET_NAME.search(str(env.get("name", ""))):
                continue
            if "value" in env:
                problems.append(f"{path}/env[{i}] {env['name']}: plaintext `value:`; use valueFrom.secretKeyRef")
            elif "secretKeyRef" not in (env.get("valueFrom") or {}):
                problems.append(f"{path}/env[{i}] {env['name']}: must come from valueFrom.secretKeyRef")
    if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        problems.append("a Secret with data is committed under cluster/; create it with kubectl instead")
    runtime_env = (doc.get("spec") or {}).get("runtimeEnvYAML") if doc.get("kind") == "RayJob" else None
    if runtime_env:
        env_vars = (yaml.safe_load(runtime_env) or {}).get("env_vars") or {}
        problems += [f"runtimeEnvYAML env_vars {k}: a credential in plain text" for k in env_vars
                     if SECRET_NAME.search(k)]
    return problems


def _quantity(q) -> float:
    return float(str(q).rstrip("m")) / 1000 if str(q).endswith("m") else float(q)


def resource_problems(doc: dict) -> list[str]:
    """Every container (and the autoscaler sidecar) has cpu and memory requests and limits."""
    problems = []
    items = list(containers(doc))
    if doc.get("kind") in CRD_FILES and cluster_spec(doc).get("enableInTreeAutoscaling"):
        items.append(("autoscalerOptions", cluster_spec(doc).get("autoscalerOptions") or {}))
    for path, c in items:
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for name in ("cpu", "memory"):
                if name not in (res.get(part) or {}):
                    problems.append(f"{path}: resources.{part}.{name} missing")
        if "cpu" in (res.get("requests") or {}) and "cpu" in (res.get("limits") or {}):
            if _quantity(res["requests"]["cpu"]) > _quantity(res["limits"]["cpu"]):
                problems.append(f"{path}: cpu request above its limit")
    return problems


def gpu_problems(doc: dict) -> list[str]:
    """The head requests no GPU; every worker group is a GPU group: nvidia.com/gpu requested = limited > 0."""
    spec = cluster_spec(doc)
    problems = []
    for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
        for part in ("requests", "limits"):
            if "nvidia.com/gpu" in ((c.get("resources") or {}).get(part) or {}):
                problems.append(f"head container {c['name']}: requests a GPU")
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append("no worker group")
    for g in groups:
        c = g["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container
        res = c.get("resources") or {}
        req, lim = (res.get("requests") or {}).get("nvidia.com/gpu"), (res.get("limits") or {}).get("nvidia.com/gpu")
        if lim is None or req is None:
            problems.append(f"worker group {g['groupName']}: nvidia.com/gpu must be in requests and limits")
        elif int(req) != int(lim) or int(lim) < 1:
            problems.append(f"worker group {g['groupName']}: nvidia.com/gpu request {req} != limit {lim}, or < 1")
    return problems


def dashboard_problems(doc: dict) -> list[str]:
    """The rule for the head's dashboard (it accepts job submissions, i.e. runs arbitrary code):

    * `dashboard-host` must be set explicitly.
    * It may be a non-loopback address (0.0.0.0 = every interface of the pod) only when nothing exposes the pod
      beyond the Kubernetes cluster: `serviceType` absent or ClusterIP, `headService.spec.type` absent or
      ClusterIP, and no Ingress. Pod IPs and ClusterIP Services are reachable only inside the cluster network.
    * Loopback is always allowed for a RayCluster (reach it with `kubectl port-forward pod/...`), but not for a
      RayJob in K8sJobMode/HTTPMode: the submitter and the operator reach the dashboard through the head Service,
      and a dashboard bound to 127.0.0.1 would make every submission fail.
    """
    head = cluster_spec(doc)["headGroupSpec"]
    host = (head.get("rayStartParams") or {}).get("dashboard-host")
    if host is None:
        return ["headGroupSpec.rayStartParams.dashboard-host is not set (KubeRay's default is 0.0.0.0)"]
    if host in LOOPBACK:
        mode = doc["spec"].get("submissionMode", "K8sJobMode") if doc["kind"] == "RayJob" else None
        if mode in ("K8sJobMode", "HTTPMode"):
            return [f"dashboard-host {host}: the {mode} submitter cannot reach the dashboard through the Service"]
        return []
    svc = head.get("serviceType", "ClusterIP")
    svc_spec_type = ((head.get("headService") or {}).get("spec") or {}).get("type", "ClusterIP")
    if svc != "ClusterIP" or svc_spec_type != "ClusterIP" or head.get("enableIngress"):
        return [f"dashboard-host {host} with a head Service of type {svc}/{svc_spec_type} or an Ingress "
                "exposes job submission outside the cluster"]
    return []


def volume_problems(doc: dict, claims: set[str]) -> list[str]:
    """Head and workers mount /checkpoints and /data from the claims in cluster/pvc.yaml, and /dev/shm in memory."""
    spec = cluster_spec(doc)
    templates = [("head", spec["headGroupSpec"]["template"])] + \
        [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs") or []]
    problems = []
    for name, tmpl in templates:
        vols = {v["name"]: v for v in tmpl["spec"].get("volumes") or []}
        mounts = {m["mountPath"]: m["name"] for m in tmpl["spec"]["containers"][0].get("volumeMounts") or []}
        for path in ("/checkpoints", "/data"):
            vol = vols.get(mounts.get(path), {})
            claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
            if claim not in claims:
                problems.append(f"{name}: {path} is not a PersistentVolumeClaim from cluster/pvc.yaml ({claim})")
        shm = vols.get(mounts.get("/dev/shm"), {}).get("emptyDir") or {}
        if shm.get("medium") != "Memory":
            problems.append(f"{name}: /dev/shm is not an emptyDir with medium Memory")
    return problems


def all_policy_problems(doc: dict, claims: set[str]) -> list[str]:
    problems = exposure_problems(doc) + secret_env_problems(doc) + resource_problems(doc)
    if doc.get("kind") in CRD_FILES:
        problems += gpu_problems(doc) + dashboard_problems(doc) + volume_problems(doc, claims)
    return problems


def pvc_claims() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in all_docs() if d.get("kind") == "PersistentVolumeClaim"}


# ---------------------------------------------------------------------------------------------------------------
# the manifests as written
# ---------------------------------------------------------------------------------------------------------------

def test_cluster_dir_has_the_expected_manifests():
    kinds = sorted(d.get("kind", "?") for _, d in all_docs())
    assert kinds.count("RayJob") == 1 and kinds.count("RayCluster") == 1, kinds
    assert kinds.count("PersistentVolumeClaim") == 2, kinds
    assert (CLUSTER / "Dockerfile").is_file()


@pytest.mark.parametrize("name,doc", ray_docs(), ids=lambda x: x if isinstance(x, str) else x.get("kind"))
def test_ray_manifest_matches_the_kuberay_crd(name, doc):
    errors = schema_errors(doc)
    assert not errors, f"{name} does not match the KubeRay v1.7.0 CRD:\n" + "\n".join(errors)


@pytest.mark.parametrize("name,doc", all_docs(), ids=lambda x: x if isinstance(x, str) else x.get("kind"))
def test_manifest_policies(name, doc):
    problems = all_policy_problems(doc, set(pvc_claims()))
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_pvcs_are_shared_between_pods():
    claims = pvc_claims()
    assert set(claims) == {"eopd-checkpoints", "eopd-data"}
    for name, pvc in claims.items():
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], f"{name}: head and workers mount it from many nodes"
        assert pvc["spec"]["resources"]["requests"]["storage"]


def test_rayjob_lifecycle_fields():
    spec = the_doc("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] >= 1, "a failed run should be retried (and resume)"
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    rc = spec["rayClusterSpec"]
    assert rc["enableInTreeAutoscaling"] is True
    for g in rc["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert g["minReplicas"] >= 1, "the job's own cluster starts with its GPU pod, not after an autoscaler round"


def test_interactive_cluster_has_the_same_groups_as_the_rayjob():
    """raycluster.yaml = rayjob.yaml's cluster, except for how many GPU pods it starts with."""
    job = copy.deepcopy(the_doc("RayJob")["spec"]["rayClusterSpec"])
    interactive = copy.deepcopy(the_doc("RayCluster")["spec"])
    for spec in (job, interactive):
        for g in spec["workerGroupSpecs"]:
            g.pop("replicas"), g.pop("minReplicas")
    assert interactive == job


def test_every_image_is_the_same():
    images = {c["image"] for _, d in all_docs() for _, c in containers(d)}
    assert len(images) == 1, f"one image for head, workers, submitter and helper pod: {images}"
    rc = the_doc("RayJob")["spec"]["rayClusterSpec"]
    assert "image" not in rc["autoscalerOptions"], "the autoscaler uses the head image (same Ray version)"


def test_dockerfile():
    text = (CLUSTER / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert re.search(r"^FROM \S*(nvidia/cuda|rayproject/ray)", text, re.M) or "CUDA_IMAGE=nvidia/cuda" in text
    assert "HF_HOME=/data/hf" in text and "RAY_USAGE_STATS_ENABLED=0" in text
    assert 'pip install -e ".[gpu]"' in text
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] in ("${APP_UID}:${APP_UID}", "1000:1000", "1000", "ray"), users
    assert "ARG APP_UID=1000" in text or users[-1].startswith("1000")
    assert f"ARG APP_DIR={IMAGE_REPO_DIR}" in text and "WORKDIR ${APP_DIR}" in text
    for ln in lines:
        if ln.startswith(("ENV ", "ARG ")) or (ln.endswith("\\") and "=" in ln):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", ln)
            assert not [n for n in names if SECRET_NAME.search(n)], f"credential baked into the image: {ln}"
    ray_version = re.search(r"ARG RAY_VERSION=(\S+)", text).group(1)
    for _, doc in ray_docs():
        assert cluster_spec(doc)["rayVersion"] == ray_version, "image Ray == rayVersion of the cluster"
    assert (CLUSTER / "Dockerfile.dockerignore").is_file()
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".git" in ignored and "runs" in ignored


def _entrypoint_argv() -> list[str]:
    argv = shlex.split(the_doc("RayJob")["spec"]["entrypoint"])
    assert argv[0] == "python", argv
    return argv


def _in_repo(path: str) -> Path:
    """A path inside the image's copy of the repository -> the same file in this checkout."""
    if path.startswith(IMAGE_REPO_DIR + "/"):
        return ROOT / path[len(IMAGE_REPO_DIR) + 1:]
    return ROOT / path


def test_rayjob_entrypoint_preset_passes_dry_run():
    argv = _entrypoint_argv()
    script = _in_repo(argv[1])
    assert script == ROOT / "examples" / "train_eopd.py" and script.is_file(), argv[1]
    assert "--config" in argv, "the RayJob runs a preset"
    preset = _in_repo(argv[argv.index("--config") + 1])
    assert preset.is_file() and preset.parent == ROOT / "examples" / "configs", preset
    args = [str(preset) if a == argv[argv.index("--config") + 1] else a for a in argv[2:]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(script), *args, "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads(proc.stdout)
    # Everything the run writes lands on the checkpoints volume; every input it reads is on the data volume.
    assert cfg["out_dir"].startswith("/checkpoints/"), cfg["out_dir"]
    for key in ("train_path", "eval_path"):
        assert cfg["data"][key] == "" or cfg["data"][key].startswith("/data/"), cfg["data"][key]
    # A retry reruns the same command: it must continue from the newest checkpoint, and start fresh on the
    # first attempt (`--resume DIR` refuses a DIR without checkpoints, so auto_resume is what makes this work).
    assert cfg.get("auto_resume") is True or "--resume" in argv
    assert cfg["rollout"]["engine"] == "vllm", "the RayJob runs a GPU preset"


def _gpus_and_cpus_needed(cfg) -> tuple[int, float]:
    """One GPU per rollout worker, teacher worker and student rank (the planned GPU path); their Ray CPUs."""
    gpus = cfg.rollout.num_workers + cfg.teacher.num_workers + cfg.trainer.num_ranks
    cpus = (cfg.rollout.num_workers * cfg.rollout.num_cpus + cfg.teacher.num_workers * cfg.teacher.num_cpus
            + cfg.trainer.num_ranks * cfg.trainer.num_cpus)
    return gpus, cpus


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "examples" / "configs").glob("*.yaml")
                                          if not p.name.startswith("tiny")))
def test_worker_group_can_hold_every_paper_preset(preset):
    from eopd_ray.config import load_config

    gpus, cpus = _gpus_and_cpus_needed(load_config(str(ROOT / "examples" / "configs" / preset)))
    for _, doc in ray_docs():
        groups = cluster_spec(doc)["workerGroupSpecs"]
        limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups]
        gpu_cap = sum(int(lim["nvidia.com/gpu"]) * g["maxReplicas"] for g, lim in zip(groups, limits))
        cpu_cap = sum(_quantity(lim["cpu"]) * g["maxReplicas"] for g, lim in zip(groups, limits))
        assert gpus <= gpu_cap and cpus <= cpu_cap, f"{preset}: needs {gpus} GPUs / {cpus} CPUs, " \
            f"{doc['kind']} scales to {gpu_cap} / {cpu_cap}"


def test_kustomization_renders_with_the_image_override(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) not installed")
    work = tmp_path / "cluster"
    shutil.copytree(CLUSTER, work)
    kust = work / "kustomization.yaml"
    data = yaml.safe_load(kust.read_text())
    data["images"] = [{"name": data["images"][0]["name"], "newName": "example.org/me/eopd", "newTag": "t1"}]
    kust.write_text(yaml.safe_dump(data))
    proc = subprocess.run([kubectl, "kustomize", str(work)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rendered = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert sorted(d["kind"] for d in rendered) == ["PersistentVolumeClaim", "PersistentVolumeClaim", "RayJob"]
    images = {c["image"] for d in rendered for _, c in containers(d)}
    assert images == {"example.org/me/eopd:t1"}, images


# ---------------------------------------------------------------------------------------------------------------
# negative tests: a corrupted copy must fail
# ---------------------------------------------------------------------------------------------------------------

def _corrupt(kind: str, mutate) -> dict:
    doc = copy.deepcopy(the_doc(kind))
    mutate(doc)
    return doc


def _rayjob_workers(doc):
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]


def _rayjob_head(doc):
    return doc["spec"]["rayClusterSpec"]["headGroupSpec"]


SCHEMA_BREAKERS = {
    "backoffLimit is a string": ("RayJob", lambda d: d["spec"].__setitem__("backoffLimit", "three")),
    "backoffLimit overflows int32": ("RayJob", lambda d: d["spec"].__setitem__("backoffLimit", 2 ** 31)),
    "backoffLimit is a boolean": ("RayJob", lambda d: d["spec"].__setitem__("backoffLimit", True)),
    "unknown submissionMode": ("RayJob", lambda d: d["spec"].__setitem__("submissionMode", "K8sJob")),
    "misspelt top-level field": ("RayJob", lambda d: d["spec"].__setitem__(
        "shutdownAfterJobFinish", d["spec"].pop("shutdownAfterJobFinishes"))),
    "misspelt field in a container": ("RayJob", lambda d: _rayjob_workers(d)[0]["template"]["spec"]["containers"][0]
                                      .__setitem__("resource", {})),
    "misspelt field in metadata": ("RayJob", lambda d: d["metadata"].__setitem__("lables", {})),
    "rayStartParams value not a string": ("RayJob", lambda d: _rayjob_head(d)["rayStartParams"]
                                          .__setitem__("num-cpus", 0)),
    "quantity is neither int nor string": ("RayJob", lambda d: _rayjob_workers(d)[0]["template"]["spec"]
                                           ["containers"][0]["resources"]["limits"].__setitem__("cpu", [64])),
    "quantity string is malformed": ("RayJob", lambda d: _rayjob_workers(d)[0]["template"]["spec"]
                                     ["containers"][0]["resources"]["limits"].__setitem__("memory", "512 GB")),
    "unknown autoscaler version": ("RayJob", lambda d: d["spec"]["rayClusterSpec"]["autoscalerOptions"]
                                   .__setitem__("version", "v3")),
    "worker group without groupName": ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName")),
    "RayCluster without headGroupSpec": ("RayCluster", lambda d: d["spec"].pop("headGroupSpec")),
    "wrong apiVersion": ("RayCluster", lambda d: d.__setitem__("apiVersion", "ray.io/v1alpha1")),
    "invalid name": ("RayCluster", lambda d: d["metadata"].__setitem__("name", "EOPD_Interactive")),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_BREAKERS))
def test_schema_rejects_a_broken_copy(case):
    kind, mutate = SCHEMA_BREAKERS[case]
    assert not schema_errors(the_doc(kind)), "the unmodified manifest must be valid"
    assert schema_errors(_corrupt(kind, mutate)), f"{case}: the corrupted manifest was accepted"


def test_int_or_string_translation():
    jsonschema = pytest.importorskip("jsonschema")
    node = {"type": "object", "properties": {"port": {"x-kubernetes-int-or-string": True},
                                            "n": {"type": "integer", "nullable": True}}}
    v = jsonschema.Draft7Validator(to_json_schema(node))
    for ok in ({"port": 8265}, {"port": "dashboard"}, {"n": None}, {"n": 3}):
        assert v.is_valid(ok), ok
    for bad in ({"port": 1.5}, {"port": True}, {"port": None}, {"n": "3"}, {"prot": 1}):
        assert not v.is_valid(bad), bad
    preserved = dict(node, **{"x-kubernetes-preserve-unknown-fields": True})
    assert jsonschema.Draft7Validator(to_json_schema(preserved)).is_valid({"anything": 1})


def _set_env(doc, entry):
    _rayjob_head(doc)["template"]["spec"]["containers"][0]["env"].append(entry)


POLICY_BREAKERS = {
    "NodePort head service": (lambda d: _rayjob_head(d).__setitem__("serviceType", "NodePort"), "exposes"),
    "LoadBalancer via headService": (lambda d: _rayjob_head(d).__setitem__(
        "headService", {"spec": {"type": "LoadBalancer"}}), "exposes"),
    "ingress enabled": (lambda d: _rayjob_head(d).__setitem__("enableIngress", True), "Ingress"),
    "dashboard on loopback for a RayJob": (lambda d: _rayjob_head(d)["rayStartParams"].__setitem__(
        "dashboard-host", "127.0.0.1"), "cannot reach"),
    "dashboard-host unset": (lambda d: _rayjob_head(d)["rayStartParams"].pop("dashboard-host"), "not set"),
    "plaintext token": (lambda d: _set_env(d, {"name": "HF_TOKEN", "value": "hf_abc"}), "plaintext"),
    "api key from a ConfigMap": (lambda d: _set_env(d, {"name": "WANDB_API_KEY", "valueFrom": {
        "configMapKeyRef": {"name": "cfg", "key": "k"}}}), "secretKeyRef"),
    "secret in runtimeEnvYAML": (lambda d: d["spec"].__setitem__(
        "runtimeEnvYAML", "env_vars:\n  HF_TOKEN: hf_abc\n"), "plain text"),
    "worker without limits": (lambda d: _rayjob_workers(d)[0]["template"]["spec"]["containers"][0]["resources"]
                              .pop("limits"), "limits"),
    "submitter without requests": (lambda d: d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
                                   ["resources"].pop("requests"), "requests"),
    "autoscaler without resources": (lambda d: d["spec"]["rayClusterSpec"]["autoscalerOptions"]
                                     .pop("resources"), "autoscalerOptions"),
    "GPU group without GPUs": (lambda d: [r.pop("nvidia.com/gpu") for r in _rayjob_workers(d)[0]["template"]
                                          ["spec"]["containers"][0]["resources"].values()], "nvidia.com/gpu"),
    "GPU on the head": (lambda d: _rayjob_head(d)["template"]["spec"]["containers"][0]["resources"]["limits"]
                        .__setitem__("nvidia.com/gpu", 1), "head container"),
    "checkpoints not on a PVC": (lambda d: _rayjob_workers(d)[0]["template"]["spec"]["volumes"][0].__setitem__(
        "persistentVolumeClaim", {"claimName": "elsewhere"}), "/checkpoints"),
    "shm on disk": (lambda d: _rayjob_head(d)["template"]["spec"]["volumes"][2]["emptyDir"].pop("medium"),
                    "/dev/shm"),
}


@pytest.mark.parametrize("case", sorted(POLICY_BREAKERS))
def test_policy_rejects_a_broken_copy(case):
    mutate, expected = POLICY_BREAKERS[case]
    claims = set(pvc_claims())
    assert not all_policy_problems(the_doc("RayJob"), claims)
    problems = all_policy_problems(_corrupt("RayJob", mutate), claims)
    assert any(expected in p for p in problems), f"{case}: expected a problem mentioning {expected!r}, got {problems}"


def test_policy_rejects_an_exposed_service_document():
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dash"},
           "spec": {"type": "LoadBalancer", "ports": [{"port": 8265}]}}
    assert exposure_problems(svc)
    assert not exposure_problems(dict(svc, spec={"type": "ClusterIP", "ports": [{"port": 8265}]}))
