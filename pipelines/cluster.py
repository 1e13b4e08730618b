"""The build's Dask session: started in a background thread while the client plans, closed in order.

An embedded LocalCluster (processes, one thread each) unless an existing scheduler is named. Starting it
takes a while (the workers are fresh interpreters) and planning reads every header, so the two overlap:
the client plans while `DaskSession` starts, and hands header reads to the workers once they are up
(`pipelines.plan.read_headers`).

Shutdown order (`stop_dask`), for an embedded cluster:
1. each worker stops its heartbeat and waits for the one in flight (`stop_heartbeat`). A closing worker
   aborts its pooled comms, and a heartbeat caught in flight then logs "Failed to communicate with
   scheduler during heartbeat ... Stream is closed" with a traceback (dask/distributed#7105). Heartbeats
   leave every 0.5 s and wait for the scheduler's answer; the busier the machine, the longer that wait
   and the likelier a close lands inside it (docs/PERFORMANCE.md "Build shutdown");
2. the client (its futures are released; every task has finished by then);
3. the workers, each given `WORKER_EXIT_GRACE_S` to exit (`close_workers`). A nanny closed by the
   cluster waits 4 s, then kills its worker with "Worker process still alive after 4.0 seconds, killing":
   an idle worker's exit (closing its comms and executor, then interpreter teardown) is quick on an idle
   machine but can pass 4 s on an oversubscribed one. Workers exit faster the less they
   import (the shard writer does not import webdataset, which imports torch: `pipelines.shards`);
4. the cluster (its scheduler).
Workers of an external scheduler are not ours: only the client is closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time

CONNECT_TIMEOUT = "30s"
CLOSE_TIMEOUT_S = 30  # for the client's and the cluster's close
HEARTBEAT_DRAIN_S = 10.0  # longest wait for a worker's heartbeat in flight (its answer is usually ms away)
WORKER_EXIT_GRACE_S = 30.0  # how long a nanny waits for its worker to exit before killing it


def spawn_environ_snapshot() -> dict[str, str | None]:
    """This process's values of the variables a Dask nanny sets in its *own* process before spawning a worker
    (`distributed.nanny.pre-spawn-environ`: OMP_NUM_THREADS=1 and friends). Left in place they reach
    whatever the caller does after the build: torch imported later reads OMP_NUM_THREADS=1 and trains on
    one thread."""
    import dask

    keys = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    return {key: os.environ.get(key) for key in keys}


def restore_environ(snapshot: dict[str, str | None]) -> None:
    for key, value in snapshot.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def start_dask(workers: int | None, scheduler: str | None, scheduler_file: str | None,
               memory_limit: str | None) -> tuple:
    """(client, cluster or None): connect to a named scheduler, else start an embedded LocalCluster."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler, timeout=CONNECT_TIMEOUT, set_as_default=False), None
    if scheduler_file:
        return Client(scheduler_file=scheduler_file, timeout=CONNECT_TIMEOUT, set_as_default=False), None
    # dashboard_address ":0": a free port; the default (8787) warns "Port 8787 is already in use" beside
    # any other Dask process on the machine (its HTTP server starts even without bokeh)
    environ = spawn_environ_snapshot()
    try:
        cluster = LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                               dashboard_address=":0", memory_limit=memory_limit or "auto")
    finally:
        restore_environ(environ)
    try:
        # set_as_default=False: the client is made in a helper thread and closed in another one, so it
        # must not enter the thread's context (a context variable cannot be reset across threads)
        return Client(cluster, set_as_default=False), cluster
    except BaseException:
        cluster.close(timeout=CLOSE_TIMEOUT_S)
        raise


async def stop_heartbeat(dask_worker) -> None:
    """Runs on each worker (`Client.run`) before it is closed: no new heartbeat, and the one in flight, if
    any, answered (the heartbeat is the worker's only pooled request to the scheduler)."""
    dask_worker.periodic_callbacks["heartbeat"].stop()
    in_flight = dask_worker.rpc.occupied
    deadline = time.monotonic() + HEARTBEAT_DRAIN_S
    while in_flight.get(dask_worker.scheduler.address) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


async def close_workers(cluster, grace_s: float) -> None:
    """Close every nanny of a LocalCluster (each stops its worker), all at once, with `grace_s` to exit."""
    await asyncio.gather(*(nanny.close(timeout=grace_s, reason="build-finished")
                           for nanny in list(cluster.workers.values())))


def stop_dask(client, cluster) -> None:
    """Heartbeats, client, workers, cluster (module docstring); an external cluster keeps its workers."""
    try:
        if cluster is not None:
            # on_error="ignore": a worker that died already needs no quieting, and shutdown must go on
            client.run(stop_heartbeat, on_error="ignore")
    finally:
        try:
            client.close(timeout=CLOSE_TIMEOUT_S)
        finally:
            if cluster is not None:
                try:
                    cluster.sync(close_workers, cluster, WORKER_EXIT_GRACE_S)
                finally:
                    cluster.close(timeout=CLOSE_TIMEOUT_S)


class DaskSession:
    """A Dask client started (once, on demand) in a background thread; `client()` waits for it, `close()`
    stops it (once). Nothing runs until `start()` or `client()`: a rerun with nothing to do starts no cluster."""

    def __init__(self, workers: int | None, scheduler: str | None, scheduler_file: str | None,
                 memory_limit: str | None):
        self._args = (workers, scheduler, scheduler_file, memory_limit)
        # a nanny restarting a killed worker sets the spawn variables again: restore them at close too
        self._environ = spawn_environ_snapshot()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dask-session")
        self._started: concurrent.futures.Future | None = None
        self._closed: concurrent.futures.Future | None = None

    def start(self) -> None:
        """Begin connecting (or starting the local cluster) in the background; later calls do nothing."""
        if self._started is None and self._closed is None:
            self._started = self._pool.submit(start_dask, *self._args)

    @property
    def started(self) -> bool:
        return self._started is not None

    def ready(self) -> bool:
        """True once the start has finished (successfully or not): `client()` will not wait."""
        return self._started is not None and self._started.done()

    def client(self):
        """The connected client (starts the session if needed, waits for it; re-raises its error)."""
        self.start()
        if self._started is None:
            raise RuntimeError("the Dask session is closed")
        return self._started.result()[0]

    def has_workers(self) -> bool:
        """Started and at least one worker connected (an external cluster's workers may still be queued)."""
        return self.ready() and bool(self.client().scheduler_info(n_workers=1)["workers"])

    def close(self, wait: bool = True) -> None:
        """Stop the client and the cluster; `wait=False` lets this thread go on (e.g. write the manifests)."""
        if self._closed is None:
            self._closed = self._pool.submit(self._stop)
            self._pool.shutdown(wait=False)
        if wait:
            self._closed.result()

    def _stop(self) -> None:
        if self._started is None:  # never started: nothing to stop
            return
        try:
            client, cluster = self._started.result()
        except BaseException:  # a failed start left nothing running; its error was raised by client()
            return
        try:
            stop_dask(client, cluster)
        finally:
            restore_environ(self._environ)
