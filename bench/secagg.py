"""Secure-aggregation benchmark (issue 3): the cost of `otp` against `plain`, measured side by side.

For a ChatGLM-6B LoRA adapter (r=8 on query_key_value: 3,670,016 weights in 56 tensors) and a
P-tuning v2 prefix (pre_seq_len 20: 4,587,520 weights in one tensor), for 2, 4, 8 and 16 parties,
each mask generator and 64/128-bit encodings, it times

- per party: encode + mask (`protect`) of one label_trainer, which masks against every other one;
- aggregator: sum + decode (`combine`) of all the parties' protected updates;

next to `plain` (float32 copy; float64 sum) in the same run, and prints the bytes each party
sends. All times are single-threaded wall clock, best of --repeat runs. The aggregator's work
does not depend on the generator, so it is timed once per (adapter, parties, bits).

The dropout case (issues 14 and 20) times `secagg_plus` on the LoRA adapter for 8 and 32
label_trainers, one of which drops out, next to `otp` in the same run: a party's masking
(`protect`, one more stream than otp: its self-mask), its consistency check (signing the survivor
set with its ECDSA identity, then checking every survivor's signature before it reveals) and its
reveal; the aggregator's round without dropouts (sum, n self-masks off, decode) against otp's
`combine`; and its recovery, the round with one dropout (Shamir reconstruction, the survivors'
self-masks and the pair masks with the dropped party off). It prints the round trips the
consistency check adds.

    python bench/secagg.py             # the full matrix (several minutes, mostly HMAC_DRBG), then dropouts
    python bench/secagg.py --quick     # LoRA only, 2 and 8 parties (about a minute), dropouts at 8
    python bench/secagg.py --dropout   # only the dropout case, 8 and 32 parties
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cryptography
import numpy as np
from common import chatglm_lora_shapes
from cryptography.hazmat.backends.openssl import backend as openssl_backend

from fedtune.secagg import SecAggPlusCodec, Tensors, UpdateCodec, make_codec
from fedtune.secagg.streams import make_generator, mask_info
from fedtune.trust import certs

GOAL_SPEEDUP = 20.0  # fast generator vs HMAC_DRBG
GOAL_MASK_GBPS = 1.0  # mask bytes per second and core
GOAL_ADDED_S = 1.0  # added per round and party, 8 parties
GOAL_PLUS_PARTY_S = 1.0  # secagg_plus with the consistency check, per party and round, 8 parties
GOAL_RECOVERY_S = 2.0  # secagg_plus, the aggregator's round with one dropout, 8 parties


def ptuning_shapes() -> dict[str, tuple[int, ...]]:
    """ChatGLM-6B P-tuning v2, pre_seq_len 20: one embedding of 20 x (28 layers x 2 x 4096)."""
    return {"transformer.prefix_encoder.embedding.weight": (20, 28 * 2 * 4096)}


ADAPTERS = {"lora-r8": chatglm_lora_shapes, "ptuning-v2": ptuning_shapes}


def machine() -> str:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return "\n".join(
        [
            f"platform:     {platform.platform()}",
            f"cpu:          {model}, {os.cpu_count()} logical cores ({usable} usable); this benchmark uses one",
            f"python:       {platform.python_version()}, numpy {np.__version__}, "
            f"cryptography {cryptography.__version__}",
            f"openssl:      {openssl_backend.openssl_version_text()} (cryptography), {ssl.OPENSSL_VERSION} (hashlib)",
            f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (other work on the machine skews times)",
        ]
    )


def best_of(repeat: int, fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def secrets_for(parties: list[str]) -> dict[str, dict[str, bytes]]:
    """Pair secrets as a 3072-bit key agreement would give them (their value does not change the cost)."""
    out: dict[str, dict[str, bytes]] = {p: {} for p in parties}
    for i, a in enumerate(parties):
        for b in parties[i + 1 :]:
            out[a][b] = out[b][a] = hashlib.shake_256(f"{a}|{b}".encode()).digest(384)
    return out


def updates_for(shapes: dict[str, tuple[int, ...]], parties: list[str]) -> dict[str, Tensors]:
    """Weighted updates (FedAvg with equal weights) of a realistic magnitude."""
    rng = np.random.default_rng(0)
    return {
        p: {
            name: (rng.standard_normal(shape, dtype=np.float32) * (0.01 / len(parties)))
            for name, shape in shapes.items()
        }
        for p in parties
    }


def otp(bits: int, generator: str) -> UpdateCodec:
    csprng = {"name": generator, "method": "sha512"}
    return make_codec({"otp": {"key_bitlength": bits, "key_exchange": {"key_bitlength": 3072}, "csprng": csprng}})


def protect_one(codec: UpdateCodec, update: Tensors, party: str, secrets: dict[str, bytes]) -> Tensors:
    return codec.protect(update, party=party, secrets=secrets, job_id="bench", round_=1)


# --- generator throughput --------------------------------------------------------------------------


def generator_throughput(megabytes: int) -> dict[str, float]:
    """Bytes per second of mask from one stream, read as the codec reads it (64 KiB at a time)."""
    rates = {}
    buffer = bytearray(1 << 16)
    view = memoryview(buffer)
    for label, name, method, size in [
        ("hmac_drbg/sha256", "hmac_drbg", "sha256", megabytes // 4),
        ("hmac_drbg/sha512", "hmac_drbg", "sha512", megabytes // 4),
        ("chacha20", "chacha20", "sha512", megabytes * 8),
    ]:
        generator = make_generator(name, method)
        chunks = max(1, (size << 20) // len(buffer))

        def run(generator=generator, chunks=chunks) -> None:
            stream = generator.stream(bytes(384), mask_info("bench", 0, "w", 0))
            for _ in range(chunks):
                stream.read_into(view)

        seconds, _ = best_of(2, run)
        rates[label] = chunks * len(buffer) / seconds
    return rates


# --- the matrix -----------------------------------------------------------------------------------


def bench_adapter(
    adapter: str, party_counts: list[int], bits_list: list[int], generators: list[str], repeat: int
) -> list[dict]:
    shapes = ADAPTERS[adapter]()
    weights = sum(int(np.prod(s)) for s in shapes.values())
    rows = []
    plain = make_codec({"plain": {}})
    for n in party_counts:
        parties = [f"node-{i:02d}" for i in range(n)]
        updates, secrets = updates_for(shapes, parties), secrets_for(parties)
        me = parties[0]
        plain_party, _ = best_of(repeat, protect_one, plain, updates[me], me, {})
        plain_updates = {p: protect_one(plain, updates[p], p, {}) for p in parties}
        plain_agg, _ = best_of(repeat, plain.combine, plain_updates, {})
        for bits in bits_list:
            # The aggregator's inputs: every party's update, masked with the fast generator.
            fast = otp(bits, "chacha20")
            protected = {p: protect_one(fast, updates[p], p, secrets[p]) for p in parties}
            agg, total = best_of(repeat, fast.combine, protected, {})
            exact = sum(u[next(iter(shapes))].astype(np.float64) for u in updates.values())
            error = float(np.abs(total[next(iter(shapes))] - exact).max())
            sent = sum(t.nbytes for t in protected[me].values())
            del protected
            for generator in generators:
                codec = otp(bits, generator)
                # HMAC_DRBG runs take seconds and vary little: one run each
                runs = repeat if generator == "chacha20" else 1
                party_s, _ = best_of(runs, protect_one, codec, updates[me], me, secrets[me])
                mask_bytes = (n - 1) * weights * bits // 8
                rows.append(
                    {
                        "adapter": adapter,
                        "weights": weights,
                        "parties": n,
                        "bits": bits,
                        "generator": generator,
                        "party_s": party_s,
                        "plain_party_s": plain_party,
                        "agg_s": agg,
                        "plain_agg_s": plain_agg,
                        "sent": sent,
                        "plain_sent": weights * 4,
                        "mask_gbps": mask_bytes / party_s / 1e9 if n > 1 else float("nan"),
                        "max_error": error,
                    }
                )
                print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (
    f"{'adapter':<11}{'parties':>7}{'bits':>5} {'generator':<10}"
    f"{'party s':>9}{'x plain':>9}{'added s':>9}{'mask GB/s':>10}"
    f"{'agg s':>8}{'x plain':>9}{'MB sent':>9}{'x plain':>8}{'max err':>10}"
)


def format_row(r: dict) -> str:
    return (
        f"{r['adapter']:<11}{r['parties']:>7}{r['bits']:>5} {r['generator']:<10}"
        f"{r['party_s']:>9.3f}{r['party_s'] / r['plain_party_s']:>9.1f}{r['party_s'] - r['plain_party_s']:>9.3f}"
        f"{r['mask_gbps']:>10.2f}{r['agg_s']:>8.3f}{r['agg_s'] / r['plain_agg_s']:>9.1f}"
        f"{r['sent'] / 1e6:>9.1f}{r['sent'] / r['plain_sent']:>8.1f}{r['max_error']:>10.1e}"
    )


def verdicts(rates: dict[str, float], rows: list[dict]) -> list[str]:
    out = []
    for method in ("sha256", "sha512"):
        speedup = rates["chacha20"] / rates[f"hmac_drbg/{method}"]
        ok = "met" if speedup >= GOAL_SPEEDUP else "MISSED"
        out.append(f"chacha20 vs hmac_drbg/{method}: {speedup:.0f}x (goal >= {GOAL_SPEEDUP:.0f}x): {ok}")
    gbps = rates["chacha20"] / 1e9
    ok = "met" if gbps >= GOAL_MASK_GBPS else "MISSED"
    out.append(f"chacha20 mask stream: {gbps:.2f} GB/s on one core (goal >= {GOAL_MASK_GBPS:.0f} GB/s): {ok}")
    for r in rows:
        if r["parties"] == 8:
            added = r["party_s"] - r["plain_party_s"]
            ok = "met" if added < GOAL_ADDED_S else "missed"
            out.append(
                f"8 parties, {r['adapter']}, {r['bits']}-bit {r['generator']}: adds {added:.3f} s per label_trainer "
                f"and round (goal < {GOAL_ADDED_S:.0f} s): {ok}; "
                f"the aggregator adds {r['agg_s'] - r['plain_agg_s']:.3f} s"
            )
    return out


# --- dropouts (secagg_plus) ----------------------------------------------------------------------


class PlusFederation:
    """n label_trainers under secagg_plus that have published their keys and encrypted their shares, each with
    an ECDSA identity (a certificate from one CA) to sign survivor sets with."""

    def __init__(self, names: list[str], bits: int) -> None:
        self.names = names
        self.codec: SecAggPlusCodec = make_codec({"secagg_plus": {"key_bitlength": bits}}, label_trainers=names,
                                                 rounds=5, context=b"bench")
        self.masters = {p: self.codec.new_private_key() for p in names}
        self.publics = {p: self.codec.public_key(m) for p, m in self.masters.items()}
        self.parties = {p: self.join(p) for p in names}
        self.shares = {p: party.encrypted_shares() for p, party in self.parties.items()}
        ca = certs.make_ca("bench")
        self.identities = {p: certs.issue(ca, p) for p in names}
        self.masked: dict[str, Tensors] = {}

    def join(self, name: str) -> Any:
        return self.codec.party(self.masters[name], name, self.publics)

    def confirm(self, party: Any, uploaded: list[str], dropped: list[str]) -> bytes:
        """A survivor's step of the consistency check: check the split, sign it."""
        return certs.sign_statement(self.identities[party.party].key_pem, party.confirm(1, uploaded, dropped))

    def verify(self, signer: str, statement: bytes, signature: bytes) -> bool:
        return certs.statement_signed(self.identities[signer].cert_pem, statement, signature)

    def reveal(self, party: Any, uploaded: list[str], dropped: list[str], signatures: dict[str, bytes]) -> dict:
        """A survivor's reveal: every survivor's signature checked, then its shares out of the ciphertexts."""
        return party.reveal(1, uploaded, dropped, self.inbox(party.party), signatures, self.verify)

    def reveals(self, uploaded: list[str], dropped: list[str]) -> dict[str, dict[str, bytes]]:
        """The first `threshold` uploaders' answers to the aggregator's requests for round 1 (each a fresh party
        object, that has uploaded a one-weight update: a party answers one split per round, and the benchmark
        asks for two)."""
        fresh = {p: self.join(p) for p in uploaded[: self.codec.threshold]}
        for party in fresh.values():
            party.protect({"w": np.zeros(1, np.float32)}, 1)
        signatures = {p: self.confirm(party, uploaded, dropped) for p, party in fresh.items()}
        return {p: self.reveal(party, uploaded, dropped, signatures) for p, party in fresh.items()}

    def inbox(self, recipient: str) -> dict[str, bytes]:
        return {o: self.codec.round_ciphertexts(self.shares[o][recipient], 1, o) for o in self.names if o != recipient}

    def unmask(self, uploaded: list[str], dropped: list[str], answers: dict) -> Tensors:
        return self.codec.unmask({p: self.masked[p] for p in uploaded}, {}, round_=1, publics=self.publics,
                                 dropped=dropped, reveals=answers)


def setup_one(federation: PlusFederation, name: str) -> None:
    """What a label_trainer computes before round 1: its keys, the pair keys, its encrypted shares."""
    federation.join(name).encrypted_shares()


def bench_dropout_case(n: int, bits: int, repeat: int) -> dict:
    """secagg_plus against otp (both X25519 + ChaCha20), LoRA r=8, one label_trainer dropping out."""
    shapes = chatglm_lora_shapes()
    names = [f"node-{i:02d}" for i in range(n)]
    me, gone, survivors = names[0], names[-1], names[:-1]
    updates = updates_for(shapes, names)
    plus = PlusFederation(names, bits)
    setup_s, _ = best_of(repeat, setup_one, plus, me)
    party_s, _ = best_of(repeat, plus.parties[me].protect, updates[me], 1)
    plus.masked = {p: plus.parties[p].protect(updates[p], 1) for p in names}
    confirm_s, _ = best_of(repeat, plus.confirm, plus.parties[me], survivors, [gone])
    signatures = {p: plus.confirm(plus.parties[p], survivors, [gone]) for p in survivors}
    reveal_s, _ = best_of(repeat, plus.reveal, plus.parties[me], survivors, [gone], signatures)
    agg_s, _ = best_of(repeat, plus.unmask, names, [], plus.reveals(names, []))
    recovery_s, total = best_of(repeat, plus.unmask, survivors, [gone], plus.reveals(survivors, [gone]))
    first = next(iter(shapes))
    error = float(np.abs(total[first] - sum(updates[p][first].astype(np.float64) for p in survivors)).max())
    plus.masked = {}
    otp_codec = make_codec({"otp": {"key_bitlength": bits}})
    pair = secrets_for(names)
    otp_party_s, _ = best_of(repeat, protect_one, otp_codec, updates[me], me, pair[me])
    protected = {p: protect_one(otp_codec, updates[p], p, pair[p]) for p in names}
    otp_agg_s, _ = best_of(repeat, otp_codec.combine, protected, {})
    row = {"parties": n, "bits": bits, "threshold": plus.codec.threshold, "setup_s": setup_s, "party_s": party_s,
           "otp_party_s": otp_party_s, "confirm_s": confirm_s, "reveal_s": reveal_s, "agg_s": agg_s,
           "otp_agg_s": otp_agg_s, "recovery_s": recovery_s, "max_error": error}
    print(format_dropout_row(row), flush=True)
    return row


DROPOUT_HEADER = (
    f"{'parties':>7}{'t':>4}{'bits':>5}{'setup s':>9}{'party s':>9}{'x otp':>7}{'confirm s':>11}{'reveal s':>10}"
    f"{'round s':>9}{'agg s':>8}{'x otp':>7}{'recovery s':>12}{'max err':>10}"
)


def round_s(r: dict) -> float:
    """A survivor's work in one round: mask, confirm the survivor set, check the signatures and reveal."""
    return r["party_s"] + r["confirm_s"] + r["reveal_s"]


def format_dropout_row(r: dict) -> str:
    return (
        f"{r['parties']:>7}{r['threshold']:>4}{r['bits']:>5}{r['setup_s']:>9.3f}{r['party_s']:>9.3f}"
        f"{r['party_s'] / r['otp_party_s']:>7.2f}{r['confirm_s']:>11.4f}{r['reveal_s']:>10.4f}{round_s(r):>9.3f}"
        f"{r['agg_s']:>8.3f}{r['agg_s'] / r['otp_agg_s']:>7.2f}{r['recovery_s']:>12.3f}{r['max_error']:>10.1e}"
    )


def dropout_verdicts(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["parties"] != 8:
            continue
        ok = "met" if round_s(r) < GOAL_PLUS_PARTY_S else "MISSED"
        out.append(f"secagg_plus with the consistency check, 8 parties: {round_s(r):.3f} s per label_trainer and "
                   f"round (goal < {GOAL_PLUS_PARTY_S:.0f} s): {ok}")
        ok = "met" if r["recovery_s"] < GOAL_RECOVERY_S else "MISSED"
        out.append(f"secagg_plus, 8 parties, one dropout: the aggregator's round takes {r['recovery_s']:.3f} s "
                   f"(goal < {GOAL_RECOVERY_S:.0f} s): {ok}")
    return out


def print_dropout(party_counts: list[int], repeat: int) -> None:
    print("dropout case (secagg_plus vs otp, X25519 + ChaCha20, LoRA r=8, 3,670,016 weights, 5 rounds of keys):")
    print("setup: a party's keys, pair keys and encrypted shares for its peers; party: encode + masks;")
    print("confirm: a survivor checks the split and signs it (ECDSA P-256); reveal: it checks every survivor's")
    print("signature, then takes its shares out of the ciphertexts; round: party + confirm + reveal;")
    print("agg: sum + masks off + decode, nobody dropped (x otp: against otp's combine); recovery: the")
    print("aggregator's round with one label_trainer dropped out.")
    print("round trips per survivor and round: upload, confirm (Fetch -> Reveal with its signature), reveal")
    print("(Fetch -> Reveal with its shares), result (Fetch): the consistency check adds one, the confirm.")
    print(DROPOUT_HEADER)
    rows = [bench_dropout_case(n, 64, repeat) for n in party_counts]
    print_goals("issues 14 and 20", dropout_verdicts(rows))


def print_goals(issue: str, lines: list[str]) -> None:
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"goals ({issue}):")
    for line in lines:
        print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="LoRA adapter, 2 and 8 parties only")
    parser.add_argument("--dropout", action="store_true", help="only the secagg_plus dropout case")
    parser.add_argument("--repeat", type=int, default=None, help="best of N runs per measurement (default 3, quick 1)")
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    if args.dropout:
        print(machine())
        print()
        print_dropout([8, 32], repeat)
        return 0
    adapters = ["lora-r8"] if args.quick else list(ADAPTERS)
    party_counts = [2, 8] if args.quick else [2, 4, 8, 16]

    print(machine())
    print()
    rates = generator_throughput(16 if args.quick else 64)
    print("mask generator throughput (one stream, one core):")
    for label, rate in rates.items():
        print(f"  {label:<18}{rate / 1e6:>10.1f} MB/s")
    print()
    print("per party: encode + mask of one label_trainer's update against all other label_trainers;")
    print("added s = party s - plain party s; agg: sum + decode of all parties' updates (same for each generator);")
    print("mask GB/s = mask bytes generated and applied per second; max err = |otp sum - float64 sum| on one tensor.")
    print(HEADER)
    rows = []
    for adapter in adapters:
        rows += bench_adapter(adapter, party_counts, [64, 128], ["chacha20", "hmac_drbg"], repeat)
    print()
    print_goals("issue 3", verdicts(rates, rows))
    print()
    print_dropout([8] if args.quick else [8, 32], repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
