"""Webhook tokens reloaded while serving: ``kill -HUP <pid of connector serve>``.

On SIGHUP the process reads its configuration file again (the same path, the environment it
has), validates it, and, if it is valid, replaces each running dispensary's webhook tokens in
place (:class:`connector.receiver.WebhookTokens`); a webhook being answered sees the old table
or the new one, never a mix. Nothing else is applied: a change anywhere else (a destination,
the store, the server, a dispensary added or removed) is named in a warning and needs a
restart. An invalid file is logged with its file, line and key, and the old tokens stay.

Token rotation is therefore: add the new token beside the old one, reload, switch Treez to
the new one, remove the old one, reload. Each replica is a process of its own and reloads on
its own signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from connector.config import Config, load_config
from connector.errors import ConfigError
from connector.logs import get_logger

log = get_logger("connector.reload")


def changed_keys(old: Config, new: Config) -> list[str]:
    """The top-level keys whose content differs, webhook tokens aside (names, not values).
    A dispensary added, removed, or changed in anything but its tokens counts under
    ``dispensaries``."""
    keys = []
    for key in type(old).model_fields:
        if key == "dispensaries":
            continue
        if getattr(old, key) != getattr(new, key):
            keys.append(key)
    if set(old.dispensaries) != set(new.dispensaries) or any(
        old.dispensaries[name].model_copy(update={"webhook_token": []})
        != new.dispensaries[name].model_copy(update={"webhook_token": []})
        for name in old.dispensaries
    ):
        keys.append("dispensaries")
    return keys


def with_tokens_of(running: Config, new: Config) -> Config:
    """``running`` with the webhook tokens of ``new`` for the dispensaries both have."""
    dispensaries = {
        name: disp.model_copy(update={"webhook_token": new.dispensaries[name].webhook_token})
        if name in new.dispensaries
        else disp
        for name, disp in running.dispensaries.items()
    }
    return running.model_copy(update={"dispensaries": dispensaries})


def reload_tokens(path: Path, running: Config, replace: Callable[[Config], None]) -> bool:
    """Read ``path`` and hand the running configuration with its new tokens to ``replace``;
    False (logged, nothing replaced) when the file cannot be used."""
    try:
        new = load_config(path)
    except ConfigError as exc:
        log.error(
            "config_reload_failed",
            config=str(path),
            errors=[
                f"{exc.source}:{p.line}: {p}" if p.line else f"{exc.source}: {p}"
                for p in exc.problems
            ],
            reason="the previous webhook tokens stay in use",
        )
        return False
    applied = with_tokens_of(running, new)
    # the console keeps the token it started with: no webhook token may become it
    if applied.console_token_reused() is not None:
        log.error(
            "config_reload_failed",
            config=str(path),
            errors=[
                f"{path}: a webhook token is the running console's token (console.token): "
                "give one of them another value"
            ],
            reason="the previous webhook tokens stay in use",
        )
        return False
    replace(applied)
    log.info(
        "config_reloaded",
        config=str(path),
        applied=[
            f"{name}: {len(disp.webhook_token)} webhook token(s)"
            for name, disp in applied.dispensaries.items()
        ],
    )
    other = changed_keys(running, new)
    if other:
        log.warning(
            "config_reload_partial",
            config=str(path),
            reason=f"only webhook tokens are reloaded; restart to apply: {', '.join(other)}",
        )
    return True


class _Reloads:
    """SIGHUP's handler while serving. The file is read and checked in a thread (the event
    loop keeps answering webhooks meanwhile), one reload at a time: signals that arrive
    during a reload make one more reload after it, however many they are (a storm of
    signals costs at most two reads of the file)."""

    def __init__(self, path: Path, config: Config, replace: Callable[[Config], None]) -> None:
        self.path = path
        self.config = config
        self.replace = replace
        self.task: asyncio.Task[None] | None = None
        self.again = False

    def signalled(self) -> None:
        if self.task is not None:
            self.again = True
            return
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                self.again = False
                replaced: list[Config] = []
                await asyncio.to_thread(reload_tokens, self.path, self.config, replaced.append)
                for new in replaced:  # swapped on the loop's thread, between two requests
                    self.replace(new)
                if not self.again:
                    return
        except Exception as exc:  # a reload never stops the server
            log.error("config_reload_failed", config=str(self.path), error=exc)
        finally:
            self.task = None

    async def stop(self) -> None:
        task = self.task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def install(app: Any, path: Path, config: Config) -> None:
    """Reload ``app``'s webhook tokens from ``path`` on SIGHUP while ``app`` runs (from its
    lifespan on). Before and after, SIGHUP is ignored rather than fatal; the pipeline process
    started meanwhile inherits that and ignores it too (it holds no token)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(started: Any) -> AsyncIterator[Any]:
        async with inner(started) as state:
            loop = asyncio.get_running_loop()
            reloads = _Reloads(path, config, app.state.webhook_tokens.replace)
            loop.add_signal_handler(signal.SIGHUP, reloads.signalled)
            try:
                yield state
            finally:
                loop.remove_signal_handler(signal.SIGHUP)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                await reloads.stop()

    app.router.lifespan_context = lifespan
