"""``connector check --online``: each configured destination and Treez asked once, with a
harmless authenticated read, whether they can be reached and take the credentials.

What is sent: credentials and the read itself, never a customer's data (each destination's
``probe()`` says which read; the ``http`` and ``braze`` types have none and say why). Every
probe runs at once, unretried and unpaced, within
:data:`~connector.destinations._probe.PROBE_TIMEOUT_SECONDS`. Without ``--online`` nothing
of this runs and ``check`` opens no connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from connector.config import AnyDestination, Config, TreezApiConfig
from connector.destinations import build_destination, where
from connector.destinations._probe import (
    PROBE_TIMEOUT_SECONDS,
    Probe,
    failed_to_connect,
    not_checked,
)
from connector.destinations._vendor import host_of
from connector.treez_api import TreezApiError, TreezAuthError, TreezClient, TreezRetriable


@dataclass(frozen=True, slots=True)
class Checked:
    """One line of the preflight: what was asked, and what it answered."""

    dispensary: str
    what: str  # "treez", or "destination NAME (TYPE → host)"
    probe: Probe

    def __str__(self) -> str:
        return f"online: {self.dispensary} {self.what}: {self.probe}"


async def probe_treez(config: TreezApiConfig, timeout: float = PROBE_TIMEOUT_SECONDS) -> Probe:
    """Treez's token request (``POST …/config/api/gettokens``): no customer is read."""
    client = TreezClient(config, timeout=timeout, attempts=1, pace=False)
    try:
        await client.probe()
    except TreezAuthError as exc:
        return Probe("refused", f"HTTP {exc.status}" + (f" {exc.code}" if exc.code else ""))
    except TreezRetriable as exc:
        cause = exc.__context__  # the transport's error, when there was no answer at all
        if isinstance(cause, httpx.HTTPError):
            return failed_to_connect(cause, timeout)
        return Probe("unreachable", str(exc))
    except TreezApiError as exc:
        return Probe("unreachable", str(exc))
    finally:
        await client.aclose()
    return Probe("reachable")


async def probe_destination(
    config: AnyDestination, timeout: float = PROBE_TIMEOUT_SECONDS
) -> Probe:
    """The destination's own harmless read, within ``timeout``."""
    if "timeout_seconds" in type(config).model_fields:
        config = config.model_copy(update={"timeout_seconds": timeout})
    sink = build_destination(config)
    probe: Callable[[], Awaitable[Probe]] | None = getattr(sink, "probe", None)
    try:
        if probe is None:
            return not_checked(f"the {config.type} destination type defines no harmless read")
        try:
            # a bound on the whole probe too: a client may not apply its timeout everywhere
            return await asyncio.wait_for(probe(), timeout + 1.0)
        except TimeoutError:
            return Probe("unreachable", f"no answer within {timeout:g} s")
    finally:
        await sink.aclose()


async def preflight(config: Config, timeout: float = PROBE_TIMEOUT_SECONDS) -> list[Checked]:
    """Every dispensary's Treez API (when configured) and destinations, probed at once, in
    the configuration's order."""
    labels: list[tuple[str, str]] = []
    probes: list[Awaitable[Probe]] = []
    for name, disp in config.dispensaries.items():
        if disp.treez is not None:
            labels.append((name, f"treez ({host_of(disp.treez.api_url)})"))
            probes.append(probe_treez(disp.treez, timeout))
        for dest in disp.destinations:
            labels.append((name, f"destination {dest.name} ({dest.type} → {where(dest)})"))
            probes.append(probe_destination(dest, timeout))
    results = await asyncio.gather(*probes)
    return [Checked(name, what, probe) for (name, what), probe in zip(labels, results, strict=True)]
