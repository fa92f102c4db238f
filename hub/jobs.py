"""Background jobs operators start over the API, and their status.

Jobs live in this process: a restart forgets finished jobs (their effect is stored) and
ends a running one, which can simply be started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from typing_extensions import TypedDict  # pydantic needs this TypedDict on Python 3.11

from hub.config import Settings
from hub.ingest import Ingestor
from hub.push import PushBus
from hub.rules import load_rules
from hub.scoring import RiskEngine, RiskParams, ScoringService, recalculate
from hub.store import Store

log = logging.getLogger(__name__)
JobState = Literal["running", "succeeded", "failed"]
_KEEP_FINISHED = 100  # finished jobs remembered for GET


class JobView(TypedDict):
    id: str
    kind: str
    state: JobState
    progress: int
    started_at: float
    finished_at: float | None
    result: str | None
    error: str | None


@dataclass(slots=True)
class Job:
    kind: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: JobState = "running"
    progress: int = 0  # units of work done (events replayed, for a recalculation)
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    result: str | None = None
    error: str | None = None

    def view(self) -> JobView:
        return JobView(
            id=self.id, kind=self.kind, state=self.state, progress=self.progress, started_at=self.started_at,
            finished_at=self.finished_at, result=self.result, error=self.error,
        )  # fmt: skip


class Jobs:
    """Run jobs one of a kind at a time and keep their status."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def running(self, kind: str) -> Job | None:
        return next((job for job in self._jobs.values() if job.kind == kind and job.state == "running"), None)

    def start(self, kind: str, work: Callable[[Job], Awaitable[str]]) -> Job:
        """Start `work` as a job of `kind`; it reports progress on the job and returns a summary."""
        job = Job(kind)
        self._jobs[job.id] = job
        finished = [j.id for j in self._jobs.values() if j.state != "running"]
        for old in finished[: max(0, len(finished) - _KEEP_FINISHED)]:
            del self._jobs[old]
        task = asyncio.create_task(self._run(job, work), name=f"job-{kind}-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def close(self) -> None:
        """Cancel jobs under way (shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, job: Job, work: Callable[[Job], Awaitable[str]]) -> None:
        try:
            job.result = await work(job)
            job.state = "succeeded"
        except asyncio.CancelledError:
            job.state, job.error = "failed", "the hub stopped before the job finished"
            raise
        except Exception as exc:
            log.exception("job %s (%s) failed", job.id, job.kind)
            job.state, job.error = "failed", str(exc) or type(exc).__name__
        finally:
            job.finished_at = time.time()


async def recalculate_live(
    job: Job, *, settings: Settings, store: Store, ingestor: Ingestor, scoring: ScoringService, bus: PushBus
) -> str:
    """Replay every stored event through the rules as they are on disk now, then score on with them.

    The rule files are read again first (a bad file fails the job and changes nothing). Ingest
    pauses meanwhile, answering `overloaded` so agents keep their events and resend: the replay
    then sees every stored event exactly once, and live scoring continues from its result.
    """
    engine = RiskEngine(load_rules(settings.rule_files), RiskParams.from_settings(settings))
    # Everything stored so far is scored and persisted first, and no pass of the old rules may
    # store scores over the replay's.
    async with ingestor.paused("scores are being recalculated"), scoring.held():

        def progress(count: int) -> None:
            job.progress = count

        count = await recalculate(store, engine, progress=progress)
        scoring.engine = engine
    bus.resync_all()  # every score may have changed: dashboards reload
    return f"recalculated scores from {count} stored events with {len(engine.rules.rules)} rules"
