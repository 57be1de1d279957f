"""The node supervisor: one lane's parts wired together, and the loop that claims and runs.

Owns the lane's life (start every client, claim until told to stop, hand back, close within
bounded time) and the decisions between parts: when to leave the group while busy, when a
claim that keeps failing is set aside, when to revive the engine. The parts each own one
thing: claims.py (membership and claims), admission.py, job_run.py (one attempt, returning
its Outcome), handback.py (shared with the reaper), announcer.py (NodeInfo and counters),
kafka.py (the client seam). A node that dies after its claim is covered by its lease: a
reaper (reaper.py) hands the job back. Its loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from i2v_fleet.pipeline.layout import ParallelLayout
from i2v_fleet.pipeline.request import AttentionCacheSpec
from i2v_fleet.schemas import JobRequest, Layout, NodeState, RecordRef

from .admission import Admission
from .announcer import Announcer, NodeFacts, Stats
from .broker import BrokerWatch
from .claims import Claims
from .control import ControlWatcher, PeerWatcher
from .engine import EngineMisconfigured
from .engine.seam import Engine
from .events import Emitter
from .failpoints import Failpoints
from .fetch import FetchPolicy
from .job_run import JobRunner
from .kafka import AioKafkaClients, KafkaClients, Producer
from .metrics import Metrics
from .ops import start as start_ops
from .ops import url_of
from .outcome import Outcome
from .reaper import Reaper
from .redelivery import Redelivery
from .settings import WorkerSettings
from .storage import ResultStore

log = logging.getLogger(__name__)


class Supervisor:
    """One lane of a node: one consumer-group member, one reaper and one persistent engine."""

    retry_pause_s = 5.0
    """Pause before claiming again after a job could not reach its final event."""
    idle_for_s = 1.0
    """A peer counts as idle once it has been `ready` this long (not between two claims)."""
    claim_tries = 5
    """Times one record may fail to be claimed for broker trouble before it is set aside."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine,
        store: ResultStore,
        policy: FetchPolicy,
        layout: ParallelLayout | None = None,
        *,
        clients: KafkaClients | None = None,
        serve_ops: bool = True,
    ) -> None:
        self.settings = settings
        self.parallel = layout or ParallelLayout(t5_cpu=settings.t5_cpu)
        self.engine = engine
        self.store = store
        self.policy = policy
        self.topics = settings.topics
        self.clients: KafkaClients = clients or AioKafkaClients(settings.kafka_kwargs())
        self.serve_ops = serve_ops
        self.stats = Stats()
        self.metrics = Metrics()
        self.failpoints = Failpoints(settings.i2v_failpoints)
        self.ready = asyncio.Event()
        self.ops_url: str | None = None
        self.broker: BrokerWatch | None = None
        """Whether the broker answers (on /readyz), once the producer runs."""
        # The parts, built by _start once the producer runs (None before: /readyz says so).
        self.emitter: Emitter | None = None
        self.control: ControlWatcher | None = None
        self.peers: PeerWatcher | None = None
        self.reaper: Reaper | None = None
        self.claims: Claims | None = None
        self.announcer: Announcer | None = None
        self._producer: Producer | None = None
        self._ops: Any = None
        self._stopping = asyncio.Event()
        self._stop_asked = float("inf")
        self._stop_deadline = float("inf")
        self._job_task: asyncio.Task[Outcome] | None = None

    def claiming(self) -> list[int]:
        """The request partitions this node may claim from now (none while it is out)."""
        return self.claims.partitions() if self.claims is not None else []

    def layout(self) -> Layout:
        """The layout this lane's engine runs."""
        return Layout.model_validate({"lanes": self.settings.lanes, **self.parallel.as_fields()})

    def stop(self) -> None:
        """Stop claiming and leave the group; the running job gets SHUTDOWN_GRACE to finish,
        then stops at its next step and is handed back to the queue."""
        if not self._stopping.is_set():
            self._stop_asked = time.monotonic()
            self._stop_deadline = self._stop_asked + self.settings.shutdown_grace
            self._stopping.set()
            if self.announcer is not None:
                self.announcer.poke()

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until `stop()`, then hand back, close every client and return: within
        SHUTDOWN_GRACE + SHUTDOWN_HAND_BACK_S, and within a few seconds of the grace while
        the broker is lost (the running job is then left to its lease, which a reaper on
        a node that still reaches the broker will hand back)."""
        main = asyncio.create_task(self._main(), name=f"i2v-node-{self.settings.node_id}")
        limit = asyncio.create_task(self._stop_limit(), name="i2v-stop-limit")
        try:
            await asyncio.wait({main, limit}, return_when=asyncio.FIRST_COMPLETED)
            if not main.done():
                log.warning(
                    "shutdown: handing back took too long (kafka broker %s): stopping now; a "
                    "running job is left to its lease",
                    "reachable" if self.broker is None or self.broker.reachable else "lost",
                )
                for task in (main, self._job_task):
                    if task is not None:
                        task.cancel()
                await asyncio.wait({main}, timeout=2.0)
        finally:
            limit.cancel()
            await self._close()
        if main.done() and not main.cancelled() and main.exception() is not None:
            raise main.exception()  # type: ignore[misc]

    async def _main(self) -> None:
        """Start the parts, the engine and the reaper, then claim until told to stop."""
        claims = await self._start()
        self.ready.set()
        log.info("node %s ready, claiming from %s", self.settings.node_id, self.topics.requests)
        while not self._stopping.is_set():
            if not self.engine.alive:
                await self._revive_engine(claims)
                continue
            fetched = await claims.fetch()
            if fetched is None:
                continue
            if self._stopping.is_set():
                claims.rewind(fetched[0])
                continue
            await self._serve(claims, *fetched)

    async def _start(self) -> Claims:
        s = self.settings
        if self.serve_ops:
            self._ops = await start_ops(self, s.server_host, s.server_port)
            self.ops_url = url_of(self._ops, s.server_host)
        self._producer = producer = self.clients.producer(
            acks="all", max_request_size=2 * 1024 * 1024
        )
        await producer.start()
        self.broker = BrokerWatch(producer.metadata, s.broker_check_s, name=s.node_id)
        self.broker.start()
        self.emitter = Emitter(producer, self.topics, s.node_id, s.progress_interval_s)
        self.control = ControlWatcher(self.clients, self.topics.control)
        self.peers = PeerWatcher(self.clients, self.topics.nodes, s.node_id)
        self.reaper = Reaper(s, self.clients, self.emitter, self.metrics)
        self.admission = Admission(
            self.emitter,
            self.control,
            self.store,
            self.metrics,
            lease_s=s.lease_s,
            distilled=s.distilled,
        )
        self.redelivery = Redelivery(self.admission, self.claim_tries, self.retry_pause_s)
        self.runner = JobRunner(
            settings=s,
            engine=self.engine,
            store=self.store,
            policy=self.policy,
            emitter=self.emitter,
            cancels=self.control,
            metrics=self.metrics,
            failpoints=self.failpoints,
            stats=self.stats,
            broker=self.broker,
            stop_deadline=lambda: self._stop_deadline,
            engine_lost=self.ready.clear,
            node_cache=AttentionCacheSpec() if s.use_attention_cache else None,
        )
        engine = self.engine
        facts = NodeFacts(
            node_id=s.node_id,
            layout=self.layout,
            device=lambda: engine.device,
            attention_backend=lambda: engine.ready.attention_backend if engine.ready else None,
            ops_url=lambda: self.ops_url,
            distilled=s.distilled,
        )
        self.announcer = Announcer(self.emitter, facts, self.stats, s.node_info_interval_s)
        self.announcer.start(self._state)
        await self.control.start()
        await self.peers.start()
        await self.store.ensure_bucket()
        await self.engine.start()
        await self.reaper.start()
        consumer = self.clients.consumer(**s.group_member(s.workers_group, "earliest"))
        self.claims = Claims(consumer, self.topics.requests, on_left=self.metrics.group_leaves.inc)
        await consumer.start()
        return self.claims

    def _state(self) -> NodeState:
        if self.stats.current is not None:
            return NodeState.BUSY
        if self._stopping.is_set():
            return NodeState.DRAINING
        return NodeState.READY if self.ready.is_set() else NodeState.STARTING

    async def _stop_limit(self) -> None:
        """Return when a stopping node has had long enough to hand its job back."""
        await self._stopping.wait()
        while True:
            lost = self.broker is not None and not self.broker.reachable
            margin = 3.0 if lost else self.settings.shutdown_hand_back_s
            # Without a job there is nothing to wait for: only the clients to close.
            start = self._stop_deadline if self.stats.current is not None else self._stop_asked
            if time.monotonic() >= start + margin:
                return
            await asyncio.sleep(0.2)

    async def _close(self) -> None:
        """Close everything this lane started, each part bounded in time, all at once: a lost
        broker must not hold the node (Kafka clients wait for it when closing)."""
        self.ready.clear()
        if self.announcer is not None:
            self.announcer.cancel()
        lost = self.broker is not None and not self.broker.reachable
        parts: dict[str, Any] = {"engine": self.engine.close(timeout_s=5.0 if lost else 10.0)}
        if self.claims is not None:
            parts["claims consumer"] = self.claims.consumer.stop()  # leaves the group at once
        for name, client in (("reaper", self.reaper), ("peers", self.peers)):
            if client is not None:
                parts[name] = client.stop()
        if self.control is not None:
            parts["cancel reader"] = self.control.stop()
        await _bounded(parts, 7.0 if lost else 20.0)
        if self.announcer is not None and not lost:
            await _bounded({"node info": self.announcer.stopped()}, 2.0)
        last: dict[str, Any] = {}
        if self._producer is not None:
            last["producer"] = self._producer.stop()
        if self.broker is not None:
            last["broker watch"] = self.broker.stop()
        if self._ops is not None:
            last["ops server"] = self._ops.cleanup()
        await _bounded(last, 2.0 if lost else 10.0)

    async def _serve(self, claims: Claims, record: Any, waiting: bool) -> None:
        """Claim one record (its first event acked, then commit), run its job outside the
        group if records wait behind it, and come back ready to claim again."""
        self.failpoints.hit("before_claim")
        try:
            admitted = await self.admission.admit(record)
        except Exception as exc:
            outcome = await self.redelivery.failed(record, exc)
            if outcome is None:  # leave it uncommitted: fetched again after a pause
                claims.rewind(record)
                await self._pause(self.retry_pause_s)
                return
            admitted = outcome
        self.redelivery.claimed()
        if isinstance(admitted, JobRequest):
            self.failpoints.hit("after_started")
        if not await claims.commit(record) and self.broker is not None:
            self.broker.suspect()
        if not isinstance(admitted, JobRequest):  # it ended at claim
            self._ended(admitted)
            claims.resume()
            return
        self.failpoints.hit("after_commit")
        ref = RecordRef(topic=record.topic, partition=record.partition, offset=record.offset)
        self.stats.current = admitted
        task = asyncio.create_task(self.runner.run(admitted, ref), name=f"job-{admitted.job_id}")
        self._job_task = task
        self._poke()  # busy: peers stop counting on this node
        await claims.hold(task, self._leave_policy(claims, waiting))
        try:
            self._ended(await task)
        except Exception:
            # Its final event could not be written: the lease runs out and a reaper hands
            # the job back. Pause before claiming more from a broker in that state.
            log.exception(
                "job %s ended without a final event; its lease will expire", admitted.job_id
            )
            await self._pause(self.retry_pause_s)
        claims.resume()
        self._poke()  # idle again: busy peers may hand their waiting records on

    def _leave_policy(self, claims: Claims, waiting: bool) -> Any:
        """When a busy node leaves the group (LEAVE_GROUP_WHILE_BUSY): `always`; `never`
        (unless stopping); `auto` only when records wait behind the job and another node
        says it is idle: each leave and rejoin is a rebalance that stalls every member's
        fetching, so when nobody could take the records, staying costs nothing."""
        policy = self.settings.leave_group_while_busy
        first = True

        async def leave_now() -> bool:
            nonlocal first
            if self._stopping.is_set() or policy == "always":
                why = "shutting down" if self._stopping.is_set() else "LEAVE_GROUP_WHILE_BUSY"
            elif policy != "auto":
                return False
            elif first:
                first = False
                if not (waiting and self._idle_peer()):
                    return False
                why = "records wait behind the job"
            elif self._idle_peer() and await claims.records_waiting():
                why = "records wait behind the job"
            else:
                return False
            log.info("leaving %s while busy: %s", self.topics.requests, why)
            return True

        return leave_now

    async def _pause(self, seconds: float) -> None:
        """Sleep, but no longer than until the node is told to stop."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _idle_peer(self) -> bool:
        """Another node said lately that it is idle (NodeInfo `ready` on i2v.nodes)."""
        if self.peers is None:
            return False
        return bool(
            self.peers.idle_peers(
                max_age_s=3 * self.settings.node_info_interval_s, idle_for_s=self.idle_for_s
            )
        )

    async def _revive_engine(self, claims: Claims) -> None:
        """Out of the group until the engine is back: a node without one must not claim."""
        self.ready.clear()
        claims.leave()
        pause = 5.0
        while not self._stopping.is_set():
            try:
                await self.engine.restart()
            except EngineMisconfigured:
                raise  # the settings changed under it, or never worked: stop the node
            except Exception as exc:
                log.error("engine restart failed (%s); trying again in %.0f s", exc, pause)
                await self._pause(pause)
                pause = min(pause * 2, 120.0)
                continue
            self.metrics.engine_restarts.inc()
            self.ready.set()
            log.info("engine back; claiming from %s again", self.topics.requests)
            return

    def _ended(self, outcome: Outcome) -> None:
        self.stats.count(outcome)
        self.metrics.ended(outcome.ending.value, outcome.code)

    def _poke(self) -> None:
        if self.announcer is not None:
            self.announcer.poke()


async def _bounded(parts: dict[str, Any], timeout_s: float) -> None:
    """Await `parts` (name -> awaitable) together for at most `timeout_s`; what fails is
    logged, what is still running then is cancelled and not waited for."""
    tasks = {asyncio.ensure_future(aw): name for name, aw in parts.items()}
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.warning("closing the %s failed: %s", tasks[task], task.exception())
    for task in pending:
        log.warning("closing the %s took over %.0f s; left behind", tasks[task], timeout_s)
        task.cancel()
