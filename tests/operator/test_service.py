"""Services: one headless Service per pod, on the role's port, selecting only that pod."""

from __future__ import annotations

from fedtune_operator.children import all_children
from support.children import by_kind_name, container


def test_services_select_their_pods_on_the_role_ports(job) -> None:
    children = by_kind_name(all_children(job, "pw"))
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


def test_every_role_serves_its_metrics_on_its_service(job) -> None:
    children = by_kind_name(all_children(job, "pw"))
    for suffix in ("scheduler", "assist-trainer", "node-1", "node-2"):
        service, pod = children[("Service", f"poems-lora-{suffix}")], children[("Pod", f"poems-lora-{suffix}")]
        assert {"name": "metrics", "port": 9090, "targetPort": 9090, "protocol": "TCP"} in service["spec"]["ports"]
        assert {"name": "metrics", "containerPort": 9090} in container(pod)["ports"]
        env = {e["name"]: e.get("value") for e in container(pod)["env"]}
        assert env["FEDTUNE_METRICS_PORT"] == "9090"
    assert [p["name"] for p in children[("Service", "poems-lora-redis")]["spec"]["ports"]] == ["redis"]
