"""What a pod template overlay (`scheduling.podTemplate`) may set: a list of safe fields, and the fields that
would let whoever may create a FederatedFineTune escalate through the operator's pods.

The operator creates pods for anyone allowed to create a job, so the overlay must not reach what a
restricted pod forbids: the node's namespaces (`hostNetwork`, `hostPID`, `hostIPC`), its filesystem
(`hostPath`) and ports (`hostPort`), privileged containers, added capabilities, privilege escalation, or
another identity (`serviceAccountName`, `serviceAccount`, `automountServiceAccountToken: true`).

Two layers enforce it, from these tables:
- the CRD (`kubeschema.pod_template_overlay`): a field outside the safe list is not in its schema, and
  each field of `REFUSED` is refused by a CEL rule naming it, so `kubectl apply` fails on it;
- the operator (`problems`), before it builds a pod, whatever the installed CRD let through.
A cluster that wants some of `REFUSED` names them in the chart's `podTemplate.allow` (the operator reads
`FEDTUNE_POD_TEMPLATE_ALLOW`) and installs the CRD made with them allowed (`crdgen --allow NAME`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

ALLOW_ENV = "FEDTUNE_POD_TEMPLATE_ALLOW"

# The safe fields of each level of a pod template overlay. A field listed here takes whatever the Pod API
# accepts there (its own schema), but for the levels below, which are cut down in turn.
METADATA = ("labels", "annotations")
POD = ("affinity", "tolerations", "nodeSelector", "topologySpreadConstraints", "schedulingGates", "priorityClassName",
       "schedulerName", "runtimeClassName", "imagePullSecrets", "dnsPolicy", "dnsConfig", "hostAliases",
       "terminationGracePeriodSeconds", "enableServiceLinks", "readinessGates", "resourceClaims", "securityContext",
       "containers", "initContainers", "volumes")  # fmt: skip
POD_SECURITY = ("fsGroup", "fsGroupChangePolicy", "supplementalGroups", "supplementalGroupsPolicy")
CONTAINER = ("name", "image", "imagePullPolicy", "command", "args", "workingDir", "env", "envFrom", "resources",
             "resizePolicy", "volumeMounts", "ports", "livenessProbe", "readinessProbe", "startupProbe", "lifecycle",
             "restartPolicy", "terminationMessagePath", "terminationMessagePolicy", "securityContext")  # fmt: skip
CONTAINER_SECURITY = ("readOnlyRootFilesystem", "capabilities")
PORT = ("name", "containerPort", "protocol")
VOLUME = ("name", "emptyDir", "configMap", "secret", "persistentVolumeClaim", "ephemeral", "downwardAPI")

Level = Literal["pod", "securityContext", "port", "volume"]
# A level's safe fields, by the level's name.
SAFE: dict[Level, tuple[str, ...]] = {"pod": POD, "securityContext": CONTAINER_SECURITY, "port": PORT,
                                      "volume": VOLUME}  # fmt: skip


@dataclass(frozen=True)
class Refused:
    """A field that would escalate: refused when `when` holds of it, unless a cluster allows `name`."""

    name: str  # how podTemplate.allow names it
    level: Level
    path: tuple[str, ...]  # within its level, e.g. ("capabilities", "add")
    when: Literal["true", "set", "nonempty"]
    why: str

    @property
    def field(self) -> str:
        return ".".join(self.path)

    def refuses(self, node: Mapping[str, Any]) -> bool:
        value: Any = node
        for key in self.path:
            if not isinstance(value, Mapping) or key not in value:
                return False
            value = value[key]
        return {"true": value is True, "set": value is not None, "nonempty": bool(value)}[self.when]

    def message(self) -> str:
        what = {"true": f"{self.field}: true", "set": self.field, "nonempty": self.field}[self.when]
        return (f"{what} is not allowed in a pod template ({self.why}); a cluster that wants it lists "
                f"`{self.name}` in the operator chart's podTemplate.allow")

    def rule(self) -> dict[str, str]:
        """The CEL rule that refuses it, on the schema node of its level."""
        absent = [f"!has(self.{'.'.join(self.path[:i + 1])})" for i in range(len(self.path))]
        fine = {"true": [f"!self.{self.field}"], "set": [], "nonempty": [f"size(self.{self.field}) == 0"]}[self.when]
        return {"rule": " || ".join(absent + fine), "message": self.message(), "fieldPath": "." + self.field}


REFUSED = (
    Refused("hostNetwork", "pod", ("hostNetwork",), "true", "it would share the node's network"),
    Refused("hostPID", "pod", ("hostPID",), "true", "it would see the node's processes"),
    Refused("hostIPC", "pod", ("hostIPC",), "true", "it would share the node's IPC namespace"),
    Refused("serviceAccountName", "pod", ("serviceAccountName",), "set",
            "the job's pods run as no service account of their own choosing"),
    Refused("serviceAccountName", "pod", ("serviceAccount",), "set",
            "the job's pods run as no service account of their own choosing"),
    Refused("automountServiceAccountToken", "pod", ("automountServiceAccountToken",), "true",
            "the job's pods never talk to the Kubernetes API"),
    Refused("privileged", "securityContext", ("privileged",), "true", "a privileged container owns the node"),
    Refused("allowPrivilegeEscalation", "securityContext", ("allowPrivilegeEscalation",), "true",
            "a process could gain more privileges than it started with"),
    Refused("capabilities", "securityContext", ("capabilities", "add"), "nonempty",
            "every capability is dropped"),
    Refused("hostPath", "volume", ("hostPath",), "set", "it would mount the node's filesystem"),
    Refused("hostPort", "port", ("hostPort",), "set", "it would bind a port of the node"),
)
NAMES = tuple(dict.fromkeys(r.name for r in REFUSED))


def refused(level: Level, allow: Iterable[str] = ()) -> list[Refused]:
    """The refusals in force on one level when `allow` names some of them."""
    allowed = set(allow)
    return [r for r in REFUSED if r.level == level and r.name not in allowed]


def escalating(level: Level) -> list[str]:
    """The fields of a level that some refusal looks into (kept in the CRD's schema, for its rule to see)."""
    return list(dict.fromkeys(r.path[0] for r in REFUSED if r.level == level))


def allowed_from_env(environ: Mapping[str, str]) -> frozenset[str]:
    """podTemplate.allow as the chart hands it to the operator: names, comma-separated."""
    names = {n.strip() for n in environ.get(ALLOW_ENV, "").split(",") if n.strip()}
    unknown = names - set(NAMES)
    if unknown:
        raise ValueError(f"{ALLOW_ENV}: {', '.join(sorted(unknown))} is none of {', '.join(NAMES)}")
    return frozenset(names)


# --- the operator's own check ------------------------------------------------------------------------


def problems(overlay: Mapping[str, Any] | None, where: str, allow: Iterable[str] = ()) -> list[str]:
    """Why the operator will not build a pod with `overlay` (found at `where`, e.g.
    `spec.scheduling.podTemplate`): each field outside the safe list, each escalation not allowed."""
    if not overlay:
        return []
    allow = frozenset(allow)
    out = _unknown(overlay, ("metadata", "spec"), where)
    out += _unknown(overlay.get("metadata") or {}, METADATA, f"{where}.metadata")
    spec = overlay.get("spec") or {}
    out += _level(spec, "pod", f"{where}.spec", allow)
    out += _unknown(spec.get("securityContext") or {}, POD_SECURITY, f"{where}.spec.securityContext")
    for key in ("containers", "initContainers"):
        for i, container in enumerate(spec.get(key) or []):
            at = f"{where}.spec.{key}[{i}]"
            out += _unknown(container, CONTAINER, at)
            out += _level(container.get("securityContext") or {}, "securityContext", f"{at}.securityContext", allow)
            for j, port in enumerate(container.get("ports") or []):
                out += _level(port, "port", f"{at}.ports[{j}]", allow)
    for i, volume in enumerate(spec.get("volumes") or []):
        out += _level(volume, "volume", f"{where}.spec.volumes[{i}]", allow)
    return out


def _level(node: Mapping[str, Any], level: Level, where: str, allow: frozenset[str]) -> list[str]:
    """A level's refused fields first (named for what they do), then any other field outside its safe list."""
    out = [f"{where}.{r.field}: {r.message()}" for r in refused(level, allow) if r.refuses(node)]
    unknown = [k for k in node if k not in SAFE[level] and k not in escalating(level)]
    return out + _unknown({k: node[k] for k in unknown}, (), where)


def _unknown(node: Mapping[str, Any], safe: tuple[str, ...], where: str) -> list[str]:
    return [f"{where}.{key}: not a field a pod template may set (the safe ones are listed in the README)"
            for key in node if key not in safe]
