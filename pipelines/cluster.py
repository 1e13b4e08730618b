"""The build's Dask session: started in a background thread while the client plans, closed in order.

An embedded LocalCluster (processes, one thread each) unless an existing scheduler is named. Starting it
takes ~1 s (the workers are fresh interpreters); planning reads every header, so the two overlap: the
client plans while `DaskSession` starts, and hands header reads to the workers once they are up
(`pipelines.plan.read_headers`).

Shutdown order: the client first (its futures are released; every task has finished by then), then the
cluster, whose nannies give each idle worker 4 s to exit. Workers exit in well under a second as long
as nothing heavy is imported in them: torch (imported by `webdataset`) made an idle worker's exit take
~2 s, and over 4 s on a loaded machine, so the nanny killed it with "Worker process still alive after
4.0 seconds, killing". The shard writer therefore does not import webdataset (`pipelines.shards`).
"""

from __future__ import annotations

import concurrent.futures
import os

CONNECT_TIMEOUT = "30s"
CLOSE_TIMEOUT_S = 30  # for the client's and the cluster's close; each nanny still gives its worker 4 s


def spawn_environ_snapshot() -> dict[str, str | None]:
    """This process's values of the variables a Dask nanny sets in its *own* process before spawning a worker
    (`distributed.nanny.pre-spawn-environ`: OMP_NUM_THREADS=1 and friends). Left in place they reach
    whatever the caller does after the build: torch imported later reads OMP_NUM_THREADS=1 and trains on
    one thread (the demo's pretraining ran at half speed)."""
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


def stop_dask(client, cluster) -> None:
    """Client before cluster: the cluster's workers are idle and unreferenced when they are told to exit."""
    try:
        client.close(timeout=CLOSE_TIMEOUT_S)
    finally:
        if cluster is not None:
            cluster.close(timeout=CLOSE_TIMEOUT_S)


class DaskSession:
    """A Dask client started in a background thread; `client()` waits for it, `close()` stops it (once)."""

    def __init__(self, workers: int | None, scheduler: str | None, scheduler_file: str | None,
                 memory_limit: str | None):
        # a nanny restarting a killed worker sets the spawn variables again: restore them at close too
        self._environ = spawn_environ_snapshot()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dask-session")
        self._started = self._pool.submit(start_dask, workers, scheduler, scheduler_file, memory_limit)
        self._closed: concurrent.futures.Future | None = None

    def ready(self) -> bool:
        """True once the start has finished (successfully or not): `client()` will not wait."""
        return self._started.done()

    def client(self):
        """The connected client (waits for the start; re-raises its error)."""
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
        try:
            client, cluster = self._started.result()
        except BaseException:  # a failed start left nothing running; its error was raised by client()
            return
        try:
            stop_dask(client, cluster)
        finally:
            restore_environ(self._environ)
