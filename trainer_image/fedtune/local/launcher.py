"""`fedtune run`: the whole job on one machine — a real redis-server and every role as its own process.

The launcher does what the operator does on Kubernetes: fill in the addresses, start
Redis with a password, start the scheduler and one process per local party, then watch
the job to its end and write `summary.json`. A party that asks for GPUs (`resources.gpu`) gets
devices of its own, as a pod would (`CUDA_VISIBLE_DEVICES`); a party with several ranks starts
them itself (`fedtune.train.ranks`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from redis import RedisError

from fedtune import files, procctl, roles
from fedtune.exits import EXIT_FAILED, EXIT_REFUSED, EXIT_TIMEOUT
from fedtune.federation.jobstate import DROPPED, FINISHED, LOST, JobState, JobStatus, PartyStatus
from fedtune.local import runfolder
from fedtune.local.forkserver import Forked, ForkServer
from fedtune.local.stopping import Interrupted, Signals
from fedtune.procstat import PeakMemory, process_age_s
from fedtune.spec import (
    STATE_DIR,
    FederatedFineTune,
    SpecError,
    checkpoint_name,
    dump_job,
    output_dirs,
    parse_job,
    resolve_path,
)
from fedtune.trust import certs

LOOPBACK = "127.0.0.1"
DEFAULT_OUTPUT = "fedtune-output"
RUN_DIR = ".fedtune"  # in the run's folder: the resolved job and each role's log, nothing secret
MEMORY_SAMPLE_S = 0.25  # how often `fedtune run` reads its processes' PSS for summary.json
STOP_GRACE_S = 5.0  # how long a role may take to exit on SIGTERM before SIGKILL
# What the losses in the console, summary.json and `fedtune report` are (the same numbers everywhere).
LOSS_NAMES = {
    "train": "training loss: mean cross-entropy per answer token of each optimizer step's batch, "
             "on the party's own data with its own adapter",
    "eval": "valset loss: mean cross-entropy per answer token of the round's global adapter on the valsets",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {LOOPBACK}:{port} after {timeout_s:.0f} s")


class RedisServer:
    """A real redis-server on a free loopback port, password-protected, removed on exit.

    Its config (the password) lies in `workdir`, a private temporary folder unless given. With
    `data_dir`, what it holds persists there (an append-only file, flushed every second and when it
    stops): a later server on the same folder starts with it. `tied`: it ends when the process that started
    it dies (`fedtune.procctl`; the kernel watches the starting thread, so only for a start from the thread
    that lives as long as the process: the launcher's main thread)."""

    def __init__(self, *, password: str | None = None, workdir: Path | None = None,
                 data_dir: Path | None = None, tied: bool = False) -> None:
        self.password = password if password is not None else secrets.token_urlsafe(24)
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="fedtune-redis-"))
        self.data_dir = data_dir
        self.tied = tied
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "redis.conf"
        # The password goes in a 0600 file, not on the command line where `ps` shows it.
        files.write_atomic(conf, "\n".join([
            f"port {self.port}", f"bind {LOOPBACK}", "protected-mode yes", f"dir {self.data_dir or self.workdir}",
            f"requirepass {self.password}" if self.password else "",
            f"appendonly {'yes' if self.data_dir else 'no'}", 'save ""', "daemonize no", "loglevel warning",
        ]) + "\n", mode=0o600)
        tie = [sys.executable, "-m", "fedtune.procctl"] if self.tied else []
        self.proc = subprocess.Popen([*tie, binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for_port(self.port, 10, self.proc)
        return self

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits (SIGKILL after 5 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Role:
    """One local process of the job."""

    name: str
    role: str  # scheduler | assist_trainer | label_trainer
    listen_port: int | None = None
    proc: subprocess.Popen | Forked | None = None
    log_path: Path | None = None
    log_file: IO[bytes] | None = field(default=None, repr=False)
    restarts: int = 0
    done_before: bool = False  # a resumed run: it finished in the run resumed, so it is not started again

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        """0 for a role done before a resume; else its process's, None while it runs or before it starts."""
        if self.done_before:
            return 0
        return self.proc.poll() if self.proc is not None else None

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def output_layout(job: FederatedFineTune, output: Path | None, base_dir: Path) -> tuple[Path, dict[str, Path]]:
    """The run's folder (summary.json, logs) and each local party's adapter folder.

    `--output DIR` puts party P in DIR/P. Without it, `spec.output.path` decides, its placeholders
    filled in, and the run's folder is the one every party's folder lies in; with neither,
    `fedtune-output/P`.
    """
    local = [p.name for p in job.spec.parties if p.remote is None]
    if output is None and job.spec.output is not None:
        dirs = output_dirs(job, local, base_dir)
        return Path(os.path.commonpath(list(dirs.values()))), dirs
    root = (output or Path(DEFAULT_OUTPUT)).resolve()
    return root, {name: root / name for name in local}


def with_party_ranks(job: FederatedFineTune, source: str, *, gpus: int | None = None,
                     ranks: int | None = None) -> FederatedFineTune:
    """`--gpus-per-party` / `--ranks-per-party`: `resources.gpu` / `ranks` of every local party that trains."""
    if gpus is None and ranks is None:
        return job
    data = job.model_dump(mode="json", exclude_none=True)
    for raw, party in zip(data["spec"]["parties"], job.spec.parties):
        if party.remote is None and job.spec.trainset(party):
            if gpus is not None:
                raw.setdefault("resources", {})["gpu"] = gpus
            if ranks is not None:
                raw["ranks"] = ranks
    return parse_job(data, source)


def gpu_slices(visible: list[str], wants: dict[str, int]) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES of each party asking for GPUs: devices of its own, in turn, wrapping
    round (parties then share) when they ask for more than the machine has."""
    slices, at = {}, 0
    for name, count in wants.items():
        slices[name] = ",".join(visible[(at + i) % len(visible)] for i in range(count))
        at += count
    return slices


def _visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def earlier_results(output: Path, party_dirs: dict[str, Path], *, overwrite: bool) -> list[Path]:
    """What an earlier run left in the output, for `claim_output` to clear; refused without `overwrite`:
    a new run never mixes its rounds with an earlier run's."""
    earlier = [output / "summary.json", output / RUN_DIR, *party_dirs.values()]
    present = [p for p in earlier if p.exists() and not (p.is_dir() and not any(p.iterdir()))]
    if present and not overwrite:
        if runfolder.resumable(output / RUN_DIR):
            raise SpecError(f"{output} holds an earlier run's results, of a run that did not finish: continue it "
                            "with --resume, or pass --overwrite to replace them")
        raise SpecError(f"{present[0]} holds an earlier run's results; choose another output folder "
                        "or pass --overwrite to replace them")
    return present


def claim_output(output: Path, party_dirs: dict[str, Path], *, overwrite: bool) -> None:
    """Refuse an output holding an earlier run's results, or clear them (`overwrite`)."""
    for path in earlier_results(output, party_dirs, overwrite=overwrite):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def with_local_addresses(job: FederatedFineTune, redis_address: str, local: dict[str, Role],
                         identities: dict[str, str] | None = None) -> FederatedFineTune:
    """The job the roles read: the addresses of this run, and each local party pinned to the key this
    run made for it (`identities`), so that no other key speaks for it."""
    data = job.model_dump(mode="json", exclude_none=True)
    served = {name: f"{LOOPBACK}:{role.listen_port}" for name, role in local.items() if role.listen_port}
    data["spec"] = roles.with_addresses(data["spec"], scheduler=served.pop(roles.SCHEDULER), redis=redis_address,
                                        parties=served)
    for party in data["spec"]["parties"]:
        if party["name"] in (identities or {}):
            party["identity"] = identities[party["name"]]  # type: ignore[index]
    return FederatedFineTune.model_validate(data)


class LocalJob:
    """Every role of one job as local processes; the pieces tests drive one by one.

    What is secret (the Redis password in its config) lives in a private temporary folder that `stop`
    removes; the output holds adapters, the summary and logs. What a resumed run needs (the job's state
    in Redis, the run's TLS material, each party's `.fedtune-state`) stays, private (0700), until the job
    succeeds (`fedtune.local.runfolder`). Every process it starts ends when the launcher dies.
    """

    def __init__(self, job: FederatedFineTune, output: Path, base_dir: Path, *,
                 party_dirs: dict[str, Path] | None = None, torch_threads: int | None = None,
                 log_level: str = "INFO", fork_roles: bool | None = None, launched_at: float | None = None,
                 resume: bool = False) -> None:
        self.job = job
        self.output = output
        self.base_dir = base_dir
        self.log_level = log_level
        self.resume = resume
        self.run_dir = output / RUN_DIR
        self.resume_dir = self.run_dir / runfolder.RESUME
        self.private_dir: Path | None = None  # made by start(), removed by stop()
        # Its config (the password) in a private folder of its own; its data where a resume finds them.
        self.redis = RedisServer(data_dir=self.resume_dir / "redis", tied=True)
        self.roles: dict[str, Role] = {roles.SCHEDULER: Role(roles.SCHEDULER, roles.SCHEDULER, free_port())}
        for party in job.spec.parties:
            if party.remote is None:
                port = free_port() if party.role == roles.ASSIST_TRAINER else None
                self.roles[party.name] = Role(party.name, party.role, port)
        self.party_dirs = party_dirs or {name: output / name for name in self.roles if name != roles.SCHEDULER}
        training = sum(1 for p in job.spec.parties if p.remote is None and job.spec.trainset(p))
        # Parties share this machine's cores instead of each claiming all of them.
        self.torch_threads = (torch_threads or int(os.environ.get(roles.TORCH_THREADS_ENV, "0"))
                              or max(1, (os.cpu_count() or 1) // max(training, 1)))
        self.gpus, self.gpus_shared = self._assign_gpus()
        self.job_file = self.run_dir / "job.yaml"
        self.launched_at = launched_at or time.time()  # start-up: from here to each party's first optimizer step
        self.memory = PeakMemory()
        # Roles fork from one process that imported the training stack (fedtune.local.forkserver), unless a
        # party may use CUDA: a process that forked after touching the driver could not use it.
        local = [p for p in job.spec.parties if p.remote is None]
        self.fork_roles = all(job.spec.trainer_args(p).get("no_cuda") for p in local) if fork_roles is None \
            else fork_roles
        self.forkserver: ForkServer | None = None
        self.lock: runfolder.RunLock | None = None
        self.started = False

    def tls_dir(self, name: str) -> Path:
        return self.resume_dir / "tls" / name

    def _assign_gpus(self) -> tuple[dict[str, str], bool]:
        """Each local party's GPUs, and whether the parties must share some."""
        spec = self.job.spec
        wants = {p.name: p.resources.gpu for p in spec.parties
                 if p.remote is None and p.resources.gpu > 0 and not spec.trainer_args(p).get("no_cuda")}
        visible = _visible_gpus() if wants else []
        if not visible:
            return {}, False
        return gpu_slices(visible, wants), sum(wants.values()) > len(visible)

    def make_certificates(self) -> dict[str, str]:
        """A throwaway CA for this run and a certificate per role, each naming its role; their identities. A
        resumed run keeps its run's (the parties' key-agreement keys are signed with them)."""
        if self.resume and all((self.tls_dir(name) / "tls.key").is_file() for name in self.roles):
            return {name: certs.fingerprint((self.tls_dir(name) / "tls.crt").read_bytes()) for name in self.roles}
        ca = certs.make_ca(self.job.job_id)
        identities = {}
        for name in self.roles:
            issued = certs.issue(ca, name, dns_names=["localhost"], ips=[LOOPBACK])
            certs.write_bundle(self.tls_dir(name), ca.cert_pem, issued)
            identities[name] = certs.fingerprint(issued.cert_pem)
        return identities

    def check(self, samples: dict[str, int], source: str) -> list[str]:
        """The pre-flight checks that need the training stack (`preflight.check_training`, given
        `check_files`' sample counts), made in the fork server, which imports that stack anyway: this
        process never does. Nothing else has started, nothing is written; a refusal (SpecError) stops
        the server. Where roles are not forked (a party may use CUDA), the server stops after it.
        Returns what the checks noted for the user (a party that will train on the CPU, ...)."""
        self._start_forkserver()
        assert self.forkserver is not None
        try:
            notes = self.forkserver.check(self.job, samples, source)
        except BaseException:
            self._stop_forkserver()
            raise
        if not self.fork_roles:
            self._stop_forkserver()
        return notes

    def _stop_forkserver(self) -> None:
        if self.forkserver is not None:
            self.forkserver.stop()
            self.forkserver = None

    def _start_forkserver(self) -> None:
        """Its log lies in the private folder until the run has its output (copied there by `stop`)."""
        if self.private_dir is None:
            self.private_dir = Path(tempfile.mkdtemp(prefix="fedtune-run-"))  # 0700
        if self.forkserver is None:
            self.forkserver = ForkServer(self._role_env(), self.private_dir / "forkserver.log",
                                         title=procctl.title_of(self.job.job_id, "forkserver"))

    def start(self, *, skip: tuple[str, ...] = ()) -> None:
        """Start Redis and every role but those in `skip` (tests start those themselves), and those a resumed
        run finished before."""
        self.lock = runfolder.RunLock.take(self.run_dir)
        self.started = True
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        runfolder.make_private(self.resume_dir)
        if not self.resume:
            runfolder.save_terms(self.resume_dir, self.job)
        if self.fork_roles:  # its imports (unless `check` made them) overlap with certificates and Redis
            self._start_forkserver()
        elif self.private_dir is None:
            self.private_dir = Path(tempfile.mkdtemp(prefix="fedtune-run-"))  # 0700
        self._record()
        identities = self.make_certificates() if self.job.spec.tls.enabled else {}
        self.redis.start()
        self._record()
        self.resolved = with_local_addresses(self.job, self.redis.address, self.roles, identities)
        files.write_atomic(self.job_file, dump_job(self.resolved))
        self.state = JobState.connect(self.redis.address, self.redis.password, self.job.job_id)
        if self.resume:
            self._take_over()
        for role in self.roles.values():
            if role.name not in skip and not role.done_before:
                self.start_role(role.name)

    def _take_over(self) -> None:
        """A resumed run: the job runs again (were it failed), but not the parties that had finished it."""
        self.state.reopen()
        for name, role in self.roles.items():
            finished = self.state.party(name).state in FINISHED
            role.done_before = finished and name in self.party_dirs and not (self.party_dirs[name] / STATE_DIR).exists()

    def _record(self) -> None:
        """What a later `fedtune run` clears should this one be killed before it could (`runfolder`)."""
        pids = [r.proc.pid for r in self.roles.values() if r.alive() and r.proc is not None]
        pids += [p.pid for p in (self.forkserver.proc if self.forkserver else None, self.redis.proc) if p is not None]
        temp = [p for p in (self.private_dir, self.redis.workdir) if p is not None]
        runfolder.record(self.run_dir, pids, temp)

    def start_role(self, name: str, *, job_file: Path | None = None) -> None:
        """Start one role (again) from the run's job file, or from `job_file` (tests: a host whose file differs)."""
        role = self.roles[name]
        party = None if role.role == roles.SCHEDULER else name
        argv = roles.role_argv(
            role.role, job_file or self.job_file, party=party, base_dir=self.base_dir,
            output_dir=self.party_dirs[name] if party else None, log_level=self.log_level,
            listen=f"{LOOPBACK}:{role.listen_port}" if role.listen_port else None,
            tls_dir=self.tls_dir(name) if self.job.spec.tls.enabled else None,
            insecure=not self.job.spec.tls.enabled)
        env = self._role_env()
        if name in self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[name]
        role.log_path = self.run_dir / "logs" / f"{name}.log"
        role.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.forkserver is not None:
            role.proc = self.forkserver.spawn(argv, env, role.log_path)
        else:
            if role.log_file is not None:  # a restart: the last run's handle
                role.log_file.close()
            role.log_file = open(role.log_path, "ab")  # noqa: SIM115 - closed in stop()
            role.proc = subprocess.Popen([sys.executable, "-m", "fedtune", *argv], stdout=role.log_file,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._record()

    def _role_env(self) -> dict[str, str]:
        return {**os.environ, roles.REDIS_PASSWORD_ENV: self.redis.password, procctl.TIED_ENV: "1",
                roles.TORCH_THREADS_ENV: str(self.torch_threads), "PYTHONUNBUFFERED": "1"}

    def kill_role(self, name: str, sig: int = signal.SIGKILL) -> None:
        self._signal_role(self.roles[name], sig)
        self._reap([self.roles[name]], STOP_GRACE_S)

    @staticmethod
    def _signal_role(role: Role, sig: int) -> None:
        """`sig` to the role's process group (its ranks too); SIGCONT after it, so that a stopped (frozen)
        role gets it."""
        if role.alive():
            assert role.proc is not None
            with contextlib.suppress(ProcessLookupError):  # it exited since the check, its group with it
                os.killpg(role.proc.pid, sig)
                os.killpg(role.proc.pid, signal.SIGCONT)

    def _reap(self, stopping: list[Role], grace_s: float) -> None:
        """Wait for the roles to exit, SIGKILL those still there after `grace_s` (together, not in turn)."""
        deadline = time.monotonic() + grace_s
        for role in stopping:
            if role.proc is None:
                continue
            try:
                role.proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                self._signal_role(role, signal.SIGKILL)
                role.proc.wait()

    def exited(self, ok: bool) -> list[Role]:
        """The roles that exited, with 0 (`ok`) or not (roles done before a resume count as 0)."""
        return [r for r in self.roles.values() if r.exit_code() is not None and (r.exit_code() == 0) == ok]

    def dropout_tolerated(self, role: Role) -> bool:
        """Under secagg_plus the federation goes on without a label_trainer that died (unless it failed the
        job itself): the job then fails only when too few are left (the aggregator says so)."""
        return (self.job.spec.encryption.secagg_plus is not None and role.role == "label_trainer"
                and self.state.phase() != "Failed")  # fmt: skip

    def give_up(self, role: Role) -> None:
        """No more restarts for a tolerated role: the scheduler no longer waits for it to succeed."""
        self.state.update_party(role.name, state=LOST)

    def restart(self, role: Role) -> bool:
        """Start a role that died again, as a kubelet restarts a pod's container, while `spec.backoffLimit`
        allows and the job goes on (a role that reports its own failure fails the job, and is not retried);
        it resumes from its state folder. True when restarted."""
        if role.restarts >= self.job.spec.backoffLimit or self.state.phase() in ("Succeeded", "Failed"):
            return False
        if self.forkserver is not None and self.forkserver.proc.poll() is not None:
            return False  # nothing left to fork from (and its roles were reported dead with it)
        role.restarts += 1
        self.start_role(role.name)
        return True

    def stop_dropped(self, status: JobStatus) -> list[str]:
        """Once the job succeeded, stop the parties it was finished without (frozen, or never answering):
        they would hold `fedtune run` for good. Their names."""
        if status.phase != "Succeeded":
            return []
        dropped = [r for r in self.roles.values() if r.alive() and status.parties.get(r.name) is not None
                   and status.parties[r.name].state == DROPPED]  # fmt: skip
        for role in dropped:
            self.kill_role(role.name, signal.SIGKILL)
        return [r.name for r in dropped]

    def failed_role(self) -> Role | None:
        """A role that died and fails the job: the one the job's error names, if it is among them."""
        failed = [r for r in self.exited(ok=False) if not self.dropout_tolerated(r)]
        named = self.state.error().split(":", 1)[0] if failed else ""
        return next((r for r in failed if r.name == named), failed[0] if failed else None)

    def finished(self) -> bool:
        """Every role exited with 0, or the job succeeded without the tolerated ones that died."""
        done, lost = self.exited(ok=True), self.exited(ok=False)
        if len(done) + len(lost) < len(self.roles):
            return False
        return not lost or (all(map(self.dropout_tolerated, lost)) and self.state.phase() == "Succeeded")

    def stop_roles(self) -> None:
        """SIGTERM to every role at once, SIGKILL to those still there a few seconds later; then the fork
        server. Redis stays (the summary reads it)."""
        for role in self.roles.values():
            self._signal_role(role, signal.SIGTERM)
        self._reap(list(self.roles.values()), STOP_GRACE_S)
        for role in self.roles.values():
            if role.log_file is not None:
                role.log_file.close()
                role.log_file = None
        if self.forkserver is not None:
            self.forkserver.stop()
            if self.started and self.forkserver.log.exists():
                files.write_atomic(self.run_dir / "logs" / self.forkserver.log.name, self.forkserver.log.read_bytes())
            self.forkserver = None

    def kill_now(self) -> None:
        """A second signal: SIGKILL every process of the run and remove the private folders, no waiting."""
        for proc in [r.proc for r in self.roles.values()] + [self.forkserver.proc if self.forkserver else None,
                                                            self.redis.proc]:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for folder in (self.private_dir, self.redis.workdir):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        if self.started:
            runfolder.forget(self.run_dir)

    def stop(self) -> None:
        """Stop every role and Redis; remove the secrets. Once the job succeeded, also what resuming it would
        need (the parties' resumable state, with each key-agreement key): a finished run is never resumed."""
        self.stop_roles()
        succeeded = self.started and self._phase() == "Succeeded"
        self.redis.stop()
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
        if succeeded:
            shutil.rmtree(self.resume_dir, ignore_errors=True)
            for folder in self.party_dirs.values():
                shutil.rmtree(folder / STATE_DIR, ignore_errors=True)
        if self.lock is not None:
            runfolder.forget(self.run_dir)
            self.lock.release()
            self.lock = None

    def _phase(self) -> str:
        """The job's phase, "" when Redis never started or is gone."""
        try:
            return self.state.phase() if hasattr(self, "state") else ""
        except RedisError:
            return ""

    def status(self) -> JobStatus:
        return self.state.snapshot()

    def sample_memory(self) -> None:
        pids = [(r.name, r.proc.pid) for r in self.roles.values() if r.alive() and r.proc is not None]
        if self.redis.alive():
            assert self.redis.proc is not None
            pids.append(("redis", self.redis.proc.pid))
        if self.forkserver is not None and self.forkserver.proc.poll() is None:
            pids.append(("forkserver", self.forkserver.proc.pid))
        pids.append(("launcher", os.getpid()))  # last: the processes under it are counted by then
        self.memory.sample(pids)

    def summary(self, wall_s: float, error: str, state: str = "") -> dict[str, Any]:
        """summary.json: `state` is how the run ended (succeeded, failed, timed_out, interrupted), `round` the
        last round completed; the losses are named in `loss`."""
        status = self.status()
        fractions = self.job.spec.fractions()
        parties: dict[str, Any] = {}
        peaks = self.memory.report()
        for name, party in status.parties.items():
            parties[name] = self._party_summary(name, party, fractions, peaks)
        dropped = {name: p.dropped_from for name, p in status.parties.items() if p.state == DROPPED}
        return {"job": self.job.job_id, "state": state or status.phase.lower(), "phase": status.phase,
                "error": error or status.error, "warnings": status.warnings, "rounds": len(fractions),
                "round": status.round, "dropouts": status.dropouts, "dropped": dropped,
                "privacy": status.privacy, "eval_loss": status.eval_loss, "loss": LOSS_NAMES,
                # privacy.losses aggregate: the parties' mean training loss by round, all the host learned of it
                "round_losses": self.state.metrics("aggregate_loss"),
                "wall_s": round(wall_s, 3), "peak_pss_mb": peaks, "parties": parties}

    def _party_summary(self, name: str, party: PartyStatus, fractions: list[float],
                       peaks: dict[str, float | None]) -> dict[str, Any]:
        records = self.state.metrics(name)
        losses = [[r["step"], r["loss"]] for r in records if "loss" in r]
        rounds = [{"round": r["round"], "step": r["step"], "wait_s": round(r["wait_s"], 4),
                   "checkpoint": checkpoint_name(fractions[r["round"] - 1])}
                  for r in records if r.get("event") == "round"]
        stamps = [r["t"] for r in records if "loss" in r]
        ours = [t for t in stamps if t >= self.launched_at]  # a resumed run: this run's own start-up
        evaluated = [{"round": r["round"], "loss": r["eval_loss"], "samples": r["samples"]}
                     for r in records if r.get("event") == "eval"]
        role = self.roles.get(name)
        return {
            "role": party.role, "state": party.state, "samples": party.samples, "max_steps": party.max_steps,
            "exit_code": role.exit_code() if role else None, "restarts": role.restarts if role else 0,
            "dropped_from": party.dropped_from or None,
            "losses": losses, "rounds": rounds, "eval": evaluated,
            "timings": {"train_s": round(stamps[-1] - stamps[0], 3) if len(stamps) > 1 else 0.0,
                        "aggregation_wait_s": round(sum(r["wait_s"] for r in rounds), 3),
                        # from the launcher's start to the end of this party's first optimizer step
                        "startup_s": round(ours[0] - self.launched_at, 3) if ours else None},
            "peak_pss_mb": peaks.get(name),
            "output": str(self.party_dirs.get(name, "")),
        }


class Progress:
    """Live progress per party (state, round, step, loss).

    On a terminal, a table redrawn in place whenever it changes. Elsewhere (CI logs, files), a
    line per party whenever its state or round moves, and all of them every few seconds.
    """

    def __init__(self, stream: IO[str], every_s: float = 5.0) -> None:
        self.stream = stream
        self.every_s = every_s
        self.live = bool(getattr(stream, "isatty", lambda: False)())
        self.last: dict[str, tuple[str, int]] = {}
        self.warned: set[str] = set()
        self.last_print = 0.0
        self.table: list[str] = []  # what is on screen now (live mode)

    @staticmethod
    def row(name: str, party: PartyStatus, rounds: int) -> str:
        loss = f" loss {party.loss:.4f}" if party.loss is not None else ""
        steps = f" step {party.step}/{party.max_steps}" if party.max_steps else ""
        return f"  {name:<16} {party.state:<11} round {party.round}/{rounds}{steps}{loss}"

    def show(self, status: JobStatus) -> None:
        warnings = sorted(set(status.warnings) - self.warned)
        self.warned.update(warnings)
        if self.live:
            self._redraw(status, warnings)
        else:
            self._log_lines(status, warnings)
        self.stream.flush()

    def _redraw(self, status: JobStatus, warnings: list[str]) -> None:
        table = [self.row(name, p, status.rounds) for name, p in status.parties.items()]
        if table == self.table and not warnings:
            return
        if self.table:  # back to the table's first line, and clear from there down
            self.stream.write(f"\x1b[{len(self.table)}F\x1b[J")
        for warning in warnings:  # above the table, where they stay
            self.stream.write(f"WARNING: {warning}\n")
        self.stream.write("".join(f"{line}\n" for line in table))
        self.table = table

    def _log_lines(self, status: JobStatus, warnings: list[str]) -> None:
        periodic = time.monotonic() - self.last_print >= self.every_s
        for name, p in status.parties.items():
            if self.last.get(name) == (p.state, p.round) and not periodic:
                continue
            self.last[name] = (p.state, p.round)
            print(self.row(name, p, status.rounds), file=self.stream)
        if periodic:
            self.last_print = time.monotonic()
        for warning in warnings:
            print(f"WARNING: {warning}", file=self.stream)


def loss_trend(party: dict[str, Any]) -> str:
    """Mean training loss over the first and the last fifth of a party's steps, and its valset's loss
    from the first evaluated round to the last (flagged when it rose)."""
    losses = [loss for _, loss in party.get("losses", [])]
    fifth = len(losses) // 5
    trend = f"  (loss {sum(losses[:fifth]) / fifth:.3f} -> {sum(losses[-fifth:]) / fifth:.3f})" if fifth else ""
    evaluated = party.get("eval", [])
    if len(evaluated) > 1:
        first, last = evaluated[0]["loss"], evaluated[-1]["loss"]
        trend += f"  (valset {first:.3f} -> {last:.3f}{', ROSE' if last > first else ''})"
    return trend


@dataclass
class Outcome:
    """How a run ended: `state` (succeeded, failed, timed_out, interrupted), the exit code, the error."""

    state: str
    code: int = 0
    error: str = ""
    lost: set[str] = field(default_factory=set)  # parties the job went on (and ended) without


def check_output_writable(root: Path) -> None:
    """A SpecError naming the output when a run could not write there, checked before anything starts by
    writing (and removing) a file where the output would be made (permissions alone do not tell: a
    read-only file system, or root)."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SpecError(f"output {root}: {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fedtune-probe-", dir=existing)
    except OSError as err:
        raise SpecError(f"output {root}: cannot write in {existing}: {err.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def run_job(job: FederatedFineTune, output: Path | None, base_dir: Path, samples: dict[str, int], *,
            source: str = "<job>", timeout_s: float = 24 * 3600, overwrite: bool = False, resume: bool = False,
            log_level: str = "INFO", stream: IO[str] | None = None) -> int:
    """Run a job whose files `preflight.check_files` passed (`samples`, its counts) to its end, write
    summary.json; the exit code. Its other checks come first, in the fork server (`LocalJob.check`);
    `timeout_s` counts from here, those checks included. `resume`: continue the run in the output
    from its last completed round."""
    deadline = time.monotonic() + timeout_s
    try:
        root, party_dirs = output_layout(job, output, base_dir)
    except SpecError as err:
        raise SpecError(f"{source}: {err}") from None
    cleared = runfolder.clear_killed(root / RUN_DIR)  # refused while another run holds the output
    if cleared:
        print(f"fedtune: {cleared}", file=sys.stderr)
    if resume:
        runfolder.check_resumable(root / RUN_DIR, job, source)
    else:
        earlier_results(root, party_dirs, overwrite=overwrite)  # refused at once, before any import
    check_output_writable(root)
    local = LocalJob(job, root, base_dir, party_dirs=party_dirs, log_level=log_level, resume=resume,
                     launched_at=time.time() - process_age_s())  # `fedtune run` itself started then
    stream = stream or sys.stdout  # the one of now (tests replace it)
    outcome: Outcome | None = None
    start = time.monotonic()
    summary: dict[str, Any] = {}
    with Signals(local.kill_now) as signals:
        try:
            try:
                for note in local.check(samples, source):
                    print(f"fedtune: {note}", file=stream)
                if not resume:
                    claim_output(root, party_dirs, overwrite=overwrite)
                start = time.monotonic()
                announce(local, root, resume, stream)
                local.start()
                outcome = watch(local, deadline, timeout_s, stream)
            except Interrupted as stop:
                outcome = Outcome("interrupted", stop.exit_code, f"interrupted by {stop}")
            signals.stopping = True
            local.stop_roles()
            if local.started:
                summary = write_summary(local, time.monotonic() - start, outcome)
        finally:
            signals.stopping = True
            local.stop()
    assert outcome is not None  # set on every path that gets here
    if outcome.code:
        if outcome.state == "interrupted":
            say_interrupted(job, outcome, summary, source, output, root, stream)
        return outcome.code
    say_succeeded(job, base_dir, root, party_dirs, outcome, summary, time.monotonic() - start, stream)
    return 0


def announce(local: LocalJob, root: Path, resume: bool, stream: IO[str]) -> None:
    job = local.job
    verb = "resuming" if resume else "job"
    print(f"fedtune: {verb} {job.job_id}: {len(local.roles) - 1} parties, {len(job.spec.fractions())} rounds, "
          f"output {root}", file=stream)
    print(f"  loss: {LOSS_NAMES['train']} (summary.json and fedtune report show the same)", file=stream)
    if not job.spec.tls.enabled:
        print("WARNING: tls.enabled is false: parties talk gRPC in the clear and anyone who reaches the "
              "ports can join; keep it for debugging on one machine only", file=sys.stderr)
    if local.gpus_shared:
        print(f"WARNING: the parties ask for more GPUs than this machine has, so they share them: "
              f"{local.gpus}", file=sys.stderr)


def watch(local: LocalJob, deadline: float, timeout_s: float, stream: IO[str]) -> Outcome:
    """Follow the job to its end: restart roles that die (while backoffLimit allows), stop the parties the
    job ended without, show progress."""
    job, progress, lost, sampled = local.job, Progress(stream), set(), 0.0
    try:
        while not local.finished():
            if time.monotonic() - sampled >= MEMORY_SAMPLE_S:
                local.sample_memory()
                sampled = time.monotonic()
            restart_or_drop(local, lost)
            failed = local.failed_role()
            if failed is not None:
                returncode = failed.exit_code()
                error = local.state.error() or f"{failed.name} exited with {returncode}"
                code = EXIT_REFUSED if returncode == EXIT_REFUSED else EXIT_FAILED
                print(f"fedtune: job failed: {error}\n--- last lines of {failed.name}'s log "
                      f"({failed.log_path}) ---\n{failed.log_tail()}", file=sys.stderr)
                return Outcome("failed", code, error, lost)
            if time.monotonic() > deadline:
                error = f"timed out after {timeout_s:g} s (--timeout); every role was stopped"
                print(f"fedtune: job {job.job_id} {error}; logs in {local.run_dir / 'logs'}", file=sys.stderr)
                return Outcome("timed_out", EXIT_TIMEOUT, error, lost)
            status = local.status()
            for name in local.stop_dropped(status):
                lost.add(name)
                print(f"WARNING: {name} was dropped from round {status.parties[name].dropped_from} on and never "
                      "came back; the job succeeded without it, and its process is stopped", file=sys.stderr)
            progress.show(status)
            time.sleep(0.1)
        progress.show(local.status())
    except RedisError as err:
        error = f"Redis, which holds the job's state ({local.redis.address}), stopped answering: {err}"
        print(f"fedtune: job failed: {error}", file=sys.stderr)
        return Outcome("failed", EXIT_FAILED, error, lost)
    lost.update(r.name for r in local.exited(ok=False))  # one may have gone as the job finished
    return Outcome("succeeded", 0, "", lost)


def restart_or_drop(local: LocalJob, lost: set[str]) -> None:
    """A role that died is started again while spec.backoffLimit allows; else, where secagg_plus tolerates
    it, the job goes on without it."""
    for role in local.exited(ok=False):
        exit_code = role.exit_code()
        if role.name in lost:  # given up on already, or stopped by us (dropped)
            continue
        if local.restart(role):
            print(f"WARNING: {role.name} exited with {exit_code}; restarted it ({role.restarts} of "
                  f"spec.backoffLimit {local.job.spec.backoffLimit}; its log: {role.log_path})", file=sys.stderr)
        else:  # tolerated, or the job fails just after
            lost.add(role.name)
            if local.dropout_tolerated(role):
                local.give_up(role)
                print(f"WARNING: {role.name} exited with {exit_code}; secagg_plus carries on without it "
                      f"(its log: {role.log_path})", file=sys.stderr)


def write_summary(local: LocalJob, wall_s: float, outcome: Outcome | None) -> dict[str, Any]:
    """summary.json from the job's state; a short one when Redis is gone with it."""
    outcome = outcome or Outcome("failed", EXIT_FAILED, "fedtune run stopped before the job ended")
    try:
        summary = local.summary(wall_s, outcome.error, outcome.state)
    except RedisError:
        summary = {"job": local.job.job_id, "state": outcome.state, "error": outcome.error,
                   "rounds": len(local.job.spec.fractions()), "wall_s": round(wall_s, 3)}
    files.write_json_atomic(local.output / "summary.json", summary)
    return summary


def say_interrupted(job: FederatedFineTune, outcome: Outcome, summary: dict[str, Any], source: str,
                    output: Path | None, root: Path, stream: IO[str]) -> None:
    if not summary:
        print(f"fedtune: job {job.job_id} {outcome.error} before it started; nothing was left behind",
              file=sys.stderr)
        return
    again = f"fedtune run {source}" + (f" --output {root}" if output is not None else "") + " --resume"
    print(f"fedtune: job {job.job_id} {outcome.error} after round {summary.get('round', 0)} of "
          f"{summary.get('rounds')}; every process it started is stopped; continue with: {again}",
          file=sys.stderr)
    stream.flush()


def say_succeeded(job: FederatedFineTune, base_dir: Path, root: Path, party_dirs: dict[str, Path], outcome: Outcome,
                  summary: dict[str, Any], wall_s: float, stream: IO[str]) -> None:
    print(f"fedtune: job {job.job_id} succeeded in {wall_s:.1f} s; adapters:", file=stream)
    last = checkpoint_name(job.spec.fractions()[-1])
    dropped = summary.get("dropped", {})
    for name, folder in party_dirs.items():
        if name in dropped:
            print(f"  {name} was dropped from round {dropped[name]} on; its adapters from before: {folder}",
                  file=stream)
        elif name in outcome.lost:
            print(f"  {name} dropped out; its adapters from before: {folder}", file=stream)
        else:
            print(f"  {folder / last}{loss_trend(summary['parties'].get(name, {}))}", file=stream)
    first = next(name for name in party_dirs if name not in outcome.lost and name not in dropped)
    model = resolve_path(job.spec.pretrained_model(job.spec.party(first)), base_dir)
    print(f"chat with it:\n  fedtune chat --model {model} --adapter {party_dirs[first] / last}", file=stream)
    print(f"see its loss curves:\n  fedtune report {root}", file=stream)
