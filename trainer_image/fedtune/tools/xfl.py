"""`fedtune import-xfl`: an XFL horizontal ChatGLM config folder becomes one FederatedFineTune that runs as
the folder runs under XFL.

The folder holds one `trainer_config_<node>.json` per node (a one-element list whose object has
`identity`, `model_info`, `input`, `output` and `train_info.train_params`) and the addresses in
`fed_conf.json` (or `fed_conf_<node>.json`). Without those, XFL reads the network from the
environment, and so does the import: `__ENIGMA_FEDAPP_TASK_NETWORK__` (nodes and their endpoints)
and `ENIGMA_redis_HOST` (Redis on its port 6379).

What the import decides, each as XFL would run the folder:
- Paths: XFL resolves a relative model, adapter or dataset path against the folder holding its
  `xfl.py` (`<XFL>/python` in a checkout, the image's `/opt/app/xfl`), and the output path against
  its working folder (the XFL home its scripts `cd` to). The import finds that folder above the
  config folder, or takes `base_dir`, and writes absolute paths.
- Addresses: the scheduler's and Redis's become `spec.scheduler.address` and `spec.redis.address`;
  the nodes not run here (`local`) become `remote` parties at their address.
- Each node keeps its own `pretrained_model` where it differs from the assist_trainer's, and its
  own per-party trainer keys (transformers' defaults where its file has none, as XFL gets them).
- `aggregation.weighting: uniform`: XFL averages the parties' adapters with equal weights.
- A single node with no assist_trainer trains alone, as XFL's one-party demos do.
- `grpc.use_tls: false` is not carried over: the job keeps mutual TLS on.
- The job is named after the folder (the demo's own, when the config folder is called `config`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.spec import API_VERSION, KIND, LOCAL_TRAINER_KEYS, SpecError, dump_job, parse_job

_SECTIONS = ("aggregation", "encryption", "peft", "trainer", "dataset")
NETWORK_ENV = "__ENIGMA_FEDAPP_TASK_NETWORK__"
REDIS_HOST_ENV = "ENIGMA_redis_HOST"
REDIS_PORT = 6379  # XFL's port when the environment names only the host
ASSIST = "assist_trainer"
# What a label_trainer's own trainer keys are in XFL when its file leaves them out: TrainingArguments' defaults.
REFERENCE_LOCAL_DEFAULTS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                            "torch_compile": False, "no_cuda": False}


@dataclass
class Network:
    """Who is in the federation and where: node name -> address, the assist_trainer's under `assist_trainer`."""

    nodes: dict[str, str]
    scheduler: str | None
    redis: str | None
    use_tls: bool
    source: str  # what the addresses came from, for messages


@dataclass
class Imported:
    """The job YAML and the lines that tell the user what the import decided."""

    text: str
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: not found") from None
    except json.JSONDecodeError as err:
        raise SpecError(f"{path}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None


def _address(value: Any, where: str) -> str:
    """`host:port` as XFL writes it (spaces allowed, `grpc://` or `grpcs://` in the environment's URLs)."""
    text = re.sub(r"^grpcs?://", "", str(value).replace(" ", ""))
    if not re.fullmatch(r"[^\s:/]+:\d+", text):
        raise SpecError(f"{where}: `{value}` is not host:port")
    return text


# --- the network: fed_conf.json or the environment ----------------------------------------


def read_network(config_dir: Path, environ: dict[str, str]) -> Network:
    candidates = [config_dir / "fed_conf.json", *sorted(config_dir.glob("fed_conf_*.json"))]
    found = next((p for p in candidates if p.is_file()), None)
    if found is not None:
        return _network_from_fed_conf(_read_json(found), found)
    if environ.get(NETWORK_ENV):
        return _network_from_environment(environ)
    raise SpecError(f"{config_dir}: no fed_conf.json, and ${NETWORK_ENV} is not set: where do the nodes run?")


def _network_from_fed_conf(conf: Any, path: Path) -> Network:
    info = conf.get("fed_info") if isinstance(conf, dict) else None
    if not isinstance(info, dict):
        raise SpecError(f"{path}: missing `fed_info`")
    nodes: dict[str, str] = {}
    for section in (ASSIST, "trainer"):
        for name, address in (info.get(section) or {}).items():
            key = ASSIST if section == ASSIST else name
            nodes[key] = _address(address, f"{path}: fed_info.{section}.{name}")
    if not nodes:
        raise SpecError(f"{path}: fed_info lists no trainer or assist_trainer")
    scheduler = next(iter((info.get("scheduler") or {}).values()), None)
    return Network(
        nodes=nodes,
        scheduler=_address(scheduler, f"{path}: fed_info.scheduler") if scheduler else None,
        redis=_address(conf["redis_server"], f"{path}: redis_server") if conf.get("redis_server") else None,
        use_tls=bool((conf.get("grpc") or {}).get("use_tls")),
        source=str(path),
    )


def _network_from_environment(environ: dict[str, str]) -> Network:
    """XFL's own reading of `__ENIGMA_FEDAPP_TASK_NETWORK__`: endpoint ids say which role serves where."""
    where = f"${NETWORK_ENV}"
    try:
        network = json.loads(environ[NETWORK_ENV])
        endpoints = [(node, e["fuwuEndpointId"], e["url"]) for node, value in network["nodes"].items()
                     for e in value["endpoints"]]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise SpecError(f"{where}: not XFL's task network ({{\"nodes\": {{node: {{\"endpoints\": [...]}}}}}}): "
                        f"{err}") from None
    nodes: dict[str, str] = {}
    scheduler = None
    use_tls = False
    for node, endpoint, url in endpoints:
        use_tls = use_tls or str(url).startswith("grpcs://")
        address = _address(url, f"{where}: nodes.{node}")
        if "scheduler" in endpoint:
            scheduler = address
        elif "assist-trainer" in endpoint:
            nodes[ASSIST] = address
        elif "trainer" in endpoint:
            nodes[node] = address
    redis_host = environ.get(REDIS_HOST_ENV)
    return Network(nodes=nodes, scheduler=scheduler, redis=f"{redis_host}:{REDIS_PORT}" if redis_host else None,
                   use_tls=use_tls, source=where)


# --- paths as XFL resolves them -----------------------------------------------------------


def find_xfl_base(config_dir: Path) -> Path | None:
    """The folder holding XFL's `xfl.py` above the config folder: `<XFL>/python` or the image's app folder."""
    for folder in config_dir.resolve().parents:
        for candidate in (folder / "python", folder):
            if (candidate / "xfl.py").is_file():
                return candidate
    return None


class _Paths:
    """Relative paths of one config folder, made absolute as XFL makes them."""

    def __init__(self, config_dir: Path, base_dir: Path | None) -> None:
        self.config_dir = config_dir
        self.base = base_dir.resolve() if base_dir is not None else find_xfl_base(config_dir)

    def resolve(self, path: str, where: str, *, working_dir: bool = False) -> str:
        if os.path.isabs(path):
            return path
        if self.base is None:
            raise SpecError(f"{where}: `{path}` is relative, and XFL resolves it against the folder holding its "
                            f"xfl.py, which is not above {self.config_dir}; pass --base-dir")
        # The output path is relative to the working folder XFL's scripts run in: the XFL home.
        base = self.base.parent if working_dir and self.base.name == "python" else self.base
        return os.path.normpath(base / path)


# --- one node's trainer_config ----------------------------------------------------------------


def _node_config(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if isinstance(data, list):
        if len(data) != 1 or not isinstance(data[0], dict):
            raise SpecError(f"{path}: expected a list holding one operator config object")
        data = data[0]
    if not isinstance(data, dict) or data.get("identity") not in (ASSIST, "label_trainer"):
        raise SpecError(f"{path}: `identity` must be assist_trainer or label_trainer")
    model = (data.get("model_info") or {}).get("name")
    if model != "horizontal_chatglm":
        raise SpecError(f"{path}: model_info.name is {model!r}; fedtune runs horizontal_chatglm")
    return data


def _params(config: dict[str, Any], path: Path) -> dict[str, Any]:
    params = (config.get("train_info") or {}).get("train_params") or {}
    if not isinstance(params, dict):
        raise SpecError(f"{path}: train_info.train_params must be an object")
    return params


def _input_paths(section: dict[str, Any], paths: _Paths, where: str) -> dict[str, Any]:
    """`input` with its model, adapter, trainset and valset paths resolved."""
    out: dict[str, Any] = {}
    for key in ("pretrained_model", "adapter_model"):
        if section.get(key):
            out[key] = {"path": paths.resolve(section[key]["path"], f"{where}: input.{key}.path")}
    for key in ("trainset", "valset"):
        if section.get(key):
            out[key] = [{"type": e.get("type", "QA"),
                         "path": paths.resolve(e["path"], f"{where}: input.{key}[{i}].path")}
                        for i, e in enumerate(section[key])]
    return out


# --- the whole folder -------------------------------------------------------------------------


def job_name(config_dir: Path) -> str:
    """The demo's folder name when the config folder is called `config`, as a resource name."""
    folder = config_dir.resolve()
    name = folder.parent.name if folder.name == "config" else folder.name
    name = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40].strip("-")
    return name if re.match(r"[a-z]", name) else f"xfl-{name}".rstrip("-")


def import_xfl(config_dir: Path, *, name: str | None = None, base_dir: Path | None = None,
               local: list[str] | None = None, environ: dict[str, str] | None = None) -> Imported:
    """The job for `config_dir`; `local` names the nodes run here (default: all), the others become remote."""
    network = read_network(config_dir, dict(os.environ) if environ is None else environ)
    unknown = sorted(set(local or []) - set(network.nodes))
    if unknown:
        raise SpecError(f"--local {unknown[0]}: not a node of {network.source} (have: {', '.join(network.nodes)})")
    here = set(local or network.nodes)
    paths = _Paths(config_dir, base_dir)
    files = {node: config_dir / f"trainer_config_{node}.json" for node in network.nodes}
    configs = {node: _node_config(path) for node, path in files.items() if node in here or path.is_file()}
    authority = ASSIST if ASSIST in network.nodes else next(iter(network.nodes))
    if authority not in configs:
        raise SpecError(f"{files[authority]}: not found (it holds the federation's shared settings)")
    if len(network.nodes) == 1 and configs[authority]["identity"] != "label_trainer":
        raise SpecError(f"{files[authority]}: a node alone trains as a label_trainer, not an assist_trainer")
    main_config = configs[authority]
    main_params = _params(main_config, files[authority])
    spec: dict[str, Any] = {key: main_params[key] for key in _SECTIONS if key in main_params}
    _keep_reference_crypto(spec.get("encryption"))
    spec["trainer"] = {k: v for k, v in spec.get("trainer", {}).items() if k != "save_strategy"}
    shared_input = _input_paths(main_config.get("input") or {}, paths, str(files[authority]))
    spec["input"] = {k: v for k, v in shared_input.items() if k not in ("trainset", "valset")}
    if (main_config.get("output") or {}).get("path"):
        spec["output"] = {"path": paths.resolve(main_config["output"]["path"], f"{files[authority]}: output.path",
                                                working_dir=True)}
    spec.setdefault("aggregation", {})["weighting"] = "uniform"
    spec["parties"] = [_party(node, configs.get(node), files[node], network.nodes[node], node in here, spec, paths)
                       for node in network.nodes]
    if network.scheduler:
        spec["scheduler"] = {"address": network.scheduler}
    if network.redis:
        spec["redis"] = {"address": network.redis}
    spec["tls"] = {"enabled": True}
    document = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name or job_name(config_dir)},
                "spec": spec}
    job = parse_job(document, str(config_dir))
    notes = ["aggregation.weighting: uniform, XFL's plain mean of the parties' adapters "
             "(`samples` weights each party by its number of training samples)"]
    if not network.use_tls:
        notes.append(f"{network.source} turns TLS off (grpc.use_tls: false); the imported job keeps mutual TLS on")
    if len(network.nodes) == 1:
        notes.append(f"`{authority}` is the only node: it trains alone, without aggregation")
    header = (f"# Imported from the XFL config folder {config_dir.resolve().name} by `fedtune import-xfl`.\n"
              "# aggregation.weighting: uniform is XFL's plain mean; `samples` weights parties by their data.\n")
    return Imported(header + dump_job(job), notes)


def _keep_reference_crypto(encryption: Any) -> None:
    """An imported `otp` keeps the reference's key exchange and generator (ffdhe, HMAC_DRBG), written
    out: fedtune's own defaults are x25519 and chacha20."""
    otp = encryption.get("otp") if isinstance(encryption, dict) else None
    if not isinstance(otp, dict):
        return
    for section, key, value in (("key_exchange", "curve", "ffdhe"), ("csprng", "name", "hmac_drbg")):
        if isinstance(otp.setdefault(section, {}), dict):
            otp[section].setdefault(key, value)


def _party(node: str, config: dict[str, Any] | None, path: Path, address: str, is_local: bool,
           spec: dict[str, Any], paths: _Paths) -> dict[str, Any]:
    identity = config["identity"] if config else (ASSIST if node == ASSIST else "label_trainer")
    party: dict[str, Any] = {"name": node, "role": identity}
    if not is_local:
        party["remote"] = {"address": address}
    if config is None:
        return party
    own = _input_paths(config.get("input") or {}, paths, str(path))
    for key in ("trainset", "valset"):
        if own.get(key):
            party[key] = own[key]
    model = own.get("pretrained_model")
    if model and model != spec["input"].get("pretrained_model"):
        party["pretrained_model"] = model
    if identity == "label_trainer":
        trainer = _params(config, path).get("trainer") or {}
        party["trainer"] = {k: trainer.get(k, REFERENCE_LOCAL_DEFAULTS[k]) for k in LOCAL_TRAINER_KEYS}
    return party
