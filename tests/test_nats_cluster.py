"""Fail-over in a 3-server NATS cluster (real nats-servers running deploy/nats-cluster.conf).

Clients connect through `natsutil.connect_nats` with the comma-separated server list (with
credentials), one server is killed with SIGKILL mid-stream, and the clients move on:
- request/reply, the pattern the services use, with the retry an application adds (a
  request with no reply within its timeout is sent again, the responder answers a repeat
  from its record): every numbered request ends answered exactly once;
- plain publish is at-most-once in core NATS: the stream resumes after the reconnect and
  the gap (messages published while the subscriber's interest was moving) is measured
  and logged, not asserted away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path

import nats
import pytest

from services import natsutil
from services.natscluster import NatsCluster

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
SUBJECT = "c2c.test.echo"
NUM_REQUESTS = 600
NUM_IN_FLIGHT = 16
REQUEST_TIMEOUT_S = 0.5
CEILING_S = 30.0
BATCH = 20
BATCH_WAIT_S = 0.1
NUM_BEFORE_KILL = 600


@pytest.fixture
def cluster():
    with NatsCluster(num_servers=3, user="c2c", password="test-pw-3f9a",
                     config_path=ROOT / "deploy" / "nats-cluster.conf") as running:
        yield running


async def _connect_apart(cluster: NatsCluster, name: str, avoid: int) -> nats.NATS:
    """A client on another member than `avoid` when a few tries get one (the client picks
    its server at random); else on the same one, which the tests also cover."""
    for _ in range(8):
        nc = await natsutil.connect_nats(cluster.url, name, timeout_s=CEILING_S)
        if cluster.member_at(nc.connected_url) != avoid:
            return nc
        await nc.close()
    return await natsutil.connect_nats(cluster.url, name, timeout_s=CEILING_S)


class Responder:
    """Answers `n` with `n:n*n`; a repeated `n` gets the recorded answer (idempotent)."""

    def __init__(self) -> None:
        self.answers: dict[int, bytes] = {}
        self.deliveries: Counter[int] = Counter()

    async def on_request(self, msg) -> None:
        n = int(msg.data)
        self.deliveries[n] += 1
        answer = self.answers.setdefault(n, f"{n}:{n * n}".encode())
        await msg.respond(answer)


class Requester:
    """Sends numbered requests, NUM_IN_FLIGHT at a time, retrying each until answered."""

    def __init__(self, nc: nats.NATS, kill_after: int) -> None:
        self.nc = nc
        self.replies: dict[int, bytes] = {}
        self.num_retries = 0
        self.reached_kill_point = asyncio.Event()
        self.kill_after = kill_after

    async def request(self, n: int, slots: asyncio.Semaphore) -> None:
        async with slots:
            while True:
                try:
                    reply = await self.nc.request(SUBJECT, str(n).encode(), timeout=REQUEST_TIMEOUT_S)
                    break
                except nats.errors.Error as exc:  # timeout, no responders, reconnecting
                    self.num_retries += 1
                    log.debug("request %d: %r; again", n, exc)
                    await asyncio.sleep(0.02)  # back-off before the retry, not a wait
        assert n not in self.replies, f"request {n} answered twice"
        self.replies[n] = reply.data
        if len(self.replies) >= self.kill_after:
            self.reached_kill_point.set()

    async def run(self) -> None:
        slots = asyncio.Semaphore(NUM_IN_FLIGHT)
        await asyncio.gather(*(self.request(n, slots) for n in range(NUM_REQUESTS)))


async def _await_moved(nc: nats.NATS, cluster: NatsCluster, killed: int) -> int:
    """The member `nc` reconnected to after `killed` died."""
    deadline = time.monotonic() + CEILING_S
    while not (nc.is_connected and cluster.member_at(nc.connected_url) != killed):
        assert time.monotonic() < deadline, "client did not reconnect to a surviving server"
        await asyncio.sleep(0.01)
    return cluster.member_at(nc.connected_url)


async def test_cluster_refuses_clients_without_the_credentials(cluster):
    bare_url = cluster.urls[0].replace(f"{cluster.user}:{cluster.password}@", "")
    for url in (bare_url, bare_url.replace("nats://", f"nats://{cluster.user}:wrong-pw@")):
        with pytest.raises(nats.errors.Error):
            await nats.connect(servers=[url], allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0)
    nc = await natsutil.connect_nats(cluster.url, "with-credentials", timeout_s=CEILING_S)
    await nc.close()


async def test_a_wrong_password_fails_within_the_timeout_and_is_not_logged(cluster):
    """nats-py retries a refused password forever; connect_nats ends at its deadline."""
    from services.errors import C2CError

    wrong = cluster.url.replace(f":{cluster.password}@", ":wrong-pw-77@")
    started = time.monotonic()
    with pytest.raises(C2CError) as caught:
        await natsutil.connect_nats(wrong, "wrong-password", timeout_s=3)
    assert time.monotonic() - started < CEILING_S  # bounded (3 s asked; a hang is the bug)
    assert "wrong-pw-77" not in str(caught.value) and "***@" in str(caught.value)


def test_credentials_of_the_first_url_serve_every_server():
    servers, user, password = natsutil._servers_and_credentials(
        "nats://u:p%40ss@a:4222, nats://b:4223,nats://[::1]:4224")
    assert servers == ["nats://a:4222", "nats://b:4223", "nats://[::1]:4224"]
    assert (user, password) == ("u", "p@ss")


@pytest.mark.parametrize("victim", ["responder", "requester"])
async def test_request_reply_survives_killing_a_clients_server(cluster, victim):
    responder_nc = await natsutil.connect_nats(cluster.url, "responder", timeout_s=CEILING_S)
    requester_nc = await _connect_apart(cluster, "requester", cluster.member_at(responder_nc.connected_url))
    try:
        apart = cluster.member_at(requester_nc.connected_url) != cluster.member_at(responder_nc.connected_url)
        responder = Responder()
        await responder_nc.subscribe(SUBJECT, queue="echo", cb=responder.on_request)
        await responder_nc.flush()
        requester = Requester(requester_nc, kill_after=NUM_REQUESTS // 3)
        stream = asyncio.ensure_future(requester.run())
        await asyncio.wait_for(requester.reached_kill_point.wait(), CEILING_S)
        victim_nc = responder_nc if victim == "responder" else requester_nc
        killed = cluster.member_at(victim_nc.connected_url)
        cluster.kill(killed)
        num_answered_at_kill = len(requester.replies)
        moved_to = await _await_moved(victim_nc, cluster, killed)
        await asyncio.wait_for(stream, CEILING_S)
    finally:
        await requester_nc.close()
        await responder_nc.close()

    assert num_answered_at_kill < NUM_REQUESTS, "the kill came after the stream ended"
    assert victim_nc.stats["reconnects"] >= 1 and moved_to != killed
    assert requester.replies == {n: f"{n}:{n * n}".encode() for n in range(NUM_REQUESTS)}
    assert set(responder.answers) == set(range(NUM_REQUESTS))
    num_repeats = sum(responder.deliveries.values()) - NUM_REQUESTS
    log.info("killed the %s's server after %d/%d answers (clients on %s servers): %d retries, "
             "%d repeated deliveries answered from the record", victim, num_answered_at_kill, NUM_REQUESTS,
             "different" if apart else "the same", requester.num_retries, num_repeats)


class Counted:
    """Subscriber side of the publish stream: which numbers arrived, and when the stream
    came back after the kill."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.expected = 0
        self.caught_up = asyncio.Event()
        self.kill_index: int | None = None
        self.kill_time_s = 0.0
        self.first_after_kill: int | None = None
        self.outage_s = 0.0

    async def on_msg(self, msg) -> None:
        n = int(msg.data)
        self.received.append(n)
        if n >= self.expected:
            self.caught_up.set()
        if self.kill_index is not None and n > self.kill_index and self.first_after_kill is None:
            self.first_after_kill = n
            self.outage_s = time.monotonic() - self.kill_time_s

    @property
    def has_resumed(self) -> bool:
        """Ten batches arrived after the first message past the kill."""
        return self.first_after_kill is not None and self.received[-1] >= self.first_after_kill + 10 * BATCH


async def test_publish_stream_resumes_and_the_gap_is_measured(cluster):
    subscriber_nc = await natsutil.connect_nats(cluster.url, "subscriber", timeout_s=CEILING_S)
    publisher_nc = await _connect_apart(cluster, "publisher", cluster.member_at(subscriber_nc.connected_url))
    counted = Counted()
    try:
        await subscriber_nc.subscribe(SUBJECT, cb=counted.on_msg)
        await subscriber_nc.flush()
        await _await_interest(publisher_nc, counted)
        num_published = await _publish_until_resumed(publisher_nc, subscriber_nc, cluster, counted)
    finally:
        await publisher_nc.close()
        await subscriber_nc.close()

    received = [n for n in counted.received if n >= 0]
    assert received == sorted(set(received)), "a duplicate or reordered message"
    assert subscriber_nc.stats["reconnects"] >= 1
    missing = sorted(set(range(max(received))) - set(received))  # later ones: still in flight
    assert all(counted.kill_index - BATCH < n < counted.first_after_kill for n in missing), \
        "messages lost outside the outage"
    log.info("publish across a killed subscriber server: %d published, %d lost (#%s..#%s), "
             "no message for %.0f ms after the kill", num_published, len(missing),
             missing[0] if missing else "-", missing[-1] if missing else "-", 1000 * counted.outage_s)


async def _await_interest(publisher_nc: nats.NATS, counted: Counted) -> None:
    """Probe (-1) until the subscriber's interest has reached the publisher's server."""
    deadline = time.monotonic() + CEILING_S
    while -1 not in counted.received:
        assert time.monotonic() < deadline, "the subscription never reached the publisher's server"
        await publisher_nc.publish(SUBJECT, b"-1")
        await publisher_nc.flush()
        await asyncio.sleep(0.01)


async def _publish_until_resumed(publisher_nc, subscriber_nc, cluster, counted) -> int:
    """Publish numbered batches, each after the last one arrived (or BATCH_WAIT_S passed:
    a lost batch); kill the subscriber's server after NUM_BEFORE_KILL; go on until the
    stream has resumed. Returns how many were published."""
    n = 0
    deadline = time.monotonic() + CEILING_S
    while not counted.has_resumed:
        assert time.monotonic() < deadline, "the stream did not resume after the kill"
        counted.expected = n + BATCH - 1
        counted.caught_up.clear()
        for _ in range(BATCH):
            await publisher_nc.publish(SUBJECT, str(n).encode())
            n += 1
        try:
            await asyncio.wait_for(counted.caught_up.wait(), BATCH_WAIT_S)
        except TimeoutError:
            pass  # this batch (or its end) is lost: the subscriber's interest is moving
        if counted.kill_index is None and n >= NUM_BEFORE_KILL:
            counted.kill_index, counted.kill_time_s = n - 1, time.monotonic()
            cluster.kill(cluster.member_at(subscriber_nc.connected_url))
    return n
