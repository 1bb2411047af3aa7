"""The emulated device: one process, one torch thread, its CPU capped by a cgroup quota.

Benchmarks that need "a device slower than the server" (``compare``, ``advise``) run their device-side
work in this process: it loads the model at full speed, then joins a cgroup that lets it use
``cores`` of a CPU (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``). Without a writable cgroup it
runs uncapped and :meth:`DeviceCgroup.describe` says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
from splitwire.split.models import LoadedModel

log = logging.getLogger(__name__)

CGROUP_PERIOD_US = 10_000  # a short period, so a capped device is slow evenly rather than in 75 ms stalls


class DeviceCgroup:
    """A cgroup capping its members at ``cores`` of CPU (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``)."""

    def __init__(self, cores: float) -> None:
        self.cores = cores
        self.path: Path | None = None
        self.why_not = ""

    def __enter__(self) -> DeviceCgroup:
        name = f"splitwire-device-{os.getpid()}"
        quota = max(1000, int(self.cores * CGROUP_PERIOD_US))
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # cgroup v2: one unified hierarchy
            path, files = Path("/sys/fs/cgroup", name), {"cpu.max": f"{quota} {CGROUP_PERIOD_US}"}
        else:  # cgroup v1: the cpu controller's own hierarchy
            path = Path("/sys/fs/cgroup/cpu", name)
            files = {"cpu.cfs_period_us": str(CGROUP_PERIOD_US), "cpu.cfs_quota_us": str(quota)}
        try:
            path.mkdir(exist_ok=True)
            for file, value in files.items():
                (path / file).write_text(value)
        except OSError as exc:
            self.why_not = f"{path}: {exc.strerror or exc}"
            with contextlib.suppress(OSError):
                path.rmdir()
            log.warning("cannot cap the device's CPU (%s): it runs uncapped", self.why_not)
            return self
        self.path = path
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path is None:
            return
        parent = self.path.parent / "cgroup.procs"
        for pid in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                parent.write_text(pid)
        with contextlib.suppress(OSError):
            self.path.rmdir()

    def describe(self) -> str:
        if self.path is None:
            return f"1 torch thread, uncapped ({self.why_not})"
        return f"1 torch thread capped at {self.cores:g} of a core (cgroup {self.path})"


_device: dict[str, object] = {}  # the device process's loaded model, set by _start


def _start(model_name: str, cgroup: str | None) -> None:
    """Device process initialiser: load the model at full speed, then enter the capped cgroup."""
    from splitwire.split.models import load_model

    torch.set_num_threads(1)
    _device["model"] = load_model(model_name)
    if cgroup:
        Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))


def device_model() -> LoadedModel:
    """The model the device process loaded (call only inside a :func:`device_process` task)."""
    model = _device["model"]
    assert isinstance(model, LoadedModel)
    return model


@contextlib.contextmanager
def device_process(model_name: str, cores: float) -> Iterator[tuple[ProcessPoolExecutor, DeviceCgroup]]:
    """One device process with ``model_name`` loaded, capped at ``cores``; submit work to it."""
    with DeviceCgroup(cores) as cgroup, ProcessPoolExecutor(
        1, mp_context=get_context("spawn"), initializer=_start,
        initargs=(model_name, str(cgroup.path) if cgroup.path else None),
    ) as pool:  # fmt: skip
        yield pool, cgroup
