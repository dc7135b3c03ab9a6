"""`fedtune import-xfl`: an XFL horizontal ChatGLM config folder becomes one FederatedFineTune YAML.

The folder holds `fed_conf.json` (addresses of the scheduler, trainers and assist_trainer)
and one `trainer_config_<node>.json` per node, each a one-element list whose object has
`identity`, `model_info`, `input`, `output` and `train_info.train_params`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.spec import API_VERSION, KIND, LOCAL_TRAINER_KEYS, SpecError, dump_job, parse_job

_SECTIONS = ("aggregation", "encryption", "peft", "trainer", "dataset")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: not found") from None
    except json.JSONDecodeError as err:
        raise SpecError(f"{path}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None


def _node_config(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if isinstance(data, list):
        if len(data) != 1 or not isinstance(data[0], dict):
            raise SpecError(f"{path}: expected a list holding one operator config object")
        data = data[0]
    if not isinstance(data, dict) or "identity" not in data:
        raise SpecError(f"{path}: missing `identity` (assist_trainer or label_trainer)")
    return data


def _params(config: dict[str, Any], path: Path) -> dict[str, Any]:
    params = config.get("train_info", {}).get("train_params", {})
    if not isinstance(params, dict):
        raise SpecError(f"{path}: train_info.train_params must be an object")
    return params


def _nodes(fed_conf: dict[str, Any], config_dir: Path) -> dict[str, Path]:
    """Node name -> its trainer_config file, for every trainer and the assist_trainer in fed_conf."""
    info = fed_conf.get("fed_info", {})
    names = list(info.get("assist_trainer", {})) + list(info.get("trainer", {}))
    if not names:
        raise SpecError(f"{config_dir / 'fed_conf.json'}: fed_info lists no trainer or assist_trainer")
    return {name: config_dir / f"trainer_config_{name}.json" for name in names}


def import_xfl(config_dir: Path, *, name: str | None = None) -> str:
    fed_conf = _read_json(config_dir / "fed_conf.json")
    paths = _nodes(fed_conf, config_dir)
    configs = {node: _node_config(path) for node, path in paths.items()}
    assist = [n for n, c in configs.items() if c["identity"] == "assist_trainer"]
    if len(assist) != 1:
        raise SpecError(f"{config_dir}: expected one trainer_config with identity assist_trainer, found {len(assist)}")
    assist_config = configs[assist[0]]
    params = _params(assist_config, paths[assist[0]])
    spec: dict[str, Any] = {key: params[key] for key in _SECTIONS if key in params}
    _keep_reference_crypto(spec.get("encryption"))
    spec["input"] = {k: v for k, v in assist_config.get("input", {}).items() if k != "trainset"}
    if "output" in assist_config:
        spec["output"] = assist_config["output"]
    spec["parties"] = [_party(node, config, paths[node]) for node, config in configs.items()]
    spec["tls"] = {"enabled": bool(fed_conf.get("grpc", {}).get("use_tls", False))}
    job_name = (name or config_dir.resolve().name).lower().replace("_", "-")
    document = {"apiVersion": API_VERSION, "kind": KIND,
                "metadata": {"name": job_name}, "spec": spec}
    header = f"# Imported from the XFL config folder {config_dir.name} by `fedtune import-xfl`.\n"
    return header + dump_job(parse_job(document, str(config_dir)))


def _keep_reference_crypto(encryption: Any) -> None:
    """An imported `otp` keeps the reference's key exchange and generator (ffdhe, HMAC_DRBG), written
    out: fedtune's own defaults are x25519 and chacha20."""
    otp = encryption.get("otp") if isinstance(encryption, dict) else None
    if not isinstance(otp, dict):
        return
    for section, key, value in (("key_exchange", "curve", "ffdhe"), ("csprng", "name", "hmac_drbg")):
        if isinstance(otp.setdefault(section, {}), dict):
            otp[section].setdefault(key, value)


def _party(node: str, config: dict[str, Any], path: Path) -> dict[str, Any]:
    party: dict[str, Any] = {"name": node, "role": config["identity"]}
    trainset = config.get("input", {}).get("trainset")
    if trainset:
        party["trainset"] = trainset
    trainer = _params(config, path).get("trainer", {})
    local = {k: v for k, v in trainer.items() if k in LOCAL_TRAINER_KEYS}
    if local and config["identity"] != "assist_trainer":
        party["trainer"] = local
    return party

