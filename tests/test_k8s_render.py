"""orchestrator.k8s rendering: a job file becomes a ConfigMap and a RayJob sized, timed and named from the job."""

from __future__ import annotations

import math
import shlex

import pytest
import yaml
from k8s_samples import ROOT
from k8s_validation import pod_templates

from orchestrator import __version__, k8s
from orchestrator.errors import BadInput
from orchestrator.spec import build_spec

BASE = {
    "name": "digits-mlp",
    "model": {"name": "mlp"},
    "data": {"name": "digits"},
    "checkpoint": {"storage": "s3://runs/prefix"},
}


def render(overrides=(), **options):
    spec = build_spec(BASE, list(overrides))
    return spec, k8s.render_manifests(spec, k8s.job_file_text(spec), **options)


def split(manifests):
    """The ConfigMap and the RayJob of a render (after the job's own ServiceAccount and NetworkPolicy)."""
    assert [m["kind"] for m in manifests] == ["ServiceAccount", "NetworkPolicy", "ConfigMap", "RayJob"]
    return manifests[2], manifests[3]


def test_worker_group_is_sized_from_scaling():
    _, out = render(["scaling.num_workers=3", "scaling.cpus_per_worker=2"])
    cluster = split(out)[1]["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    assert group["rayStartParams"] == {"num-cpus": "2"}
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"] == res["limits"] == {"cpu": "2", "memory": "8Gi"}
    # The head runs the driver only: no Ray Train worker may land there.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert "nodeSelector" not in group["template"]["spec"]


def test_gpu_jobs_get_gpus_tolerations_node_selector_shared_memory_and_the_gpu_image():
    _, out = render(
        ["scaling.num_workers=2", "scaling.use_gpu=true", "scaling.gpus_per_worker=2", "scaling.cpus_per_worker=4"]
    )
    group = split(out)[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    pod = group["template"]["spec"]
    container = pod["containers"][0]
    assert (
        container["resources"]["limits"]["nvidia.com/gpu"]
        == container["resources"]["requests"]["nvidia.com/gpu"]
        == "2"
    )
    assert container["resources"]["limits"]["memory"] == "32Gi"
    assert group["rayStartParams"] == {"num-cpus": "4", "num-gpus": "2"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    shm = next(v for v in pod["volumes"] if v["name"] == "shared-mem")
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"] == "16Gi"
    assert {"name": "shared-mem", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["image"] == f"orchestrator:{__version__}-gpu"


def test_elastic_and_driver_only_jobs():
    _, out = render(["scaling.num_workers=[1, 4]"])
    assert split(out)[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 4
    _, out = render(["scaling.num_workers=0", "scaling.cpus_per_worker=2"])
    cluster = split(out)[1]["spec"]["rayClusterSpec"]
    assert "workerGroupSpecs" not in cluster
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "2"
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "3",
        "memory": "12Gi",
    }


def test_worker_memory_option_and_its_errors():
    _, out = render(worker_memory="6Gi")
    res = split(out)[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"
    ]
    assert res["limits"]["memory"] == "6Gi"
    for bad in ("6 GB", "lots", "100Mi"):
        with pytest.raises(BadInput, match="--worker-memory"):
            render(worker_memory=bad)


def test_configmap_holds_the_resolved_job_and_the_entrypoint_runs_it_from_the_working_dir():
    spec, out = render(["optim.lr=0.01", "train.max_steps=7"])
    configmap, rayjob = split(out)
    job = yaml.safe_load(configmap["data"][k8s.JOB_FILE])
    assert job == spec.to_dict() and job["optim"]["lr"] == 0.01 and job["train"]["max_steps"] == 7
    assert configmap["immutable"] is True
    spec_ = rayjob["spec"]
    argv = shlex.split(spec_["entrypoint"])
    assert argv[:4] == ["python", "-m", "orchestrator", "run"] and argv[4] == k8s.JOB_FILE
    assert "--json" in argv and argv[argv.index("--ray-address") + 1] == "auto"
    # The submitter mounts the ConfigMap where the runtime env uploads the working_dir from.
    working_dir = yaml.safe_load(spec_["runtimeEnvYAML"])["working_dir"]
    submitter = spec_["submitterPodTemplate"]["spec"]
    volume = next(v for v in submitter["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    mount = next(m for m in submitter["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    assert mount["mountPath"] == working_dir and mount["readOnly"] is True
    assert spec_["submissionMode"] == "K8sJobMode"


def test_lifecycle_fields_come_from_the_job_and_options():
    _, out = render(["failure.max_failures=5"], ttl_seconds=30, deadline_seconds=3600)
    spec = split(out)[1]["spec"]
    assert spec["backoffLimit"] == 5
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 30
    assert spec["activeDeadlineSeconds"] == 3600
    _, out = render(["failure.max_failures=-1"])
    assert split(out)[1]["spec"]["backoffLimit"] == 2**31 - 1
    with pytest.raises(BadInput, match="--deadline"):
        render(deadline_seconds=0)
    with pytest.raises(BadInput, match="--ttl"):
        render(ttl_seconds=-1)


def test_cluster_option_targets_an_existing_raycluster():
    _, out = render(cluster="orchestrator")
    spec = split(out)[1]["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": "orchestrator"}
    assert "rayClusterSpec" not in spec
    # KubeRay refuses to shut down or expire a cluster the job does not own.
    assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
    assert spec["submitterPodTemplate"]["spec"]["containers"][0]["image"] == f"orchestrator:{__version__}"
    with pytest.raises(BadInput, match="--cluster"):
        render(cluster="My_Cluster")


def test_token_authentication_is_on():
    _, out = render()
    cluster = split(out)[1]["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["rayVersion"] == k8s.RAY_VERSION
    assert k8s.render_raycluster()["spec"]["authOptions"] == {"mode": "token"}


def test_names_are_valid_stable_and_unique_per_job():
    _, a = render()
    _, b = render()
    _, c = render(["optim.lr=0.5"])
    assert [m["metadata"]["name"] for m in a] == [m["metadata"]["name"] for m in b]
    assert all(x["metadata"]["name"] != y["metadata"]["name"] for x, y in zip(a, c, strict=True))
    configmap, rayjob = split(a)
    assert configmap["metadata"]["name"] == rayjob["metadata"]["name"] + "-job"
    # The job's ServiceAccount and NetworkPolicy carry the RayJob's name: one job's objects, deleted by its label.
    assert {m["metadata"]["name"] for m in a[:2]} == {rayjob["metadata"]["name"]}
    assert {m["metadata"]["labels"]["app.kubernetes.io/instance"] for m in a} == {rayjob["metadata"]["name"]}
    for name in ("Digits_MLP.v2", "2024-run", "x" * 100, "A"):
        spec = build_spec({**BASE, "name": name})
        rayjob = split(k8s.render_manifests(spec))[1]
        got = rayjob["metadata"]["name"]
        assert len(got) <= 47 and k8s.DNS1035_LABEL.match(got), got
        assert rayjob["metadata"]["annotations"]["orchestrator/run-name"] == name


@pytest.mark.parametrize(
    "image",
    [
        "orchestrator",
        "orchestrator:latest",
        "registry.example.com:5000/team/orchestrator",
        "ghcr.io/x/orchestrator:LATEST",
        "Orchestrator:1.0",
        "orchestrator:bad tag",
        "orchestrator@sha256:123",
    ],
)
def test_unpinned_or_malformed_images_are_refused(image):
    with pytest.raises(BadInput, match="--image"):
        render(image=image)


@pytest.mark.parametrize(
    "image",
    ["orchestrator:0.1.0", "registry.example.com:5000/team/orchestrator:1.2.3-gpu", "ghcr.io/x/y@sha256:" + "a" * 64],
)
def test_pinned_images_are_used_everywhere(image):
    _, out = render(image=image)
    rayjob = split(out)[1]
    images = {
        c["image"]
        for t in (
            rayjob["spec"]["submitterPodTemplate"],
            rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"],
            rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"],
        )
        for c in t["spec"]["containers"]
    }
    assert images == {image}


@pytest.mark.parametrize("namespace", ["Orchestrator", "a_b", "-x", "x" * 64, ""])
def test_bad_namespaces_are_refused(namespace):
    with pytest.raises(BadInput, match="--namespace"):
        render(namespace=namespace)


def test_no_secret_reaches_the_manifests(monkeypatch):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE123")
    _, out = render(["checkpoint.endpoint_url=http://minio:9000"])
    text = k8s.dump_manifests(out)
    assert secret not in text and "AKIAEXAMPLE123" not in text
    assert all(m["kind"] != "Secret" for m in out)
    # Credentials reach the pods only as a mounted Secret the user creates.
    pod = split(out)[1]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "secret" in v)
    assert volume["secret"] == {"secretName": k8s.S3_SECRET, "optional": True, "defaultMode": 0o440}


def test_storage_warnings_name_what_may_not_exist_in_the_image():
    spec = build_spec(
        {
            **BASE,
            "data": {
                "name": "parquet",
                "path": "data/*.parquet",
                "task": "regression",
                "features": ["x"],
                "label": "y",
            },
        }
    )
    (line,) = k8s.storage_warnings(spec)
    assert line.startswith("data.path: data/*.parquet must exist inside the image")
    assert k8s.storage_warnings(build_spec(BASE)) == []


@pytest.mark.parametrize("where", ["runs", "/shared/runs", "file:///shared/runs"])
def test_a_local_checkpoint_storage_is_refused_as_it_would_die_with_the_pods(where):
    with pytest.raises(BadInput, match=rf"^checkpoint.storage: {where} is a path inside the pods"):
        render([f"checkpoint.storage={where}"])


def test_the_rendered_set_brings_the_service_account_and_network_policy_its_pods_need():
    _, out = render(["scaling.num_workers=2"])
    account, policy = out[0], out[1]
    name = split(out)[1]["metadata"]["name"]
    assert account == {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": "orchestrator", "labels": k8s.labels(name, "service-account")},
        "automountServiceAccountToken": False,
    }
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/instance": name}}
    pods = [pod for _, pod in pod_templates(split(out)[1])]
    assert len(pods) == 3 and all(p["spec"]["serviceAccountName"] == name for p in pods)
    # The namespace's own policy (k8s/base) and the job's say the same.
    base = yaml.safe_load((ROOT / "k8s" / "base" / "networkpolicy.yaml").read_text())
    assert policy["spec"]["ingress"] == base["spec"]["ingress"] and policy["spec"]["policyTypes"] == ["Ingress"]
    # An existing ServiceAccount instead (one with an IAM role for the bucket): the pods run as it, none is rendered.
    _, out = render(service_account="ml-team.s3")
    assert [m["kind"] for m in out] == ["NetworkPolicy", "ConfigMap", "RayJob"]
    assert {p["spec"]["serviceAccountName"] for _, p in pod_templates(out[-1])} == {"ml-team.s3"}
    with pytest.raises(BadInput, match="^--service-account Team_A: not a ServiceAccount name"):
        render(service_account="Team_A")


def test_queue_hands_the_rayjob_to_kueue_suspended_with_what_kueue_requires():
    _, plain = render(["scaling.num_workers=2"])
    _, queued = render(["scaling.num_workers=2"], queue="team-a")
    rayjob = split(queued)[1]
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    spec = rayjob["spec"]
    # Kueue admits a RayJob with a cluster of its own, deleted when it finishes, of a fixed size; created suspended.
    assert spec["suspend"] is True and spec["shutdownAfterJobFinishes"] is True and "clusterSelector" not in spec
    assert (
        spec["rayClusterSpec"]["enableInTreeAutoscaling"] is False
        and len(spec["rayClusterSpec"]["workerGroupSpecs"]) <= 7
    )
    for template in (t for _, t in pod_templates(rayjob)):
        for container in template["spec"]["containers"]:
            assert container["resources"]["requests"], "Kueue counts each pod's requests against the queue's quota"
    # The same job queued is another job (its own name); apart from the queue, the same RayJob.
    name, queued_name = split(plain)[1]["metadata"]["name"], rayjob["metadata"]["name"]
    assert name != queued_name
    same = list(yaml.safe_load_all(k8s.dump_manifests(queued).replace(queued_name, name)))
    del same[-1]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"], same[-1]["spec"]["suspend"]
    assert same == plain
    with pytest.raises(BadInput, match="^--queue team-a: Kueue admits a RayJob with a Ray cluster of its own"):
        render(queue="team-a", cluster="orchestrator")
    with pytest.raises(BadInput, match="^--queue Team_A: a LocalQueue name"):
        render(queue="Team_A")


def test_dump_is_yaml_that_reads_back_and_keeps_the_job_file_readable():
    _, out = render()
    text = k8s.dump_manifests(out)
    assert list(yaml.safe_load_all(text)) == out
    assert "job.yaml: |" in text


def test_raycluster_is_long_lived_and_autoscaling():
    cluster = k8s.render_raycluster(max_workers=3, worker_cpus=2, worker_memory="8Gi")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    group = spec["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (0, 0, 3)
    assert spec["autoscalerOptions"]["securityContext"] == k8s.container_security_context()
    assert spec["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert group["template"]["spec"]["automountServiceAccountToken"] is False
    assert math.isclose(int(group["rayStartParams"]["num-cpus"]), 2)


def test_a_cross_validation_runs_orchestrator_cv_with_a_worker_pod_set_per_fold():
    spec, run = render(["data.folds=4"])
    _, cv = render(["data.folds=4"], command="cv", refit=True)
    configmap, rayjob = split(cv)
    # The same resolved job file; the entrypoint is `orchestrator cv` on it, attached to the RayJob's Ray.
    assert yaml.safe_load(configmap["data"][k8s.JOB_FILE]) == spec.to_dict()
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:5] == ["python", "-m", "orchestrator", "cv", k8s.JOB_FILE]
    assert argv[argv.index("--ray-address") + 1] == "auto" and "--json" in argv and "--refit" in argv
    assert rayjob["metadata"]["annotations"]["orchestrator/run-name"] == "digits-mlp-cv"
    # A run and a cv of one job are two jobs: neither apply may replace the other.
    assert rayjob["metadata"]["name"].startswith("digits-mlp-cv-")
    assert rayjob["metadata"]["name"] != split(run)[1]["metadata"]["name"]
    assert shlex.split(split(render(["data.folds=4"], command="cv")[1])[1]["spec"]["entrypoint"])[-1] == "--json"
    # The folds train side by side: each in its trial's process (num_workers 1), so one worker pod a fold.
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert (
        cluster["workerGroupSpecs"][0]["replicas"] == 4
        and cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    )
    _, out = render(["data.folds=3", "scaling.num_workers=0", "scaling.cpus_per_worker=2"], command="cv")
    cluster = split(out)[1]["spec"]["rayClusterSpec"]
    assert cluster["workerGroupSpecs"][0]["replicas"] == 3 and cluster["workerGroupSpecs"][0]["rayStartParams"] == {
        "num-cpus": "2"
    }
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # With Ray Train workers, a fold's trial only waits on them: on the head, so each fold's workers fill their pods.
    _, out = render(["data.folds=3", "scaling.num_workers=2"], command="cv")
    cluster = split(out)[1]["spec"]["rayClusterSpec"]
    assert (
        cluster["workerGroupSpecs"][0]["replicas"] == 6
        and cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "1"
    )


def test_a_cross_validation_needs_folds_and_refit_needs_a_cross_validation():
    with pytest.raises(BadInput, match="data.folds: cv needs the number of folds"):
        render(command="cv")
    with pytest.raises(BadInput, match="--refit: follows a cross-validation; add --cv"):
        render(["data.folds=3"], refit=True)
