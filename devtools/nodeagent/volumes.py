"""Pod volumes as host folders and files, and each container's bind mounts onto them.

- persistentVolumeClaim: `<data>/volumes/<namespace>/<claim>`, named after the claim (not
  its uid) so a test or a user can put a model there before applying anything, and so
  the data outlives the claim, as a retained volume's would;
- configMap, secret, downwardAPI, projected: files written into the pod's folder, each
  key a file (`items` pick and rename keys), written atomically through a fresh folder;
- emptyDir: a folder in the pod's folder, gone with the pod;
- hostPath: the host path itself.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .podspec import ConfigError, Lookup, Obj, expand, field_value

# (namespace, service account, audience, seconds, pod) -> a token (TokenRequest).
TokenSource = Callable[[str, str, str, int, Obj], str]


@dataclass(frozen=True)
class Mount:
    source: str  # host path
    target: str  # path in the container
    read_only: bool
    file: bool

    def as_json(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "readOnly": self.read_only, "file": self.file}


def claim_dir(data_dir: Path, namespace: str, claim: str) -> Path:
    return data_dir / "volumes" / namespace / claim


def _write_files(folder: Path, files: dict[str, bytes], mode: int) -> None:
    """Replace `folder`'s content at once: write a sibling, then swap it in."""
    fresh = folder.with_name(f".{folder.name}.{time.monotonic_ns()}")
    fresh.mkdir(parents=True)
    for rel, data in files.items():
        path = fresh / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    if folder.exists():
        # Containers bind the folder, not its files, so a running one sees the new content.
        for child in list(folder.iterdir()):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        for child in fresh.iterdir():
            child.rename(folder / child.name)
        fresh.rmdir()
    else:
        fresh.rename(folder)


def _key_files(data: dict[str, bytes], items: list[Obj] | None, what: str, optional: bool) -> dict[str, bytes]:
    if not items:
        return data
    out = {}
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise ConfigError(f"{what}: no key {item['key']}")
        out[item["path"]] = data[item["key"]]
    return out


class VolumePreparer:
    def __init__(self, data_dir: Path, lookup: Lookup, token: TokenSource) -> None:
        self.data_dir = data_dir
        self.lookup = lookup
        self.token = token

    def _object_files(self, kind: str, namespace: str, source: Obj) -> dict[str, bytes]:
        name = source.get("name") or source.get("secretName") or ""
        obj = self.lookup(kind, namespace, name)
        if obj is None:
            if source.get("optional"):
                return {}
            raise ConfigError(f'{kind.lower()} "{name}" not found')
        if kind == "Secret":
            data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        else:
            data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return _key_files(data, source.get("items"), f"{kind} {namespace}/{name}", bool(source.get("optional")))

    def _downward_files(self, pod: Obj, source: Obj) -> dict[str, bytes]:
        out = {}
        for item in source.get("items") or []:
            if "fieldRef" not in item:
                raise ConfigError(f"downwardAPI item {item['path']}: only fieldRef is supported")
            out[item["path"]] = field_value(pod, item["fieldRef"]["fieldPath"]).encode()
        return out

    def _projected_files(self, pod: Obj, source: Obj) -> dict[str, bytes]:
        namespace = pod["metadata"]["namespace"]
        out: dict[str, bytes] = {}
        for part in source.get("sources") or []:
            if "serviceAccountToken" in part:
                sat = part["serviceAccountToken"]
                account = pod["spec"].get("serviceAccountName") or "default"
                seconds = int(sat.get("expirationSeconds") or 3600)
                token = self.token(namespace, account, sat.get("audience") or "", seconds, pod)
                out[sat["path"]] = token.encode()
            elif "configMap" in part:
                out.update(self._object_files("ConfigMap", namespace, part["configMap"]))
            elif "secret" in part:
                out.update(self._object_files("Secret", namespace, part["secret"]))
            elif "downwardAPI" in part:
                out.update(self._downward_files(pod, part["downwardAPI"]))
        return out

    def prepare(self, pod: Obj, pod_dir: Path) -> dict[str, Path]:
        """Every volume of the pod as a host path (volume name -> path); (re)writes file volumes."""
        namespace = pod["metadata"]["namespace"]
        paths: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            folder = pod_dir / "volumes" / name
            mode = 0o644
            if "persistentVolumeClaim" in volume:
                path = claim_dir(self.data_dir, namespace, volume["persistentVolumeClaim"]["claimName"])
                path.mkdir(parents=True, exist_ok=True)
                paths[name] = path
                continue
            if "emptyDir" in volume:
                folder.mkdir(parents=True, exist_ok=True)
                folder.chmod(0o777)  # as kubelet makes them: writable by any container user
                paths[name] = folder
                continue
            if "hostPath" in volume:
                host = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") in ("DirectoryOrCreate",):
                    host.mkdir(parents=True, exist_ok=True)
                paths[name] = host
                continue
            if "configMap" in volume:
                files = self._object_files("ConfigMap", namespace, volume["configMap"])
                mode = int(volume["configMap"].get("defaultMode", 0o644))
            elif "secret" in volume:
                files = self._object_files("Secret", namespace, volume["secret"])
                mode = int(volume["secret"].get("defaultMode", 0o644))
            elif "downwardAPI" in volume:
                files = self._downward_files(pod, volume["downwardAPI"])
            elif "projected" in volume:
                files = self._projected_files(pod, volume["projected"])
                mode = int(volume["projected"].get("defaultMode", 0o644))
            else:
                kinds = sorted(k for k in volume if k != "name")
                raise ConfigError(f"volume {name}: unsupported volume type {kinds}")
            _write_files(folder, files, mode)
            paths[name] = folder
        return paths


def container_mounts(container: Obj, volume_paths: dict[str, Path], env: dict[str, str]) -> list[Mount]:
    """The container's volumeMounts as binds from host paths (subPath made if missing)."""
    mounts = []
    for vm in container.get("volumeMounts") or []:
        if vm["name"] not in volume_paths:
            raise ConfigError(f"volumeMount {vm['mountPath']}: no volume named {vm['name']}")
        source = volume_paths[vm["name"]]
        sub = vm.get("subPath") or expand(vm.get("subPathExpr") or "", env)
        if sub:
            if os.path.isabs(sub) or ".." in Path(sub).parts:
                raise ConfigError(f"volumeMount {vm['mountPath']}: subPath {sub} must be relative, without ..")
            source = source / sub
            if not source.exists():
                source.mkdir(parents=True)  # the kubelet makes a missing subPath a folder
        mounts.append(Mount(str(source), vm["mountPath"], bool(vm.get("readOnly")), source.is_file()))
    return mounts
