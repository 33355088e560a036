"""``Registrar``: keeps this runner registered with a go-livepeer orchestrator.

The protocol (go-livepeer ``LiveRunnerRegistry.Heartbeat`` / ``Unregister``):

1. bootstrap: ``POST /runners/heartbeat`` with ``Authorization: <orchSecret>`` and the whole
   registration; the reply carries the ``runner_id``, the interval and TTL, a derived
   ``heartbeat_secret``, the O2R channel and the authoritative ``session_ids``;
2. every interval: the same request with ``Authorization: <heartbeat_secret>``; each reply lists
   the sessions again;
3. a 404 (expired, not yet swept) or 401 (swept: the secret means nothing any more; or the
   orchestrator restarted) on a heartbeat means: bootstrap again;
4. on shutdown: ``POST /runners/{id}/unregister`` with the heartbeat secret (204).

An orchestrator that is unreachable, restarting or answering nonsense never stops the service:
the registrar tries again with a doubling wait (up to ``live_runner_retry_max_s``) and logs once
per change of state, not once per try.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from livediff.livepeer.live_runner.protocol import (
    ChannelDescriptor,
    HeartbeatReply,
    ProtocolError,
    parse_reply,
)

logger = logging.getLogger(__name__)

#: The first wait after a failed try; it doubles up to the configured maximum.
FIRST_RETRY_S = 0.5

Registration = Callable[[], dict[str, Any]]
OnReply = Callable[[HeartbeatReply, float], None]
OnO2R = Callable[[ChannelDescriptor], Awaitable[None]]


class RegistrationRefusedError(Exception):
    """The orchestrator answered a heartbeat with an error status (plain-text reason)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status


class Registrar:
    """Registers, heartbeats, registers again when forgotten, unregisters at the end."""

    def __init__(
        self,
        orchestrator: str,
        secret: str,
        registration: Registration,
        on_reply: OnReply,
        on_o2r: OnO2R,
        *,
        proposed_id: str | None = None,
        retry_max_s: float = 30.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.orchestrator = orchestrator.rstrip("/")
        self.registration = registration
        self.runner_id: str | None = None
        self.state = "starting"
        self.registrations = 0
        self.heartbeats = 0
        self._secret = secret
        self._heartbeat_secret: str | None = None
        self._proposed_id = proposed_id
        self._on_reply = on_reply
        self._on_o2r = on_o2r
        self._retry_max_s = retry_max_s
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(5.0), trust_env=False)
        self._interval_s = 5.0
        self._asked_at = 0.0
        self._wake = asyncio.Event()
        self._o2r_task: asyncio.Task[None] | None = None

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Keep registered until cancelled."""
        retry_s = FIRST_RETRY_S
        while True:
            try:
                await self._beat()
            except RegistrationRefusedError as exc:
                self._enter("refused", f"the orchestrator refused the registration ({exc})")
            except (httpx.HTTPError, ProtocolError) as exc:
                self._enter("unreachable", f"the orchestrator cannot be reached ({exc!r})")
            else:
                retry_s = FIRST_RETRY_S
                await self._sleep(self._interval_s)
                continue
            await self._sleep(retry_s)
            retry_s = min(retry_s * 2, self._retry_max_s)

    def request_heartbeat(self) -> None:
        """Heartbeat now (to learn of a session reserved a moment ago)."""
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            return

    async def _beat(self) -> None:
        if self._heartbeat_secret is None:
            await self._register()
            return
        try:
            reply = await self._post(self._heartbeat_secret, self.runner_id)
        except RegistrationRefusedError as exc:
            if exc.status not in (401, 404):
                raise
            self._enter("forgotten", f"the orchestrator forgot runner {self.runner_id} ({exc})")
            self._heartbeat_secret = None
            await self._register()
            return
        self.heartbeats += 1
        self._enter("registered", f"registered as {self.runner_id}")
        self._accept(reply)

    async def _register(self) -> None:
        reply = await self._post(self._secret, self._proposed_id)
        if not reply.heartbeat_secret:
            raise ProtocolError("the bootstrap reply has no heartbeat_secret")
        self.runner_id, self._heartbeat_secret = reply.runner_id, reply.heartbeat_secret
        self.registrations += 1
        self._enter("registered", f"registered as {self.runner_id} at {self.orchestrator}")
        self._accept(reply)
        if reply.o2r is not None:
            self._follow_o2r(reply.o2r)

    def _accept(self, reply: HeartbeatReply) -> None:
        self._interval_s = reply.interval_s
        self._on_reply(reply, self._asked_at)

    async def _post(self, authorization: str, runner_id: str | None) -> HeartbeatReply:
        body = self.registration()
        if runner_id:
            body["runner_id"] = runner_id
        self._asked_at = time.monotonic()
        response = await self._client.post(
            f"{self.orchestrator}/runners/heartbeat",
            json=body,
            headers={"Authorization": authorization},
        )
        if response.status_code != 200:
            raise RegistrationRefusedError(response.status_code, response.text.strip()[:200])
        return parse_reply(response.content)

    # -- O2R ---------------------------------------------------------------------------------
    def _follow_o2r(self, channel: ChannelDescriptor) -> None:
        if self._o2r_task is not None:
            self._o2r_task.cancel()
        self._o2r_task = asyncio.ensure_future(self._on_o2r(channel))

    # -- the end ------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Unregister (best effort: the TTL ends the registration anyway) and close."""
        if self._o2r_task is not None:
            self._o2r_task.cancel()
            await asyncio.gather(self._o2r_task, return_exceptions=True)
        try:
            await self._unregister()
        finally:
            await self._client.aclose()

    async def _unregister(self) -> None:
        if self._heartbeat_secret is None or self.runner_id is None:
            return
        try:
            response = await self._client.post(
                f"{self.orchestrator}/runners/{self.runner_id}/unregister",
                headers={"Authorization": self._heartbeat_secret},
            )
        except httpx.HTTPError as exc:
            logger.warning("could not unregister runner %s: %r", self.runner_id, exc)
            return
        if response.status_code == 204:
            logger.info("unregistered runner %s", self.runner_id)
        else:
            logger.warning(
                "unregistering runner %s: %d %s",
                self.runner_id,
                response.status_code,
                response.text.strip()[:200],
            )
        self._heartbeat_secret = None
        self.state = "unregistered"

    def _enter(self, state: str, message: str) -> None:
        """Log ``message`` when the state changes (once, not at every try)."""
        if state == self.state:
            return
        self.state = state
        log = logger.info if state == "registered" else logger.warning
        log("live runner: %s", message)
