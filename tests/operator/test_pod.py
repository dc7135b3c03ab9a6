"""Pods: commands, environment, mounts, sizes, and a locked-down security context for every one."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest

from fedtune_operator.children import all_children
from fedtune_operator.children.pod import CACHE_ENV, TRAINER_UID, redis_pod, role_pod
from fedtune_operator.children.secret import redis_secret
from fedtune_operator.jobs import workloads
from support.children import ROLES, container, make_job, pod_secrets, pods_of, secret_volumes

# Roles that keep state in Redis, and so read its password.
REDIS_USERS = {"scheduler", "assist_trainer"}


def test_role_commands_env_and_mounts(job) -> None:
    pods = {p["metadata"]["name"]: p for p in all_children(job, "pw") if p["kind"] == "Pod"}
    common = ["--job", "/etc/fedtune/job.yaml"]
    tail = ["--base-dir", "/workspace", "--output", "/fedtune/output"]
    assert container(pods["poems-lora-scheduler"])["command"] == ["fedtune", "scheduler", *common, *tail]
    assert container(pods["poems-lora-assist-trainer"])["command"] == [
        "fedtune", "assist-trainer", *common, "--party", "assist_trainer", *tail,
    ]  # fmt: skip
    assert container(pods["poems-lora-node-2"])["command"] == [
        "fedtune", "label-trainer", *common, "--party", "node-2", *tail,
    ]  # fmt: skip
    for name, party in [("poems-lora-scheduler", "scheduler"), ("poems-lora-node-1", "node-1")]:
        c = container(pods[name])
        env = {e["name"]: e for e in c["env"]}
        if party == "scheduler":  # the scheduler keeps the job state in Redis
            assert env["FEDTUNE_REDIS_PASSWORD"]["valueFrom"] == {
                "secretKeyRef": {"name": "poems-lora-redis", "key": "password"}
            }
        else:  # a label_trainer never talks to Redis: no password
            assert "FEDTUNE_REDIS_PASSWORD" not in env
        assert env["FEDTUNE_TLS_DIR"]["value"] == "/etc/fedtune-tls"
        assert env["FEDTUNE_PARTY"]["value"] == party
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        assert c["workingDir"] == "/workspace"
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert c["image"] == "fedtune/trainer:0.1.0" and c["imagePullPolicy"] == "IfNotPresent"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        expected = {"/etc/fedtune": "job", "/tmp": "tmp", "/etc/fedtune-tls": "tls"}
        if party != "scheduler":  # its output claim and the workspace claim (spec.storage.volumes): parties only
            expected.update({"/fedtune/output": "output", "/workspace": "shared-0"})
        assert mounts == expected
        volumes = {v["name"]: v for v in pods[name]["spec"]["volumes"]}
        assert volumes["job"]["configMap"]["name"] == "poems-lora-job"
        if party != "scheduler":
            assert volumes["output"]["persistentVolumeClaim"]["claimName"] == f"poems-lora-output-{party}"
        assert "emptyDir" in volumes["tmp"]


def test_pods_are_bare_locked_down_and_never_restart_themselves(job) -> None:
    for pod in (p for p in all_children(job, "pw") if p["kind"] == "Pod"):
        spec = pod["spec"]
        assert spec["restartPolicy"] == "Never"
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        sc = container(pod)["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
        assert "ownerReferences" in pod["metadata"]


def test_a_party_with_several_ranks_runs_them_in_its_pod(example) -> None:
    example["spec"]["parties"][1]["resources"] = {"gpu": 2}
    job = make_job(example)
    node1, node2 = (role_pod(job, w) for w in workloads(job)[2:4])
    c = container(node1)
    # One container: the party's command starts its two ranks itself (torchrun), one per GPU.
    assert len(node1["spec"]["containers"]) == 1 and c["command"][:2] == ["fedtune", "label-trainer"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    shm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert {"name": shm["name"], "emptyDir": {"medium": "Memory"}} in node1["spec"]["volumes"]
    assert all(m["mountPath"] != "/dev/shm" for m in container(node2)["volumeMounts"])


@pytest.mark.parametrize("resource", ["amd.com/gpu", "nvidia.com/mig-1g.10gb"])
def test_the_gpu_resource_name_is_the_partys_choice(example, resource) -> None:
    example["spec"]["parties"][1]["resources"] = {"gpu": 1, "gpuResource": resource}
    job = make_job(example)
    limits = container(role_pod(job, workloads(job)[2]))["resources"]["limits"]
    assert limits[resource] == "1" and "nvidia.com/gpu" not in limits


def test_a_gpu_resource_that_is_no_resource_name_is_refused(example) -> None:
    from fedtune.spec import SpecError, parse_job

    example["spec"]["parties"][1]["resources"] = {"gpu": 1, "gpuResource": "gpu"}
    with pytest.raises(SpecError, match=r"spec\.parties\[1\]\.resources\.gpuResource"):
        parse_job(example, "job.yaml")


def test_gpu_cpu_memory_and_claims(example) -> None:
    spec = example["spec"]
    spec["parties"][1]["resources"] = {"gpu": 2, "cpu": "4", "memory": "16Gi"}
    spec["parties"][1]["volumes"] = [{"claimName": "bank-a-data", "mountPath": "/data/bank-a", "readOnly": True}]
    spec["storage"] = {
        "output": {"size": "5Gi", "storageClassName": "fast"},
        "volumes": [
            {"claimName": "models", "mountPath": "/workspace/models", "subPath": "glm", "readOnly": True},
            {"claimName": "models", "mountPath": "/workspace/data", "subPath": "data"},
        ],
    }
    job = make_job(example)
    node1 = role_pod(job, workloads(job)[2])
    c = container(node1)
    # The party's memory is its request and its limit.
    limits = {"memory": "16Gi", "nvidia.com/gpu": "2"}
    assert c["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": limits}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/workspace/models"]["subPath"] == "glm" and mounts["/workspace/models"]["readOnly"] is True
    assert mounts["/workspace/data"]["name"] == mounts["/workspace/models"]["name"]  # one volume per claim
    assert mounts["/data/bank-a"]["readOnly"] is True
    claims = {v["persistentVolumeClaim"]["claimName"] for v in node1["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"poems-lora-output-node-1", "models", "bank-a-data"}
    # Only node-1 gets its own claim and a GPU; everyone gets the shared claim.
    node2 = role_pod(job, workloads(job)[3])
    assert container(node2)["resources"] == {  # unsized: a small request, a cap
        "requests": {"cpu": "250m", "memory": "1Gi"},
        "limits": {"memory": "4Gi"},
    }
    assert "bank-a-data" not in str(node2["spec"]["volumes"]) and "models" in str(node2["spec"]["volumes"])
    scheduler = role_pod(job, workloads(job)[0])
    assert "models" not in str(scheduler["spec"]["volumes"])


def test_each_pod_mounts_its_own_certificate_and_no_other_secret(job) -> None:
    pods = pods_of(all_children(job, "pw"))
    for key, suffix in ROLES.items():
        pod = pods[f"poems-lora-{suffix}"]
        volumes = secret_volumes(pod)
        assert volumes == {"tls": {"secretName": f"poems-lora-tls-{suffix}", "defaultMode": 0o440}}
        (mount,) = [m for m in container(pod)["volumeMounts"] if m["name"] == "tls"]
        assert mount == {"name": "tls", "mountPath": "/etc/fedtune-tls", "readOnly": True}
        # Only the roles that keep state in Redis get its password; nobody gets the CA's key.
        expected = {f"poems-lora-tls-{suffix}"} | ({"poems-lora-redis"} if key in REDIS_USERS else set())
        assert pod_secrets(pod) == expected, key
    assert pod_secrets(pods["poems-lora-redis"]) == {"poems-lora-redis"}  # its redis.conf


def test_tls_off_mounts_no_certificate(example) -> None:
    example["spec"]["tls"] = {"enabled": False}
    job = make_job(example)
    children = all_children(job, "pw")
    assert [c["metadata"]["name"] for c in children if c["kind"] == "Secret"] == ["poems-lora-redis"]
    for pod in pods_of(children).values():
        assert "tls" not in secret_volumes(pod)
        assert all(e["name"] != "FEDTUNE_TLS_DIR" for e in container(pod).get("env") or [])


def literal_values(pod: dict[str, Any]) -> list[str]:
    """Everything a pod spec states outright: command, args, env values."""
    out = []
    for c in pod["spec"]["containers"]:
        out += c.get("command") or []
        out += c.get("args") or []
        out += [e["value"] for e in c.get("env") or [] if "value" in e]
    return out


def test_no_pod_states_the_redis_password(job) -> None:
    password = "Zm9vYmFyLXNlY3JldA-unique"
    for pod in pods_of(all_children(job, password)).values():
        assert not any(password in v for v in literal_values(pod)), pod["metadata"]["name"]
    redis = redis_pod(job)
    assert "env" not in container(redis) and "args" not in container(redis)
    assert f"requirepass {password}" in base64.b64decode(redis_secret(job, password)["data"]["redis.conf"]).decode()


@pytest.mark.parametrize("variant", ["example", "gpu-persistent", "tls-off"])
def test_every_pod_is_locked_down_and_sized(example, variant) -> None:
    doc = copy.deepcopy(example)
    if variant == "gpu-persistent":
        doc["spec"]["parties"][1]["resources"] = {"gpu": 1, "cpu": "8", "memory": "48Gi"}
        doc["spec"]["redis"] = {"persistence": True}
    if variant == "tls-off":
        doc["spec"]["tls"] = {"enabled": False}
    for pod in pods_of(all_children(make_job(doc), "pw")).values():
        name = pod["metadata"]["name"]
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] >= 10000, name
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
        (c,) = spec["containers"]
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
        assert set(c["resources"]["requests"]) >= {"cpu", "memory"}, name
        assert "memory" in c["resources"]["limits"], name
        # Whatever the container writes goes to a mounted volume, never the read-only root.
        writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
        for env in c.get("env") or []:
            if env["name"] in CACHE_ENV:
                assert any(env["value"].startswith(w) for w in writable), (name, env)
    redis = redis_pod(make_job(doc))
    assert redis["spec"]["securityContext"]["runAsUser"] != TRAINER_UID


def test_role_caches_cover_what_the_training_stack_writes(job) -> None:
    pod = role_pod(job, workloads(job)[1])
    env = {e["name"]: e.get("value") for e in container(pod)["env"]}
    for name in (
        "HOME",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "TRITON_CACHE_DIR",
        "TORCHINDUCTOR_CACHE_DIR",
        "TORCH_HOME",
        "CUDA_CACHE_PATH",
        "MPLCONFIGDIR",
        "TMPDIR",
    ):
        assert env[name].startswith("/tmp"), name
    assert {"name": "tmp", "emptyDir": {}} in pod["spec"]["volumes"]
