"""A 3-party job for each adapter type beyond LoRA and P-tuning v2: it runs through, every party ends with the
same global adapter, and AdaLoRA's parties prune the same ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.jobs import PARTIES, assert_identical_adapters, run_cli, write_job

pytestmark = pytest.mark.slow

TYPES = {
    "ADALORA": {"init_r": 4, "target_r": 2, "target_modules": ["query_key_value"]},
    "IA3": {"target_modules": ["query_key_value", "dense_4h_to_h"], "feedforward_modules": ["dense_4h_to_h"]},
    "LOHA": {"r": 4, "target_modules": ["query_key_value"]},
    "LOKR": {"r": 4, "target_modules": ["query_key_value"]},
    "OFT": {"target_modules": ["query_key_value"]},
    "BOFT": {"target_modules": ["query_key_value"], "boft_block_size": 4},
}


@pytest.mark.parametrize("kind", list(TYPES))
def test_three_party_job_for_each_adapter_type(tmp_path: Path, tiny_model: Path, kind: str) -> None:
    job = write_job(tmp_path / "job", tiny_model, peft={kind: TYPES[kind]}, sizes=(8, 8, 8), epochs=1)
    out = tmp_path / "out"
    done = run_cli("run", str(job), "--output", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phase"] == "Succeeded"
    for checkpoint in ("checkpoint-0.5", "checkpoint-1"):
        final = assert_identical_adapters(out, checkpoint)
    config = json.loads((out / PARTIES[1] / "checkpoint-1" / "adapter_config.json").read_text())
    assert config["peft_type"] == kind
    if kind == "ADALORA":  # the last round prunes to target_r per module, the same triplets at every party
        kept = config["rank_pattern"]
        assert kept and all(sum(mask) <= 4 for mask in kept.values())
        assert sum(sum(mask) for mask in kept.values()) == 2 * len(kept)
        assert sum(t.shape[0] for n, t in final.items() if "lora_E" in n) == 2 * len(kept)
        for party in PARTIES[1:]:
            other = json.loads((out / party / "checkpoint-1" / "adapter_config.json").read_text())
            assert other["rank_pattern"] == kept


def test_an_adalora_party_restarted_mid_job_keeps_the_ranks_pruned_before(tmp_path: Path, tiny_model: Path) -> None:
    """Both label_trainers are killed after round 1 (which pruned some triplets) and restarted. What node-1 then
    sends for round 2 holds those triplets at zero: on resuming it rebuilt the rank pattern from round 1's global
    adapter (without that, training revives them until the next round). node-2 is kept down until that update
    is read, so round 2 cannot complete (and clear it) first."""
    import signal

    from fedtune.federation import transport
    from fedtune.federation.party import STATE_DIR
    from fedtune.local.launcher import LocalJob
    from fedtune.spec import load_job
    from fedtune.train.loop import latest_state
    from support.jobs import wait_until

    job_path = write_job(tmp_path / "job", tiny_model, peft={"ADALORA": TYPES["ADALORA"]}, sizes=(24, 200, 200),
                         agg_steps=0.34, epochs=1)
    local = LocalJob(load_job(job_path), tmp_path / "out", job_path.parent)
    state_of = {p: local.output / p / STATE_DIR / "trainer" for p in PARTIES[1:]}
    try:
        local.start()
        wait_until(lambda: all(latest_state(s) is not None for s in state_of.values()), 240, "round 1's states", local)
        for party in PARTIES[1:]:
            local.kill_role(party, signal.SIGKILL)
        assert not local.state.submitted(2) & set(PARTIES[1:]), "a label_trainer sent round 2 before it was killed"
        local.start_role("node-1")
        wait_until(lambda: "node-1" in local.state.submitted(2), 240, "node-1's round-2 update")
        update = transport.unpack_tensors(local.state.updates(2)["node-1"])
        local.start_role("node-2")
        wait_until(local.finished, 300, "the job to finish", local)
    finally:
        local.stop()
    singular = [t for name, t in update.items() if "lora_E" in name]
    pruned = sum(int((t == 0).sum()) for t in singular)
    assert 0 < pruned < sum(t.size for t in singular), f"{pruned} of node-1's triplets are zero in round 2"
