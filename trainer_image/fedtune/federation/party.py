"""A training party: the assist_trainer (aggregates, may train) and every label_trainer.

One flow serves both roles: join and compare the scheduler's terms with its own job file (never
adopting them), build the adapter, get ready (sample count, adapter schema, a key bundle signed with
its key: key-agreement value, nonce, terms digest), check every peer's bundle against its own file
(`fedtune.federation.session`), start from the same initial adapter, train locally and, at each
aggregation point, exchange the adapter for the global one and write it as `checkpoint-<fraction>/`.

A party with several ranks (`fedtune.train.ranks`) runs this flow in each: rank 0 alone talks to the
federation and writes files; the others take every global adapter from it, and train with it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from fedtune import files, privacy, roles
from fedtune.federation import metrics, session, strategy, transport
from fedtune.federation.aggregator import LOSS_TENSOR, AggregatorClient, AggregatorService, PlusAnswers, start_server
from fedtune.federation.jobstate import JobState
from fedtune.federation.proto import fedtune_pb2 as pb
from fedtune.federation.scheduler import SchedulerClient
from fedtune.model.adalora import RankBudget
from fedtune.model.adapters import (
    adapter_schema,
    adapter_state,
    apply_adapter,
    load_adapter_state,
    native_prefix_overrides,
    save_checkpoint,
)
from fedtune.model.base import load_base_model
from fedtune.model.precision import resolve_precision, with_mixed_precision
from fedtune.procstat import process_age_s
from fedtune.secagg import SecAggPlusCodec, job_codec
from fedtune.spec import (
    STATE_DIR,
    FederatedFineTune,
    JobSpec,
    TrainsetEntry,
    aggregation_steps,
    checkpoint_name,
    resolve_path,
)
from fedtune.spec import terms as job_terms
from fedtune.train import ranks
from fedtune.train.loop import CHECKPOINT_PREFIX, evaluate, latest_state, plan_max_steps, train
from fedtune.train.tokencache import default_cache_dir, load_features
from fedtune.trust import certs

log = logging.getLogger(__name__)


@dataclass
class Context:
    """Where a party runs: its job, name, folders and the addresses of the others."""

    job: FederatedFineTune
    name: str
    base_dir: Path
    output_dir: Path
    tls: transport.TlsMaterial | None = None
    redis_password: str | None = None
    listen: str | None = None  # the assist_trainer's gRPC bind address
    connect_deadline_s: float = 600.0


class Startup:
    """Where a party's time goes before its first optimizer step, for its log."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = [("imports", process_age_s())]
        self.last = time.monotonic()

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phases.append((phase, now - self.last))
        self.last = now

    def __str__(self) -> str:
        total = sum(seconds for _, seconds in self.phases)
        return f"{total:.1f} s after the process started: " + ", ".join(f"{p} {s:.1f} s" for p, s in self.phases)


class Party:
    def __init__(self, ctx: Context) -> None:
        self.startup = Startup()
        self.ctx = ctx
        self.me = ctx.job.spec.party(ctx.name)
        self.is_assist = self.me.role == roles.ASSIST_TRAINER
        self.spec: JobSpec = ctx.job.spec
        self.standalone = self.spec.standalone  # trains alone: no aggregator, no masks, saves each round
        self.state_dir = ctx.output_dir / STATE_DIR
        self.ranks = ranks.start(self.spec, self.me)
        self.scheduler = SchedulerClient(self._address(self.spec.scheduler.address, "spec.scheduler.address"),
                                         ctx.name, ctx.tls, deadline_s=ctx.connect_deadline_s)
        self.aggregator: AggregatorService | None = None
        self.aggregator_client: AggregatorClient | None = None
        self.secrets: dict[str, bytes] = {}  # otp: the pair secret with each peer
        self.answers: PlusAnswers | None = None  # secagg_plus: this label_trainer's confirmations and reveals
        self.weight = 0.0
        self.round_losses: list[float] = []  # privacy.losses aggregate: this round's training losses
        self.round_start: dict[str, np.ndarray] = {}  # the global adapter this round started from
        self.terms = job_terms.terms(ctx.job)  # this party's contract: compared, never adopted
        self.digest = job_terms.digest_of(self.terms)
        self.session = ctx.job.job_id  # bound to every party's nonce at the start (`session.check_start`)
        self.noise_std = 0.0  # privacy.dp: this party's share of the aggregate's noise
        self.rng = np.random.default_rng()  # seeded from the OS: the noise must be unpredictable

    @staticmethod
    def _address(value: str | None, field: str) -> str:
        if not value:
            raise ValueError(f"{field} is not set: the launcher (fedtune run or the operator) fills it in")
        return value

    # --- the whole run ---------------------------------------------------------------------

    def run(self) -> None:
        lead = self.ranks.leader
        if lead:  # rank 0 speaks for the party, its metrics included
            metrics.serve(self.ctx.name)
            metrics.mine(metrics.ROUNDS).set(len(self.spec.fractions()))
        self.round_started = time.perf_counter()
        if lead:
            self._join()
        self.startup.mark("join")
        self.codec = job_codec(self.spec, self._context())
        self.masks = self.codec.needs_keys and not self.is_assist and not self.standalone
        self.model, self.tokenizer = self._build_model()
        self.rank_budget = RankBudget.of(self.model, self.spec.fractions())  # AdaLoRA's, from each global adapter
        self.startup.mark("model")
        self.features = self._load_data(self.spec.trainset(self.me))
        self.valset = self._load_data(self.spec.valset(self.me))
        self.startup.mark("data")
        self.args = with_mixed_precision(self.spec.trainer_args(self.me), self.precision,
                                         self.spec.base_model_field(self.me))
        self.max_steps = plan_max_steps(len(self.features), self.args, self.ranks.world) if self.features else 0
        agg_steps = aggregation_steps(self.spec.fractions(), self.max_steps) if self.features else []
        server = self._start_aggregator() if self.is_assist and lead else None
        try:
            if lead:
                self._take_start(self.scheduler.ready(self._ready_request()))
            if not self.standalone:
                self._load_global(0)  # every party starts from the assist_trainer's initial adapter
            if lead and self.valset:  # where the curve starts: the initial adapter on the valset
                self.scheduler.report("training" if self.features else "aggregating", round=0,
                                      max_steps=self.max_steps, **self._evaluation(0))
            self.startup.mark("waiting for the others")
            if self.features:
                self._train(agg_steps)
            else:
                self._follow_rounds()
            if lead:
                self.scheduler.report("succeeded", round=len(self.spec.fractions()), step=self.max_steps,
                                      max_steps=self.max_steps)
            if server is not None:
                self._serve_until_done()
        finally:
            if server is not None:
                server.stop(grace=2).wait()
        if lead:
            shutil.rmtree(self.state_dir, ignore_errors=True)  # the job is done: nothing to resume

    def _build_model(self) -> tuple[Any, Any]:
        transformers.set_seed(self.spec.trainer.seed)  # the same job gives the same initial adapter
        base = self.spec.base_model(self.me)
        self.precision = resolve_precision(base, self._device(), self.spec.base_model_field(self.me))
        model_path = resolve_path(base.path, self.ctx.base_dir)
        model, tokenizer = load_base_model(str(model_path), device=self._device(), precision=self.precision,
                                           config_overrides=native_prefix_overrides(model_path, self.spec.peft))
        adapter = self.spec.input.adapter_model
        adapter_path = str(resolve_path(adapter.path, self.ctx.base_dir)) if adapter else None
        model, note = apply_adapter(model, self.spec.peft, adapter_path)
        log.info("%s: %s; %s", self.ctx.name, note, self.precision.describe())
        return model, tokenizer

    def _device(self) -> str:
        return f"cuda:{self.ranks.local_rank}" if ranks.uses_cuda(self.spec, self.me) else "cpu"

    def _load_data(self, entries: list[TrainsetEntry]) -> list[dict[str, list[int]]]:
        if not entries:
            return []
        return load_features(entries, self.ctx.base_dir, self.spec.dataset, self.tokenizer,
                             cache_dir=default_cache_dir())

    def _evaluation(self, round_: int) -> dict[str, Any]:
        """The global adapter's loss on this party's valset, as report fields (none without a valset)."""
        if not self.valset or not self.ranks.leader:
            return {}
        loss = evaluate(self.model, self.tokenizer, self.valset, self.args.get("per_device_eval_batch_size") or 8)
        log.info("%s: round %d's global adapter has loss %.4f on the valset", self.ctx.name, round_, loss)
        metrics.mine(metrics.EVAL_LOSS).set(loss)
        if self.spec.privacy.losses != "plain":  # kept here: the host learns no party's own valset loss
            return {}
        return {"has_eval_loss": True, "eval_loss": loss, "eval_samples": len(self.valset)}

    # --- start -----------------------------------------------------------------------------

    def _join(self) -> None:
        """Announce this party with its terms; refuse (nothing trained, nothing sent) when the scheduler's differ."""
        theirs = self.scheduler.join(self.me.role, self.terms)
        if theirs != self.terms:
            raise job_terms.refusal("the scheduler", self.terms, theirs)

    def _ready_request(self) -> pb.ReadyRequest:
        request = pb.ReadyRequest(samples=len(self.features), max_steps=self.max_steps,
                                  adapter_schema_json=files.dumps_schema(adapter_schema(self.model)),
                                  nonce=session.nonce(self.state_dir), terms_digest=self.digest)
        if self.masks:
            request.public_key = self.codec.public_key(self._private_key())
        if self.ctx.tls is not None:  # peers check the bundle against our certificate: no relay can swap it
            request.certificate = self.ctx.tls.cert
            bundle = certs.KeyBundle(self.ctx.name, request.public_key, request.nonce, self.digest)
            request.public_key_signature = certs.sign_bundle(self.ctx.tls.key, self.ctx.job.job_id, bundle)
        return request

    def _context(self) -> bytes:
        """The identity of this run that every secure-aggregation key and mask is bound to."""
        return self.session.encode()

    def _private_key(self) -> bytes:
        """Kept beside the training state so that a restarted party reproduces its masks."""
        path = self.state_dir / "agreement.key"
        if path.exists():
            return path.read_bytes()
        key = self.codec.new_private_key()
        files.write_atomic(path, key, mode=0o600)
        return key

    def _take_start(self, start: pb.StartInfo) -> None:
        self.weight = start.weights.get(self.ctx.name, 0.0)
        if self.standalone:
            return
        self.session = session.check_start(start, self.spec, self.ctx.name, self.digest, self.ctx.job.job_id,
                                           self.ctx.tls)
        if isinstance(self.codec, SecAggPlusCodec):  # every key and mask bound to this run, not to a name
            self.codec = self.codec.bound_to(self._context())
        self._calibrate_noise(start)
        if self.masks:  # with the label_trainers of this party's own file, each checked by `check_start`
            private = self._private_key()
            holders = [p.name for p in self.spec.label_trainers]
            publics = {p: start.public_keys[p] for p in holders}
            if isinstance(self.codec, SecAggPlusCodec):
                plus = self.codec.party(private, self.ctx.name, publics,
                                        journal=self.state_dir / "secagg-journal.json")
                tls = self.ctx.tls
                self.answers = PlusAnswers(plus, tls.key if tls else None,
                                           {**{p: start.certificates[p] for p in holders if p != self.ctx.name},
                                            self.ctx.name: tls.cert} if tls else None)
            else:
                self.secrets = {peer: self.codec.shared_secret(private, publics[peer], peer)
                                for peer in holders if peer != self.ctx.name}
        if self.aggregator is not None:
            self.aggregator.configure(dict(start.weights), self.ctx.name if self.weight > 0 else None,
                                      dict(start.public_keys), context=self.session)
        else:
            assist = self.spec.authority
            address = self._address(assist.endpoint, "spec.parties[assist_trainer].address")
            self.aggregator_client = AggregatorClient(address, self.ctx.name, self.ctx.tls, server_name=assist.name,
                                                      deadline_s=self.ctx.connect_deadline_s)
            if self.answers is not None:  # the aggregator keeps them for the peers; it cannot read them
                self.aggregator_client.share_keys(self.answers.plus.encrypted_shares())

    def _calibrate_noise(self, start: pb.StartInfo) -> None:
        """privacy.dp from this party's own file: its weight 1/n and its noise, never counts the host supplies."""
        dp = self.spec.privacy.dp
        if dp is None or not self.weight:
            return
        training, honest = privacy.calibration(self.spec)
        privacy.check_weight(self.ctx.name, self.weight, training)
        if not self.is_assist:  # the aggregator would know the assist_trainer's noise
            self.noise_std = privacy.party_noise_std(dp.noise_multiplier, dp.clip_norm, training, honest)

    def _start_aggregator(self) -> Any:
        state = JobState.connect(self._address(self.spec.redis.address, "spec.redis.address"),
                                 self.ctx.redis_password, self.ctx.job.job_id, wait_s=roles.REDIS_WAIT_S)
        identity = transport.PeerIdentity.of(self.spec) if self.ctx.tls else None
        plus, dp = self.spec.encryption.secagg_plus, self.spec.privacy.dp
        if dp is not None:
            privacy.check_accountant()
        self.aggregator = AggregatorService(state, self.codec, len(self.spec.fractions()),
                                            round_timeout_s=self.spec.aggregation.round_timeout_s,
                                            dropout_timeout_s=plus.dropout_timeout_s if plus else None,
                                            dp=dp, honest=privacy.calibration(self.spec)[1], identity=identity,
                                            strategy=strategy.of(self.spec.aggregation))
        if state.get_global(0) is None:
            state.put_global(0, transport.pack_tensors(self._adapter_arrays()))
        listen = self.ctx.listen or roles.listen_address(roles.ASSIST_TRAINER)
        server, port = start_server(self.aggregator, listen, self.ctx.tls)
        log.info("aggregator listening on port %d", port)
        return server

    # --- rounds ----------------------------------------------------------------------------

    def _adapter_arrays(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in adapter_state(self.model).items()}

    def _fetch_global(self, round_: int) -> bytes:
        if self.aggregator is not None:
            while (blob := self.aggregator.wait_global(round_, 30.0)) is None:
                pass
            return blob
        assert self.aggregator_client is not None
        return self.aggregator_client.fetch(round_, self.answers)

    def _load_global(self, round_: int) -> None:
        """Rank 0 fetches the round's global adapter; every rank takes it (and AdaLoRA's ranks from it)."""
        if self.ranks.leader:
            tensors = transport.unpack_tensors(self._fetch_global(round_))
            load_adapter_state(self.model, {k: torch.from_numpy(v.copy()) for k, v in tensors.items()})
            self.round_start = tensors
        self.ranks.share_adapter(self.model)
        self._allocate_ranks(round_)

    def _allocate_ranks(self, round_: int) -> None:
        if self.rank_budget is not None and round_ > 0:
            self.rank_budget.allocate(round_, self._adapter_arrays())

    def _exchange(self, index: int, step: int) -> None:
        """Called by the trainer at each aggregation point: adapter out, global adapter in."""
        round_ = index + 1
        if self.standalone:  # nothing to aggregate (the ranks agree already): rank 0 saves the round
            self._allocate_ranks(round_)
            if self.ranks.leader:
                self._save_round(round_)
                self.scheduler.report("aggregated", round=round_, step=step, max_steps=self.max_steps,
                                      **self._evaluation(round_))
                self._round_done(round_)
            return
        if not self.ranks.leader:
            self._load_global(round_)
            return
        waited = time.perf_counter()
        self.scheduler.report("aggregating", round=round_ - 1, step=step, max_steps=self.max_steps)
        update = self._weighted_update()
        if self.aggregator is not None:
            with metrics.timed(metrics.mine(metrics.SECAGG_SECONDS, step="protect")):
                plain = self.codec.encode_plain(update)
            self.aggregator.accept(round_, self.ctx.name, transport.pack_tensors(plain))
        else:
            with metrics.timed(metrics.mine(metrics.SECAGG_SECONDS, step="protect")):
                blob = self._protected_upload(update, round_)
            assert self.aggregator_client is not None
            self.aggregator_client.submit(round_, blob)
        self._load_global(round_)
        (self.state_dir / f"upload-{round_}.bin").unlink(missing_ok=True)
        self._save_round(round_)
        wait_s = time.perf_counter() - waited
        self.scheduler.report("aggregated", round=round_, step=step, max_steps=self.max_steps, round_wait_s=wait_s,
                              **self._evaluation(round_))
        metrics.mine(metrics.WAIT_SECONDS).observe(wait_s)
        self._round_done(round_)

    def _protected_upload(self, update: dict[str, np.ndarray], round_: int) -> bytes:
        """This round's masked upload, the same every time it is sent: a party restarted mid-round resends what
        it sent before, never a second update under the same masks (the host would see their difference)."""
        kept = self.state_dir / f"upload-{round_}.bin"
        if kept.exists():
            return kept.read_bytes()
        if self.answers is not None:
            protected = self.answers.plus.protect(update, round_)
        else:
            protected = self.codec.protect(update, party=self.ctx.name, secrets=self.secrets,
                                           job_id=self.session, round_=round_)
        blob = transport.pack_tensors(protected)
        if self.codec.needs_keys:
            files.write_atomic(kept, blob, mode=0o600)
        return blob

    def _round_done(self, round_: int) -> None:
        metrics.mine(metrics.ROUND).set(round_)
        now = time.perf_counter()
        metrics.mine(metrics.ROUND_SECONDS).observe(now - self.round_started)
        self.round_started = now

    def _weighted_update(self) -> dict[str, np.ndarray]:
        """This party's adapter times its FedAvg weight; under privacy.dp, clipped and noised first; under
        `privacy.losses: aggregate`, with its round's mean training loss, masked with the adapter."""
        arrays, dp = self._adapter_arrays(), self.spec.privacy.dp
        if dp is None:
            update = {k: (v * self.weight).astype(np.float32) for k, v in arrays.items()}
        else:
            update = privacy.privatize(arrays, self.round_start, self.weight, clip_norm=dp.clip_norm,
                                       noise_std=self.noise_std, rng=self.rng)
        if self.spec.privacy.losses == "aggregate":  # weight·[mean loss, 1]: the host divides the two sums
            losses, self.round_losses = self.round_losses, []
            mean = [sum(losses) / len(losses), 1.0] if losses else [0.0, 0.0]
            update[LOSS_TENSOR] = (np.array(mean) * self.weight).astype(np.float32)
        return update

    def _save_round(self, round_: int) -> None:
        dest = self.ctx.output_dir / checkpoint_name(self.spec.fractions()[round_ - 1])
        if dest.exists():  # a restarted party never rewrites a completed round
            return
        try:
            save_checkpoint(self.model, dest)
        except OSError as err:  # a full disk, a folder made read-only: the round's adapter is not written
            raise OSError(err.errno, f"cannot write round {round_}'s adapter to {dest}: {err.strerror}") from None

    def _train(self, agg_steps: list[int]) -> None:
        if self.args.get("report_to") not in (None, "none", []):  # TensorBoard's logs beside the adapters
            os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(self.ctx.output_dir / "runs"))
        def on_log(step: int, loss: float) -> None:
            metrics.mine(metrics.TRAIN_LOSS).set(loss)
            shown = self.spec.privacy.losses == "plain"  # else the host learns only the mean, or nothing
            if self.spec.privacy.losses == "aggregate":
                self.round_losses.append(loss)
            reply = self.scheduler.report("training", round=self._round_of(step, agg_steps), step=step,
                                          max_steps=self.max_steps, has_loss=shown, loss=loss if shown else 0.0)
            if reply.phase == "Failed":
                raise transport.JobAborted(reply.error)
            if step == 1:
                self.startup.mark("first step")
                log.info("%s: first optimizer step %s", self.ctx.name, self.startup)

        state_dir = self.state_dir / "trainer"
        resume = latest_state(state_dir)
        if resume is not None:
            log.info("%s: resuming from its saved state %s", self.ctx.name, resume.name)
            done = sum(1 for s in agg_steps if s <= int(resume.name.removeprefix(CHECKPOINT_PREFIX)))
            if done:
                self._resume_after(done)
        if self.ranks.leader:
            self.scheduler.report("training", step=0, max_steps=self.max_steps)
        train(self.model, self.tokenizer, self.features, self.args, agg_steps=agg_steps,
              on_round=self._exchange, on_log=on_log if self.ranks.leader else None, state_dir=state_dir,
              on_step=self.rank_budget.hold if self.rank_budget is not None else None,
              packing=self.spec.dataset.packing)

    def _resume_after(self, round_: int) -> None:
        """What a restart must rebuild from the last global adapter it took: the start of DP's update,
        AdaLoRA's rank pattern (else the pruned triplets would train again until the next round)."""
        if self.standalone or (self.spec.privacy.dp is None and self.rank_budget is None):
            return  # (a standalone AdaLoRA party has no global to rebuild from: its next round prunes again)
        last = transport.unpack_tensors(self._fetch_global(round_)) if self.ranks.leader else {}
        if self.spec.privacy.dp is not None and self.ranks.leader:  # updates count from that round
            self.round_start = last
        if self.rank_budget is not None:
            self.rank_budget.allocate(round_, self.ranks.share(last))

    @staticmethod
    def _round_of(step: int, agg_steps: list[int]) -> int:
        return sum(1 for s in agg_steps if s < step)

    def _follow_rounds(self) -> None:
        """An aggregation-only assist_trainer: write each round's global adapter as it is made."""
        self.scheduler.report("aggregating", step=0)
        for round_ in range(1, len(self.spec.fractions()) + 1):
            self._load_global(round_)
            self._save_round(round_)
            self.scheduler.report("aggregated", round=round_, **self._evaluation(round_))
            self._round_done(round_)

    def _serve_until_done(self) -> None:
        """Keep serving the last global adapter until every party has it and the job is over."""
        assert self.aggregator is not None
        while self.aggregator.state.phase() not in ("Succeeded", "Failed"):
            time.sleep(0.05)


def run_party(ctx: Context) -> int:
    """Run one party to the end; report a failure to the scheduler before raising it."""
    torch_threads = os.environ.get(roles.TORCH_THREADS_ENV)
    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    party = Party(ctx)
    try:
        party.run()
    except transport.JobAborted as err:
        log.error("job failed elsewhere: %s", err)
        return 1
    except job_terms.TermsRefused as err:  # said to the scheduler (the job fails), then the refusal's exit code
        log.error("%s", err)
        _report_failure(party, str(err))
        raise
    except Exception as err:
        if not party.ranks.leader:  # rank 0 speaks for the party; torchrun ends it when this rank fails
            raise
        _report_failure(party, str(err) if isinstance(err, ValueError | OSError) else f"{type(err).__name__}: {err}")
        raise
    return 0


def _report_failure(party: Party, message: str) -> None:
    try:
        party.scheduler.report("failed", deadline_s=10.0, error=message[:2000])
    except Exception as report_err:  # the scheduler may be what failed; the exit code still tells
        log.debug("could not report the failure: %s", report_err)
