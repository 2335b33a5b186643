"""Worker profiles: registered once, named in dispatches, kept in the store."""

from __future__ import annotations

import anyio.to_thread

from ..config import Settings
from ..errors import InvalidRequestError, UnknownWorkerError, listing, shown
from ..models import Worker, WorkerSpec
from ..security import confine
from ..store import RunStore

# Worker fields that name or locate something; a credential in one is refused, never redacted.
IDENTITY_FIELDS = (
    ("name", "name"),
    ("sdk_model", "sdkModel"),
    ("cli_model", "cliModel"),
    ("working_directory", "workingDirectory"),
)


class WorkerRegistry:
    def __init__(self, settings: Settings, store: RunStore) -> None:
        self.settings = settings
        self.store = store

    async def register(self, spec: WorkerSpec) -> Worker:
        worker = Worker(**spec.model_dump())
        # A name, model or directory is used to find or run something: a redacted one would not be
        # what the caller meant (and two would collide), so one holding a credential is refused.
        for attr, wire in IDENTITY_FIELDS:
            value = getattr(worker, attr)
            if value is not None and self.settings.redact.finds(value):
                raise InvalidRequestError(
                    f"{wire} holds a credential (a value of the server's key variables, or a key's shape); "
                    f"it is not repeated here. Credentials belong in the environment: choose another {wire}"
                )
        if worker.working_directory is not None:
            worker.working_directory = str(confine(worker.working_directory, self.settings.workspace_roots))
        self.settings.redact.scrub(worker)  # free text (instructions, and any field added later)
        await anyio.to_thread.run_sync(self.store.add_worker, worker)
        return worker

    async def list(self) -> list[Worker]:
        # Every dispatch asks: answered from memory when nothing changed on disk, which spares the
        # dispatch a trip to a worker thread; off the loop otherwise.
        current = self.store.workers_if_current()
        if current is not None:
            return current
        return await anyio.to_thread.run_sync(self.store.list_workers)

    async def remove(self, name: str) -> Worker:
        removed = await anyio.to_thread.run_sync(self.store.remove_worker, name)
        if removed is None:
            raise await self.unknown(name)
        return removed

    async def unknown(self, name: str) -> UnknownWorkerError:
        known = listing(sorted(w.name for w in await self.list()), empty="none registered")
        return UnknownWorkerError(f"unknown worker {shown(name)}; registered workers: {known}")
