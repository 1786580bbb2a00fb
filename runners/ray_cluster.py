"""Joining (or starting) the Ray cluster that ``runner sweep`` and ``runner reproduce --address`` run on.

``address``: ``None`` or ``"local"`` starts a local Ray instance sized to this machine (it stops with the command);
``"auto"`` joins the cluster started on this machine with ``ray start``; ``HOST:PORT`` joins the head node's GCS
(``ray start --head --port PORT``); ``ray://HOST:10001`` connects through Ray Client. A ``HOST:PORT`` or ``ray://``
address that refuses TCP connections is a one-line :class:`ConfigError` before Ray is asked to connect.

Plugins this process resolved without an installed entry point (e.g. registered at run time) are handed to the
Ray workers as a ``*.dist-info`` folder (``runtime_plugin_dir``) that each worker appends to ``sys.path``: on a
multi-node cluster it must be on storage every node can read (the sweep's storage path is).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lvzoo import registry
from lvzoo.runners.plan import ConfigError, one_line

#: Seconds to wait for a TCP connection to the cluster address.
CONNECT_TIMEOUT_S = 5.0
_PLUGIN_DIST = "lvzoo_runtime_plugins-0.dist-info"


def require_ray() -> Any:
    """The ``ray`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError('Ray is not installed; install the sweep extra: pip install "lvzoo[sweep]"') from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``HOST:PORT`` or ``ray://HOST:PORT`` (``None`` for ``auto``/``local``)."""
    if address in ("auto", "local"):
        return None
    text = address.removeprefix("ray://")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"bad --address {address!r}; accepted: auto, local, HOST:PORT, ray://HOST:PORT")
    return host.strip("[]"), int(port)


def check_reachable(address: str) -> None:
    """Refuse an address nothing listens on (one TCP connection attempt)."""
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address!r}: {one_line(str(exc))}") from None


@contextmanager
def connected(address: str | None, *, log_to_driver: bool = False) -> Iterator[Any]:
    """Ray initialised for ``address`` inside the block (shut down after); yields the ``ray`` module."""
    ray = require_ray()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address not in (None, "local"):
        check_reachable(address)
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver, "configure_logging": False}
    if address in (None, "local"):
        kwargs.update(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False)
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot connect to Ray at {address or 'local'!r}: {one_line(str(exc))}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def runtime_plugins(pairs: Sequence[tuple[str, str, type[Any]]]) -> tuple[tuple[str, str, str], ...]:
    """``(group, name, "module:QualName")`` of each ``(group, name, class)`` no installed entry point registers."""
    import importlib.metadata

    found = []
    for group, name, cls in pairs:
        target = registry.class_path(cls)
        installed = importlib.metadata.entry_points(group=group, name=name)
        if not any(entry.value.replace(" ", "") == target for entry in installed):
            found.append((group, name, target))
    return tuple(sorted(set(found)))


def write_plugin_dir(plugins: Sequence[tuple[str, str, str]], directory: Path) -> str | None:
    """A ``*.dist-info`` folder in ``directory`` registering ``plugins``; returns ``directory`` (None if none)."""
    if not plugins:
        return None
    dist = directory / _PLUGIN_DIST
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lvzoo-runtime-plugins\nVersion: 0\n")
    groups: dict[str, list[str]] = {}
    for group, name, target in plugins:
        groups.setdefault(group, []).append(f"{name} = {target}")
    (dist / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "\n".join(lines) + "\n\n" for group, lines in groups.items())
    )
    return str(directory)


def use_plugin_dir(directory: str | None) -> None:
    """In a worker: put the plugin folder on ``sys.path`` (once)."""
    if directory is not None and directory not in sys.path:
        sys.path.append(directory)


def cluster_cpus(ray: Any) -> int:
    """CPUs of the connected cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def check_resources(ray: Any, cpus: float, gpus: float) -> None:
    """Refuse runs that need more CPUs or GPUs than the whole cluster has (they would wait forever)."""
    total = ray.cluster_resources()
    for what, need in (("CPU", cpus), ("GPU", gpus)):
        if need > total.get(what, 0):
            raise ConfigError(
                f"a run needs {need:g} {what}s but the Ray cluster has {total.get(what, 0):g}; "
                f"lower --{what.lower()}s-per-trial or add nodes"
            )
