"""XFL's ten horizontal ChatGLM demo folders, written by hand as that project lays them out.

An XFL checkout holds `python/xfl.py`, `dataset/poetry_small/hhpoetry-<n>.json` and, under
`demo/horizontal/chatglm/`, the model `chatglm-demo` and one folder per demo whose `config/`
has `fed_conf.json` and a `trainer_config_<node>.json` per node (`3party_lora_env` has no
fed_conf.json: its `env.sh` exports the network instead). Paths in the configs are relative to
`python/`, as in XFL's. The shapes (which nodes, who holds data, LoRA or P-tuning v2, one-party
jobs, a node with its own model) are XFL's; the sizes are small enough for a test to run each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.jobs import write_share

MODEL = "../demo/horizontal/chatglm/chatglm-demo"
LORA = {"LORA": {"task_type": "CAUSAL_LM", "r": 4, "target_modules": ["query_key_value"], "lora_alpha": 16,
                 "lora_dropout": 0.1, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None}}
PTUNING = {"PREFIX_TUNING": {"task_type": "CAUSAL_LM", "pre_seq_len": 4, "prefix_projection": False}}
OTP = {"otp": {"key_bitlength": 64, "data_type": "torch.Tensor",
               "key_exchange": {"key_bitlength": 3072, "optimized": True},
               "csprng": {"name": "hmac_drbg", "method": "sha512"}}}
DATASET = {"max_src_length": 32, "max_dst_length": 32, "prompt_pattern": "{}：\n问：{}\n答：",
           "key_query": "input", "key_answer": "output"}
# The environment `3party_lora_env/env.sh` exports (the ports of XFL's file).
ENV_NETWORK = {"nodes": {
    "node-2": {"endpoints": [{"fuwuEndpointId": "trainer-endpoint-2", "url": "localhost:56002"}],
               "name": "follower2"},
    "node-1": {"endpoints": [{"fuwuEndpointId": "trainer-endpoint-1", "url": "localhost:56001"},
                             {"fuwuEndpointId": "scheduler-endpoint-1", "url": "localhost:55004"},
                             {"fuwuEndpointId": "assist-trainer-endpoint-1", "url": "localhost:55003"}],
               "name": "follower1"},
}}
ENV = {"__ENIGMA_FEDAPP_TASK_NETWORK__": json.dumps(ENV_NETWORK), "ENIGMA_redis_HOST": "localhost",
       "__ENIGMA_FEDAPP_LOCAL_TASK_NODE_ID__": "node-1"}


@dataclass(frozen=True)
class Demo:
    name: str
    peft: dict[str, Any]
    assist_data: int | None  # the assist_trainer's poems part, None: it only aggregates; no assist_trainer: 0
    nodes: tuple[tuple[str, int], ...]  # label_trainers and their poems part
    env: bool = False  # the network comes from the environment, not fed_conf.json
    own_model: str | None = None  # a label_trainer whose pretrained_model differs

    @property
    def standalone(self) -> bool:
        return self.assist_data == 0


DEMOS = [
    Demo("1party_lora", LORA, 0, (("node-1", 1),)),
    Demo("1party_ptuningv2", PTUNING, 0, (("node-1", 1),)),
    Demo("2party_lora", LORA, 1, (("node-2", 2),)),
    Demo("2party_lora_classic", LORA, None, (("node-1", 1), ("node-2", 2))),
    Demo("2party_ptuningv2", PTUNING, 1, (("node-2", 2),)),
    Demo("2party_ptuningv2_classic", PTUNING, None, (("node-1", 1), ("node-2", 2))),
    Demo("3party_lora", LORA, 1, (("node-1", 2), ("node-2", 3))),
    Demo("3party_lora_classic", LORA, None, (("node-1", 1), ("node-2", 2), ("node-3", 3)),
         own_model="node-3"),
    Demo("3party_lora_env", LORA, 1, (("node-1", 2), ("node-2", 3)), env=True),
    Demo("3party_ptuningv2", PTUNING, 1, (("node-1", 2), ("node-2", 3))),
]
SAMPLES = 6  # instances per poems file: 3 steps of 2 for one epoch, rounds at steps 2 and 3


def write_xfl_home(home: Path, model: Path) -> Path:
    """The parts of an XFL checkout the demos use: `python/xfl.py`, the poems, `chatglm-demo` (a link to `model`)."""
    (home / "python").mkdir(parents=True)
    (home / "python" / "xfl.py").write_text("# XFL's entry point (the import looks for this file)\n")
    poems = home / "dataset" / "poetry_small"
    poems.mkdir(parents=True)
    for part in (1, 2, 3):
        write_share(poems, part - 1, SAMPLES).rename(poems / f"hhpoetry-{part}.json")
    chatglm = home / "demo" / "horizontal" / "chatglm"
    chatglm.mkdir(parents=True)
    (chatglm / "chatglm-demo").symlink_to(model)
    (chatglm / "chatglm-demo-node-3").symlink_to(model)
    return home


def _trainer_config(identity: str, demo: Demo, part: int | None, node: str, shared: bool) -> list[dict[str, Any]]:
    model = f"{MODEL}-node-3" if node == demo.own_model else MODEL
    config: dict[str, Any] = {
        "identity": identity, "model_info": {"name": "horizontal_chatglm"},
        "input": {"pretrained_model": {"path": model}},
        "output": {"path": "/opt/checkpoints/[JOB_ID]/[NODE_ID]"},
    }
    if part is not None:
        config["input"]["trainset"] = [{"type": "QA", "path": f"../dataset/poetry_small/hhpoetry-{part}.json"}]
    local = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "save_strategy": "steps",
             "torch_compile": False, "no_cuda": True}
    if shared:
        params = {"aggregation": {"agg_steps": 0.5}, "encryption": OTP, "peft": demo.peft,
                  "trainer": {**local, "learning_rate": 1e-2, "weight_decay": 0, "adam_beta1": 0.9,
                              "adam_beta2": 0.999, "adam_epsilon": 1e-8, "max_grad_norm": 1.0,
                              "num_train_epochs": 1, "seed": 42},
                  "dataset": DATASET}
    else:
        params = {"trainer": local}
    config["train_info"] = {"train_params": params}
    return [config]


def write_demo(home: Path, demo: Demo) -> Path:
    """`demo/horizontal/chatglm/<demo>/config` as XFL's is; returns the config folder."""
    config = home / "demo" / "horizontal" / "chatglm" / demo.name / "config"
    config.mkdir(parents=True)
    ports = iter(range(56001, 56010))
    trainers = {node: f"localhost:{next(ports)}" for node, _ in demo.nodes}
    fed_info: dict[str, Any] = {"scheduler": {"scheduler": "localhost:55005"}, "trainer": trainers}
    if not demo.standalone:
        fed_info["assist_trainer"] = {"assist_trainer": "localhost:55004"}
        (config / "trainer_config_assist_trainer.json").write_text(json.dumps(
            _trainer_config("assist_trainer", demo, demo.assist_data, "assist_trainer", shared=True),
            ensure_ascii=False, indent=4))
    for node, part in demo.nodes:
        (config / f"trainer_config_{node}.json").write_text(json.dumps(
            _trainer_config("label_trainer", demo, part, node, shared=demo.standalone), ensure_ascii=False, indent=4))
    if demo.env:
        (config.parent / "env.sh").write_text("".join(f"export {k}='{v}'\n" for k, v in ENV.items()))
    else:
        (config / "fed_conf.json").write_text(json.dumps(
            {"fed_info": fed_info, "redis_server": "localhost:6379", "grpc": {"use_tls": False}}, indent=4))
    return config
