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
