"""Pure helpers over pod manifests: expansion, env resolution, phases, selectors.

No API calls and no host changes here, so these rules are unit-testable on their own.
Lookups of Secrets and ConfigMaps come in as a function (`Lookup`).
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

Obj = dict[str, Any]
# (kind, namespace, name) -> the object, or None when it does not exist.
Lookup = Callable[[str, str, str], Obj | None]

_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class ConfigError(Exception):
    """What a kubelet reports as CreateContainerConfigError: a missing Secret, key, ..."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known names are replaced, unknown ones stay, `$$` is `$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REF.sub(replace, text)


def field_value(pod: Obj, path: str) -> str:
    """The downward API's fieldRef paths."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.podIPs": ",".join(p["ip"] for p in status.get("podIPs") or []),
        "status.hostIPs": ",".join(p["ip"] for p in status.get("hostIPs") or []),
    }
    if path in simple:
        return simple[path] or ""
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f'{k}="{v}"' for k, v in items)
    raise ConfigError(f"unsupported fieldRef {path}")


def _key_of(lookup: Lookup, kind: str, namespace: str, ref: Obj) -> str | None:
    data = _whole(lookup, kind, namespace, ref)
    if ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise ConfigError(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}")
    return data[ref["key"]]


def _whole(lookup: Lookup, kind: str, namespace: str, ref: Obj) -> dict[str, str]:
    obj = lookup(kind, namespace, ref["name"])
    if obj is None:
        if ref.get("optional"):
            return {}
        raise ConfigError(f'{kind.lower()} "{ref["name"]}" not found')
    if kind == "Secret":
        data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        return {**data, **(obj.get("stringData") or {})}
    return dict(obj.get("data") or {})


def resource_value(container: Obj, ref: Obj, node_capacity: dict[str, str]) -> str:
    """resourceFieldRef: the container's limit (or request), else the node's capacity, in units of
    `divisor` rounded up, as the kubelet gives it (250m of CPU with divisor 1 is "1")."""
    kind, _, name = ref["resource"].partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(name) or node_capacity.get(name, "0")
    units = parse_quantity(str(value)) / parse_quantity(str(ref.get("divisor") or "1"))
    return str(math.ceil(units))


_SUFFIXES = {"m": Decimal("0.001"), "": Decimal(1), "k": Decimal(10) ** 3, "M": Decimal(10) ** 6,
             "G": Decimal(10) ** 9, "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
             "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
             "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60}


def parse_quantity(quantity: str) -> Decimal:
    """A Kubernetes resource quantity ("250m", "2", "1Gi", "1e3") as a number."""
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", quantity.strip())
    if match is None:
        raise ConfigError(f"not a resource quantity: {quantity!r}")
    return Decimal(match.group(1)) * _SUFFIXES[match.group(2) or ""]


def container_env(
    pod: Obj, container: Obj, lookup: Lookup, base: dict[str, str], node_capacity: dict[str, str]
) -> dict[str, str]:
    """The container's environment: `base`, then envFrom, then env in order (with expansion)."""
    namespace = pod["metadata"]["namespace"]
    env = dict(base)
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            values = _whole(lookup, "ConfigMap", namespace, source["configMapRef"])
        else:
            values = _whole(lookup, "Secret", namespace, source["secretRef"])
        env.update({prefix + k: v for k, v in values.items()})
    for var in container.get("env") or []:
        value: str | None
        if "valueFrom" not in var:
            value = expand(var.get("value", ""), env)
        else:
            source = var["valueFrom"]
            if "fieldRef" in source:
                value = field_value(pod, source["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in source:
                value = _key_of(lookup, "Secret", namespace, source["secretKeyRef"])
            elif "configMapKeyRef" in source:
                value = _key_of(lookup, "ConfigMap", namespace, source["configMapKeyRef"])
            elif "resourceFieldRef" in source:
                value = resource_value(container, source["resourceFieldRef"], node_capacity)
            else:
                raise ConfigError(f"env {var['name']}: unsupported valueFrom {sorted(source)}")
        if value is not None:
            env[var["name"]] = value
    return env


def container_argv(container: Obj, env: dict[str, str], entrypoints: dict[str, list[str]]) -> list[str]:
    """command + args with `$(VAR)` expanded; without a command, the image's entrypoint.

    There are no images here: the agent knows the entrypoints of the project's images
    (and whatever `--entrypoint` adds), and otherwise a container must name its command.
    """
    command = container.get("command")
    if not command:
        image = container.get("image", "")
        repo = image.rsplit("@", 1)[0]
        repo = repo.rsplit(":", 1)[0] if ":" in repo.rsplit("/", 1)[-1] else repo
        command = entrypoints.get(repo) or entrypoints.get(repo.rsplit("/", 1)[-1])
        if command is None and not container.get("args"):
            raise ConfigError(
                f"container {container['name']}: no command, and the node agent does not know the entrypoint "
                f"of image {image} (pass --entrypoint {repo}=CMD)"
            )
    argv = [expand(part, env) for part in [*(command or []), *(container.get("args") or [])]]
    if not argv:
        raise ConfigError(f"container {container['name']}: nothing to run")
    return argv


def selector_matches(selector: dict[str, str] | None, labels: dict[str, str] | None) -> bool:
    if not selector:
        return False  # a Service without a selector has manually managed endpoints
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def node_selector_matches(pod: Obj, node_labels: dict[str, str]) -> bool:
    wanted = pod["spec"].get("nodeSelector") or {}
    return all(node_labels.get(k) == v for k, v in wanted.items())


def gpu_request(pod: Obj) -> int:
    total = 0
    for container in pod["spec"].get("containers") or []:
        resources = container.get("resources") or {}
        value = (resources.get("limits") or {}).get("nvidia.com/gpu") or (resources.get("requests") or {}).get(
            "nvidia.com/gpu"
        )
        total += int(value or 0)
    return total


FINAL = ("Succeeded", "Failed")  # pod phases that never change again


def is_terminal(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") in FINAL


def pod_phase(states: list[tuple[str, int | None]]) -> str:
    """The pod phase from its containers' (state, exit code), once each has been started.

    state is `waiting`, `running` or `terminated`; a container waiting after it ran is in
    restart back-off, so the pod has not ended (kubelet: Running).
    """
    if any(state == "running" for state, _ in states):
        return "Running"
    if all(state == "terminated" for state, _ in states):
        if all(code == 0 for _, code in states):
            return "Succeeded"
        return "Failed"
    return "Running"
