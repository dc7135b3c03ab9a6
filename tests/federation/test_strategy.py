"""Strategies: FedAvg's weights, FedAdam's and FedYogi's server step against the formula worked out here
element by element, their state kept in Redis across an aggregator's restart, and the spec's checks."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedtune.cli import main
from fedtune.federation import strategy, transport
from fedtune.federation.aggregator import AggregatorClient, AggregatorService, start_server
from fedtune.federation.jobstate import JobState
from fedtune.secagg import make_codec
from fedtune.spec import Aggregation, Encryption, SpecError, parse_job
from support.jobs import EXAMPLE

OPTIMIZER = {"server_lr": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 0.01}
SHAPES = {"lora_A": (3, 4), "lora_B": (4, 3)}


def tensors(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.normal(size=shape)).astype(np.float32) for k, shape in SHAPES.items()}


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


def reference_steps(name: str, start: dict, means: list[dict]) -> list[dict[str, np.ndarray]]:
    """Reddi et al. 2021, Algorithm 2, one scalar at a time: m starts at 0, v at tau^2;
    Δ = mean - x, m = b1 m + (1-b1) Δ, v as the optimizer says, x = x + lr m / (sqrt(v) + tau)."""
    lr, b1, b2, tau = (OPTIMIZER[k] for k in ("server_lr", "beta1", "beta2", "tau"))
    out = []
    for key in start:
        flat_x = [float(x) for x in start[key].ravel()]
        m, v = [0.0] * len(flat_x), [tau * tau] * len(flat_x)
        for round_, mean in enumerate(means):
            for i, average in enumerate(mean[key].ravel()):
                delta = float(average) - flat_x[i]
                m[i] = b1 * m[i] + (1 - b1) * delta
                if name == "fedadam":
                    v[i] = b2 * v[i] + (1 - b2) * delta * delta
                else:  # fedyogi
                    v[i] = v[i] - (1 - b2) * delta * delta * sign(v[i] - delta * delta)
                flat_x[i] += lr * m[i] / (math.sqrt(v[i]) + tau)
            if len(out) <= round_:
                out.append({})
            out[round_][key] = np.array(flat_x).reshape(start[key].shape)
    return out


def run_steps(chosen: strategy.Strategy, start: dict, means: list[dict]) -> list[dict[str, np.ndarray]]:
    previous, moments, out = start, {}, []
    for mean in means:
        previous, moments = chosen.step(mean, previous, moments)
        out.append(previous)
    return out


# --- the arithmetic -----------------------------------------------------------------------------------


def test_fedavg_weights_by_samples_or_equally_and_adopts_the_mean() -> None:
    samples = {"assist_trainer": 0, "node-1": 30, "node-2": 10}  # an assist_trainer that only aggregates
    assert strategy.FedAvg("samples").weights(samples) == {"node-1": 0.75, "node-2": 0.25}
    assert strategy.FedAvg("uniform").weights(samples) == {"node-1": 0.5, "node-2": 0.5}
    mean, start = tensors(1), tensors(2)
    new, moments = strategy.FedAvg().step(mean, start, {})
    assert new is mean and moments == {}


def test_mean_over_the_survivors_weights() -> None:
    total = tensors(3)
    mean = strategy.FedAvg.mean(total, 0.4)
    for key, values in total.items():
        np.testing.assert_allclose(mean[key], values.astype(np.float64) / 0.4, rtol=1e-6)
    assert strategy.FedAvg.mean(total, 1.0) is total


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimizer_steps_follow_the_formula(name: str) -> None:
    chosen = strategy.of(Aggregation.model_validate({"strategy": {"name": name, **OPTIMIZER}}))
    assert chosen.name == name and chosen.stateful
    start = tensors(4)
    # Three rounds: large moves, then small ones, so that Yogi's v falls where Adam's decays.
    means = [{k: start[k] + tensors(5 + r, scale)[k] for k in start} for r, scale in enumerate((0.5, 0.05, 0.01))]
    got = run_steps(chosen, start, means)
    expected = reference_steps(name, start, means)
    for round_ in range(3):
        for key in start:
            np.testing.assert_allclose(got[round_][key], expected[round_][key], rtol=2e-6, atol=1e-7)
    assert not np.allclose(got[0]["lora_A"], means[0]["lora_A"], atol=1e-3)  # not FedAvg's answer


def test_fedyogi_differs_from_fedadam_once_the_updates_shrink() -> None:
    start = tensors(4)
    means = [{k: start[k] + tensors(5 + r, scale)[k] for k in start} for r, scale in enumerate((0.5, 0.01))]
    adam = reference_steps("fedadam", start, means)[1]["lora_A"]
    yogi = run_steps(strategy.of(Aggregation.model_validate({"strategy": {"name": "fedyogi", **OPTIMIZER}})),
                     start, means)[1]["lora_A"]
    assert not np.allclose(adam, yogi, atol=1e-5)


# --- the aggregator: the step on the unmasked sum, its state in Redis across a restart -------------------

WEIGHTS = {"assist_trainer": 0.2, "node-1": 0.5, "node-2": 0.3}
OTP = {"otp": {"key_bitlength": 64, "csprng": {"name": "chacha20"}, "key_exchange": {"curve": "x25519"}}}


def aggregate_round(service: AggregatorService, codec, port: int, round_: int, local: dict[str, dict]) -> dict:
    """Every party's weighted update for `round_`, masked with pairwise pads; the global adapter node-1 fetches."""
    labels = ["node-1", "node-2"]
    keys = {p: codec.new_private_key() for p in labels}
    publics = {p: codec.public_key(k) for p, k in keys.items()}
    for party in labels:
        weighted = {k: v * WEIGHTS[party] for k, v in local[party].items()}
        secrets = {peer: codec.shared_secret(keys[party], publics[peer], peer) for peer in labels if peer != party}
        protected = codec.protect(weighted, party=party, secrets=secrets, job_id="strategy-test", round_=round_)
        AggregatorClient(f"127.0.0.1:{port}", party, None, deadline_s=30).submit(round_,
                                                                                 transport.pack_tensors(protected))
    own = {k: v * WEIGHTS["assist_trainer"] for k, v in local["assist_trainer"].items()}
    service.accept(round_, "assist_trainer", transport.pack_tensors(codec.encode_plain(own)))
    blob = AggregatorClient(f"127.0.0.1:{port}", "node-1", None, deadline_s=30).fetch(round_)
    return transport.unpack_tensors(blob)


def test_fedadam_under_otp_keeps_its_moments_across_an_aggregator_restart(redis_server) -> None:
    codec = make_codec(Encryption.model_validate(OTP))
    chosen = strategy.of(Aggregation.model_validate({"strategy": {"name": "fedadam", **OPTIMIZER}}))
    start = tensors(10)
    locals_ = [{p: {k: start[k] + tensors(11 + r * 3 + i, 0.3)[k] for k in start} for i, p in enumerate(WEIGHTS)}
               for r in range(2)]
    state = JobState.connect(redis_server.address, redis_server.password, "strategy-test")
    state.put_global(0, transport.pack_tensors(start))
    results = []
    for round_, local in enumerate(locals_, start=1):  # a fresh aggregator (state from Redis) for each round
        service = AggregatorService(JobState.connect(redis_server.address, redis_server.password, "strategy-test"),
                                    codec, rounds=2, round_timeout_s=30, strategy=chosen)
        server, port = start_server(service, "127.0.0.1:0")
        try:
            service.configure(WEIGHTS, own="assist_trainer")
            results.append(aggregate_round(service, codec, port, round_, local))
        finally:
            server.stop(0)
    means = [{k: sum(WEIGHTS[p] * local[p][k].astype(np.float64) for p in WEIGHTS) for k in start}
             for local in locals_]
    expected = reference_steps("fedadam", start, means)
    for round_ in range(2):
        for key in start:  # fixed point: 3 terms each off by at most 2^-32, amplified by at most lr/tau
            np.testing.assert_allclose(results[round_][key], expected[round_][key], rtol=2e-6, atol=1e-6)
    # Only the state after the last round stays in Redis.
    assert state.get_strategy_state(1) is None
    assert set(transport.unpack_tensors(state.get_strategy_state(2))) == {f"{m}:{k}" for m in "mv" for k in start}


def test_fedavg_keeps_no_state_in_redis(redis_server) -> None:
    codec = make_codec(Encryption.model_validate({"plain": {}}))
    state = JobState.connect(redis_server.address, redis_server.password, "strategy-test")
    start = tensors(20)
    state.put_global(0, transport.pack_tensors(start))
    service = AggregatorService(state, codec, rounds=1, round_timeout_s=30)
    service.configure({"assist_trainer": 1.0}, own="assist_trainer")
    service.accept(1, "assist_trainer", transport.pack_tensors(codec.encode_plain(tensors(21))))
    assert state.get_strategy_state(1) is None
    np.testing.assert_array_equal(transport.unpack_tensors(state.get_global(1))["lora_A"], tensors(21)["lora_A"])


# --- the spec -----------------------------------------------------------------------------------------


def test_server_optimizer_defaults_and_fedavg_default() -> None:
    assert Aggregation().strategy.name == "fedavg" and Aggregation().strategy.optimizer() == {}
    yogi = Aggregation.model_validate({"strategy": {"name": "fedyogi", "server_lr": 0.1}}).strategy
    assert yogi.optimizer() == {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    assert isinstance(strategy.of(Aggregation.model_validate({"strategy": {"name": "fedyogi"}})), strategy.FedYogi)


@pytest.mark.parametrize(
    ("strategy_", "expected"),
    [
        ({"name": "fedavg", "server_lr": 0.1}, "spec.aggregation.strategy: Value error, `server_lr` is a server "
                                               "optimizer's setting (fedadam, fedyogi); fedavg has none"),
        ({"name": "fedadam", "beta1": 1}, "spec.aggregation.strategy.beta1: Input should be less than 1"),
        ({"name": "fedyogi", "tau": 0}, "spec.aggregation.strategy.tau: Input should be greater than 0"),
        ({"name": "fedprox"}, "spec.aggregation.strategy.name: Input should be 'fedavg', 'fedadam' or 'fedyogi'"),
        ({"name": "fedadam", "lr": 0.1}, "spec.aggregation.strategy.lr: Extra inputs are not permitted"),
    ],
)
def test_bad_strategy_names_the_field(strategy_: dict, expected: str) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["aggregation"]["strategy"] = strategy_
    with pytest.raises(SpecError) as info:
        parse_job(doc, "job.yaml")
    assert f"job.yaml: {expected}" in str(info.value)


def test_a_party_training_alone_has_no_server_optimizer() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["parties"] = [copy.deepcopy(doc["spec"]["parties"][1])]
    doc["spec"]["aggregation"]["strategy"] = {"name": "fedadam"}
    with pytest.raises(SpecError) as info:
        parse_job(doc, "job.yaml")
    assert "aggregation.strategy: fedadam steps a server optimizer" in str(info.value)
    assert "(add an assist_trainer)" in str(info.value)


def test_validate_refuses_a_bad_strategy_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["aggregation"]["strategy"] = {"name": "fedadam", "beta2": 1.5}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(job), "--schema-only"]) == 2
    captured = capsys.readouterr()
    assert f"{job}: spec.aggregation.strategy.beta2" in captured.err and "Traceback" not in captured.err
    doc["spec"]["aggregation"]["strategy"] = {"name": "fedadam"}
    job.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(job), "--schema-only"]) == 0
    assert "aggregation fedadam" in capsys.readouterr().out
