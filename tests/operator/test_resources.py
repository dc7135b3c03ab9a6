"""Resource builders: a spec becomes exactly the documented children (no cluster needed)."""

from __future__ import annotations

import base64
import copy

import yaml

from fedtune.spec import parse_job
from fedtune_operator import resources as r
from support.children import UID, by_kind_name, container, make_job


def test_example_becomes_exactly_the_documented_children(job) -> None:
    children = by_kind_name(r.all_children(job, "pw"))
    assert set(children) == {
        ("Secret", "poems-lora-redis"),
        ("Secret", "poems-lora-ca"),
        ("Secret", "poems-lora-tls-scheduler"),
        ("Secret", "poems-lora-tls-assist-trainer"),
        ("Secret", "poems-lora-tls-node-1"),
        ("Secret", "poems-lora-tls-node-2"),
        ("NetworkPolicy", "poems-lora-network"),
        ("ConfigMap", "poems-lora-job"),
        ("PersistentVolumeClaim", "poems-lora-output"),
        ("Pod", "poems-lora-redis"),
        ("Service", "poems-lora-redis"),
        ("Pod", "poems-lora-scheduler"),
        ("Service", "poems-lora-scheduler"),
        ("Pod", "poems-lora-assist-trainer"),
        ("Service", "poems-lora-assist-trainer"),
        ("Pod", "poems-lora-node-1"),
        ("Service", "poems-lora-node-1"),
        ("Pod", "poems-lora-node-2"),
        ("Service", "poems-lora-node-2"),
    }
    for child in children.values():
        meta = child["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "fedtune"
        assert meta["labels"]["fedtune.io/job"] == "poems-lora"
        assert meta["labels"]["fedtune.io/component"]
        (owner,) = meta["ownerReferences"]
        assert owner == {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "FederatedFineTune",
            "name": "poems-lora",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_services_select_their_pods_on_the_role_ports(job) -> None:
    children = by_kind_name(r.all_children(job, "pw"))
    expected = {"redis": 6379, "scheduler": 55005, "assist-trainer": 55004, "node-1": 55006, "node-2": 55006}
    for suffix, port in expected.items():
        service = children[("Service", f"poems-lora-{suffix}")]
        pod = children[("Pod", f"poems-lora-{suffix}")]
        assert service["spec"]["ports"][0]["port"] == port
        assert container(pod)["ports"][0]["containerPort"] == port
        labels = pod["metadata"]["labels"]
        assert all(labels[k] == v for k, v in service["spec"]["selector"].items()), suffix
    # Two label_trainers share a component: the party label keeps their Services apart.
    assert children[("Service", "poems-lora-node-1")]["spec"]["selector"]["fedtune.io/party"] == "node-1"


def test_job_yaml_is_the_spec_with_in_cluster_addresses(job, example) -> None:
    cm = r.job_configmap(job)
    document = yaml.safe_load(cm["data"]["job.yaml"])
    parsed = parse_job(document)  # what every role reads must load with the same schema
    spec = parsed.spec
    assert spec.scheduler.address == "poems-lora-scheduler:55005"
    assert spec.redis.address == "poems-lora-redis:6379"
    assert spec.assist_trainer.address == "poems-lora-assist-trainer:55004"
    assert all(p.address is None for p in spec.label_trainers)
    assert document["metadata"] == {"name": "poems-lora", "namespace": "team-a"}
    # Otherwise the spec as given: no defaults filled in, nothing dropped.
    stripped = copy.deepcopy(document["spec"])
    del stripped["scheduler"], stripped["redis"], stripped["parties"][0]["address"]
    assert stripped == example["spec"]


def test_role_commands_env_and_mounts(job) -> None:
    pods = {p["metadata"]["name"]: p for p in r.all_children(job, "pw") if p["kind"] == "Pod"}
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
        expected = {"/etc/fedtune": "job", "/fedtune/output": "output", "/tmp": "tmp", "/etc/fedtune-tls": "tls"}
        if party != "scheduler":  # the example's workspace claim (spec.storage.volumes): parties only
            expected["/workspace"] = "shared-0"
        assert mounts == expected
        volumes = {v["name"]: v for v in pods[name]["spec"]["volumes"]}
        assert volumes["job"]["configMap"]["name"] == "poems-lora-job"
        assert volumes["output"]["persistentVolumeClaim"]["claimName"] == "poems-lora-output"
        assert "emptyDir" in volumes["tmp"]


def test_pods_are_bare_locked_down_and_never_restart_themselves(job) -> None:
    for pod in (p for p in r.all_children(job, "pw") if p["kind"] == "Pod"):
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
    node1 = r.role_pod(job, r.workloads(job)[2])
    c = container(node1)
    # The party's memory is its request and its limit.
    limits = {"memory": "16Gi", "nvidia.com/gpu": "2"}
    assert c["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": limits}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/workspace/models"]["subPath"] == "glm" and mounts["/workspace/models"]["readOnly"] is True
    assert mounts["/workspace/data"]["name"] == mounts["/workspace/models"]["name"]  # one volume per claim
    assert mounts["/data/bank-a"]["readOnly"] is True
    claims = {v["persistentVolumeClaim"]["claimName"] for v in node1["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"poems-lora-output", "models", "bank-a-data"}
    # Only node-1 gets its own claim and a GPU; everyone gets the shared claim.
    node2 = r.role_pod(job, r.workloads(job)[3])
    assert container(node2)["resources"] == {  # unsized: a small request, a cap
        "requests": {"cpu": "250m", "memory": "1Gi"},
        "limits": {"memory": "4Gi"},
    }
    assert "bank-a-data" not in str(node2["spec"]["volumes"]) and "models" in str(node2["spec"]["volumes"])
    scheduler = r.role_pod(job, r.workloads(job)[0])
    assert "models" not in str(scheduler["spec"]["volumes"])
    pvc = r.output_pvc(job)
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi" and pvc["spec"]["storageClassName"] == "fast"


def test_existing_output_claim_is_used_not_created(example) -> None:
    example["spec"]["storage"] = {"output": {"claimName": "shared-adapters"}}
    job = make_job(example)
    assert r.output_pvc(job) is None
    assert r.output_location(job) == "pvc://shared-adapters/"
    kinds = {c["kind"] for c in r.static_children(job, "pw")}
    assert "PersistentVolumeClaim" not in kinds
    pod = r.role_pod(job, r.workloads(job)[1])
    assert {"name": "output", "persistentVolumeClaim": {"claimName": "shared-adapters"}} in pod["spec"]["volumes"]


def test_remote_parties_get_nothing_here(example) -> None:
    example["spec"]["parties"][2]["remote"] = {"address": "bank-b.example.org:55006"}
    job = make_job(example)
    names = {c["metadata"]["name"] for c in r.all_children(job, "pw")}
    assert "poems-lora-node-2" not in names and "poems-lora-node-1" in names
    assert [w.key for w in r.workloads(job)] == ["scheduler", "assist_trainer", "node-1"]


def redis_conf(job: r.Job, password: str) -> str:
    return base64.b64decode(r.redis_secret(job, password)["data"]["redis.conf"]).decode()


def test_redis_secret_and_persistence(example) -> None:
    job = make_job(example)
    secret = r.redis_secret(job, "s3cret")
    assert base64.b64decode(secret["data"]["password"]) == b"s3cret"
    conf = redis_conf(job, "s3cret").splitlines()
    assert "requirepass s3cret" in conf and "appendonly no" in conf and "dir /data" in conf
    pod = r.redis_pod(job)
    c = container(pod)
    assert c["command"] == ["redis-server", "/etc/redis/redis.conf"]
    assert {"name": "config", "mountPath": "/etc/redis", "readOnly": True} in c["volumeMounts"]
    config = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
    assert config["secret"]["secretName"] == "poems-lora-redis"
    assert config["secret"]["items"] == [{"key": "redis.conf", "path": "redis.conf"}]
    assert r.redis_pvc(job) is None
    assert {"name": "data", "emptyDir": {}} in pod["spec"]["volumes"]

    example["spec"]["redis"] = {"persistence": True, "storage": "2Gi", "image": "redis:7.4"}
    job = make_job(example)
    pod = r.redis_pod(job)
    c = container(pod)
    assert c["image"] == "redis:7.4"
    assert "appendonly yes" in redis_conf(job, "pw").splitlines()
    pvc = r.redis_pvc(job)
    assert pvc["metadata"]["name"] == "poems-lora-redis-data"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "poems-lora-redis-data"}} in pod["spec"]["volumes"]


def test_names_the_api_server_would_refuse_are_reported(example) -> None:
    assert r.name_problems(make_job(example)) == []
    example["metadata"]["name"] = "j" * 30
    example["spec"]["parties"][1]["name"] = "n" * 33
    (problem,) = r.name_problems(make_job(example))
    assert "n" * 33 in problem and "63" in problem
    example["metadata"]["name"] = "job"
    example["spec"]["parties"][1]["name"] = "Redis"
    assert "reserved" in r.name_problems(make_job(example))[0]


def test_output_path_when_given_is_where_each_party_writes(example) -> None:
    relative = copy.deepcopy(example)
    relative["spec"]["output"] = {"path": "runs/[JOB_ID]/[NODE_ID]"}
    job = make_job(relative)
    pods = {p["metadata"]["name"]: p for p in r.all_children(job, "pw") if p["kind"] == "Pod"}
    assert container(pods["poems-lora-node-1"])["command"][-2:] == [
        "--output-dir", "/fedtune/output/runs/poems-lora/node-1"]
    assert r.output_location(job) == "pvc://poems-lora-output/runs/poems-lora/[NODE_ID]"
    assert r.name_problems(job) == []

    absolute = copy.deepcopy(example)
    absolute["spec"]["output"] = {"path": "/opt/checkpoints/[JOB_ID]/[NODE_ID]"}
    job = make_job(absolute)
    problems = r.name_problems(job)
    assert len(problems) == 3 and all("/opt/checkpoints/poems-lora/" in p and "no writable volume" in p
                                      for p in problems)
    absolute["spec"]["storage"]["volumes"].append({"claimName": "checkpoints", "mountPath": "/opt/checkpoints"})
    job = make_job(absolute)
    assert r.name_problems(job) == []
    assert r.output_location(job) == "/opt/checkpoints/poems-lora/[NODE_ID]"
