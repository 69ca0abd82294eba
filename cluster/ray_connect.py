"""Connecting to Ray without ever hanging: an explicit address, a probe, a deadline.

The cluster is, in this order: [ray] address, else RAY_ADDRESS (also what `ray job submit` sets for
the job's own cluster), else a fresh local instance (address="local"). Never Ray's own fallback of
joining whatever cluster the session file of an earlier `ray start` names: after that head was
stopped, ray.init() sits there forever. A GCS address is probed over TCP first (a closed port fails
at once), and ray.init runs under a deadline that ends the process with a message if it is passed.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from typing import Any

from core.config import RayConfig

log = logging.getLogger(__name__)


class RayConnectError(RuntimeError):
    """Ray is unreachable at the address in use; the message names it and what to do."""


def chosen_address(cfg: RayConfig) -> str:
    """The address connect() uses: [ray] address, RAY_ADDRESS, or "local" for a fresh instance."""
    return cfg.address or os.environ.get("RAY_ADDRESS", "") or "local"


def _probe(address: str, timeout: float) -> None:
    """Fail fast when nothing listens at a host:port GCS (or ray:// client) address."""
    target = address.removeprefix("ray://")
    if target in ("local", "auto") or "://" in target or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=min(timeout, 10.0)):
            return
    except (OSError, ValueError) as error:
        raise RayConnectError(
            f"cannot reach the Ray cluster at {address} ({error}): start it (`ray start --head`), or give the "
            "right --set ray.address=HOST:PORT / RAY_ADDRESS, or unset both to run on a fresh local instance"
        ) from None


def connect(cfg: RayConfig, *, num_cpus: int | None = None, quiet: bool = True) -> str:
    """ray.init for the chosen cluster within cfg.connect_timeout_s; returns the address used.

    No runtime_env here: inside a submitted job Ray refuses a driver's env_vars that repeat the
    job's, and what the workers need travels with them (Ray Train's worker_runtime_env, prep's
    S3 settings as a task argument); a fresh local instance inherits this process's environment.
    """
    import ray

    if ray.is_initialized():
        return "already connected"
    address = chosen_address(cfg)
    _probe(address, cfg.connect_timeout_s)
    finished = threading.Event()

    def deadline() -> None:
        if not finished.wait(cfg.connect_timeout_s):
            sys.stderr.write(
                f"error: connecting to Ray at {address} took longer than ray.connect_timeout_s="
                f"{cfg.connect_timeout_s:g}s; check that the cluster is up and reachable from here\n")
            sys.stderr.flush()
            os._exit(2)

    threading.Thread(target=deadline, name="ray-connect-deadline", daemon=True).start()
    try:
        kwargs: dict[str, Any] = dict(address=address, log_to_driver=True)
        if address == "local":
            kwargs.update(num_cpus=num_cpus, include_dashboard=False)
        if quiet:
            kwargs["logging_level"] = logging.WARNING
        ray.init(**kwargs)
    except ConnectionError as error:
        raise RayConnectError(f"cannot connect to the Ray cluster at {address}: {error}") from None
    finally:
        finished.set()
    log.info("connected to Ray at %s", address)
    return address
