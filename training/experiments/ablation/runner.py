"""Running an ablation's jobs: which are done (finished with this config), to resume or new; each as a subprocess
of ``python -m training.run`` (or in this process), several at once, longer settings first."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Sequence, Union

from ...files import read_json, write_text
from .plan import Job, job_config
from .settings import SETTINGS

__all__ = ["TIMING_NAME", "job_state", "run_jobs"]

TIMING_NAME = "ablation_timing.json"  # wall and CPU seconds of the run, written by the runner


def _with_defaults(config: dict) -> dict:
    """A stored config with the keys added since it was written at their defaults (which keep the old behaviour)."""
    from ...config import Config, ConfigError

    try:
        return Config.from_dict(config).to_dict() if config else config
    except ConfigError:
        return config  # compared as stored: the differing keys are then named


def _comparable(config: dict) -> dict:
    from ...run import RESUMABLE_KEYS

    return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in RESUMABLE_KEYS}


def job_state(job: Job) -> str:
    """``done`` (finished summary with this job's config), ``resume`` (a checkpoint), ``new``; raises
    ``ValueError`` if a finished run there was made with another config."""
    from ...checkpoint import CHECKPOINT_NAME

    summary = read_json(os.path.join(job.run_dir, "summary.json"))
    if summary and summary.get("finished"):
        expected = _comparable(job_config(job).to_dict())
        stored = _comparable(_with_defaults(summary.get("config") or {}))
        changed = sorted(k for k in set(expected) | set(stored) if expected.get(k) != stored.get(k))
        if changed:
            raise ValueError(f"{job.run_dir} holds a finished run with another config ({', '.join(changed)}); "
                             "use another --runs directory or delete it")
        return "done"
    if os.path.isfile(os.path.join(job.run_dir, CHECKPOINT_NAME)):
        return "resume"
    return "new"


def _clear_partial(run_dir: str) -> None:
    """Remove the files of a run that never reached its first checkpoint, so that it can start over."""
    for name in ("summary.json", "metrics.jsonl", "config.json", "accuracy.png", TIMING_NAME):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            os.remove(path)


def _command(job: Job, state: str) -> list[str]:
    if state == "resume":
        device = next(o for o in job.overrides if o.startswith("device="))
        return [sys.executable, "-m", "training.run", "--out", job.run_dir, "--resume", "--set", device,
                "progress=false"]
    return [sys.executable, "-m", "training.run", "--config", job.base_config, "--out", job.run_dir, "--set",
            *job.overrides]


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _run_subprocess(job: Job, state: str, threads: int) -> None:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    os.makedirs(job.run_dir, exist_ok=True)
    with open(os.path.join(job.run_dir, "ablation.log"), "a") as log:
        log.write(f"$ {' '.join(_command(job, state))}\n")
        log.flush()
        proc = subprocess.Popen(_command(job, state), stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = _tail(os.path.join(job.run_dir, "ablation.log"))
        raise RuntimeError(f"training.run exited with {proc.returncode}:\n{tail}")
    return usage.ru_utime + usage.ru_stime


def _run_inprocess(job: Job, state: str, threads: int) -> None:
    import torch

    from ...checkpoint import CHECKPOINT_NAME, load_checkpoint
    from ...config import Config
    from ...run import run

    if state == "resume":
        stored = load_checkpoint(os.path.join(job.run_dir, CHECKPOINT_NAME))["config"]
        cfg = Config.from_dict({**stored, "device": job_config(job).device, "progress": False})
    else:
        cfg = job_config(job)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    os.makedirs(job.run_dir, exist_ok=True)
    cpu = time.process_time()
    try:
        with open(os.path.join(job.run_dir, "ablation.log"), "a") as log, contextlib.redirect_stdout(log):
            run(cfg, out_dir=job.run_dir, resume=state == "resume", overwrite=True)
    finally:
        torch.set_num_threads(previous)
    return time.process_time() - cpu


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path) as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


def run_jobs(jobs: Sequence[Job], *, jobs_in_parallel: int = 1, threads: int = 1, subprocesses: Union[bool, None] = None,
             log=print) -> dict:
    """Run every job not already done; returns {job key: "done" | "ran" | error message}.

    ``jobs_in_parallel`` runs go at once (subprocesses of ``python -m training.run``, each with ``threads`` CPU
    threads); with one at a time they run in this process unless ``subprocesses`` is True. Longer settings start
    first. A failed run is reported and the others go on."""
    status, todo = {}, []
    for job in jobs:
        state = job_state(job)
        if state == "done":
            status[job.key] = "done"
        else:
            todo.append((job, state))
    if not todo:
        return status
    todo.sort(key=lambda item: (-SETTINGS[item[0].setting].cost_rank, item[0].seed, item[0].budget or ""))
    use_subprocess = jobs_in_parallel > 1 if subprocesses is None else subprocesses
    started = time.perf_counter()
    log(f"ablation: {len(todo)} run(s) to do ({len(status)} already done), {jobs_in_parallel} at a time, "
        f"{threads} thread(s) each")

    def one(item):
        job, state = item
        if state == "new":
            _clear_partial(job.run_dir)
        begin = time.perf_counter()
        cpu = (_run_subprocess if use_subprocess else _run_inprocess)(job, state, threads)
        seconds = time.perf_counter() - begin
        timing = read_json(os.path.join(job.run_dir, TIMING_NAME)) or {"wall_seconds": 0.0, "cpu_seconds": 0.0}
        timing = {"wall_seconds": timing["wall_seconds"] + seconds, "cpu_seconds": timing["cpu_seconds"] + cpu,
                  "threads": threads, "parallel_runs": jobs_in_parallel}
        write_text(os.path.join(job.run_dir, TIMING_NAME), json.dumps(timing) + "\n")
        return seconds, cpu

    finished = 0
    with ThreadPoolExecutor(max_workers=max(1, jobs_in_parallel)) as pool:
        futures = {pool.submit(one, item): item[0] for item in todo}
        for future in as_completed(futures):
            job = futures[future]
            finished += 1
            elapsed = time.perf_counter() - started
            try:
                seconds, cpu = future.result()
            except Exception as error:  # noqa: BLE001 - one failed run must not stop the others
                status[job.key] = f"failed: {error}"
                log(f"[{finished}/{len(todo)}] {job.key} FAILED ({error})")
                continue
            status[job.key] = "ran"
            summary = read_json(os.path.join(job.run_dir, "summary.json")) or {}
            acc = (summary.get("average_incremental_accuracy") or {}).get("top1")
            eta = elapsed / finished * (len(todo) - finished)
            log(f"[{finished}/{len(todo)}] {job.key}: avg incremental top-1 "
                f"{'-' if acc is None else f'{acc:.2f}'}%, {seconds:.0f} s ({cpu:.0f} CPU s; elapsed "
                f"{elapsed / 60:.1f} min, "
                f"about {eta / 60:.1f} min left)")
    return status
