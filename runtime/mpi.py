"""Ranks as MPI processes: a model computed by the processes of an `mpiexec` run, each holding
ranks_per_process consecutive ranks and mapping only their rank files, so that a host needs the
memory of its share of the model, not of all of it.

Process 0 drives. The Model that load() gives it is an ordinary one whose engine first tells the
other processes every step (one broadcast per forward pass: the token ids), then computes its own
part. The other processes follow those steps until process 0 closes the model, and then
leave the program (load() never returns there). The all-reduces inside a forward pass are the C++
engine's own MPI calls (runtime/src/comm_mpi.cpp), not Python's.

Failures end every process: one that cannot start (a missing or bad rank file, processes that
disagree on the model) makes load() raise on all of them, naming the process, its ranks and the
cause; one that fails or dies later stops the whole run (MPI_Abort, or the launcher's cleanup when
a process is killed). Process 0 checks every step before it sends it: a step it refuses (a bad
request, a full context) raises there and reaches no other process, and the run goes on.
"""
import atexit
import os
import pickle
import signal
import socket
import sys
import threading
import time
import weakref

import numpy as np

from .. import _core
from .. import formats

INSTALL_HINT = "pip install 'qwen3pack[mpi]'"
# The MPICH ABI's handles, which the C++ communicator uses (runtime/src/comm_mpi.cpp).
MPICH_ABI = {"COMM_WORLD": 0x44000000, "FLOAT": 0x4c00040a}


class MpiUnavailable(ImportError):
    """The MPI backend was asked for without mpi4py and an MPI library of the MPICH ABI."""


class MpiStartError(ValueError):
    """A process could not start its share of the model, or the processes disagree; every
    process raises the same error."""


def mpi_module():
    """mpi4py's MPI module (initializing MPI), checked to run on an MPICH-ABI library."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as error:  # no mpi4py, or no MPI library for it
        raise MpiUnavailable(f"the MPI backend needs mpi4py and an MPI library: {INSTALL_HINT} ({error})") from None
    if MPI.COMM_WORLD.handle != MPICH_ABI["COMM_WORLD"] or MPI.FLOAT.handle != MPICH_ABI["FLOAT"]:
        raise MpiUnavailable("the MPI backend runs on an MPI library of the MPICH ABI (the mpich wheel of "
                             f"{INSTALL_HINT}, MPICH, Intel MPI, MVAPICH); mpi4py loaded "
                             f"{MPI.Get_library_version().splitlines()[0]}")
    return MPI


def library_path():
    """The file of the MPI library that mpi4py loaded (the C++ engine looks its functions up there)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith("libmpi.so"):
                return fields[5].strip()
    raise MpiUnavailable("mpi4py is loaded but no libmpi.so is mapped in this process")


_loaded = False  # on process 0, once a model was loaded


def load(directory, threads, max_context, verify_crc, kv_dtype, activations, ranks_per_process, make_model):
    """This process's share of the model in `directory` (see the module's docstring). On process
    0, returns make_model(engine, manifest); on the others, follows process 0 and exits."""
    global _loaded
    if _loaded:  # the followers left when the first model was closed
        raise ValueError("an MPI run loads one model (backend='mpi'): this one was loaded already")
    MPI = mpi_module()
    comm = MPI.COMM_WORLD.Dup()  # the engine's own: its error handler and traffic apart from the caller's
    process, processes = comm.rank, comm.size
    ranks = list(range(process * ranks_per_process, (process + 1) * ranks_per_process))
    where = f"MPI process {process} (ranks {ranks[0]} to {ranks[-1]}, pid {os.getpid()} on {socket.gethostname()})"

    def agree(step):
        """step() on every process; raises MpiStartError on all of them if it failed on any."""
        try:
            result, failure = step(), None
        except Exception as error:  # every process must reach the allgather below, whatever failed
            result, failure = None, f"{where}: {error}"
        failures = [f for f in comm.allgather(failure) if f is not None]
        if failures:
            raise MpiStartError("; ".join(failures))
        return comm.allgather(result)

    manifest = agree(lambda: formats.read_manifest(directory))[process]
    identities = agree(lambda: (manifest["conversion_id"], manifest["layout"]["world_size"], ranks_per_process))
    if len(set(identities)) > 1:
        raise MpiStartError("the processes disagree on the model: " + "; ".join(
            f"process {p} has conversion {cid} of tp {tp} with {rpp} ranks per process"
            for p, (cid, tp, rpp) in enumerate(identities)))
    tp = manifest["layout"]["world_size"]
    from .model import precision, rank_sources  # model imports this module
    kv_dtype, activations = precision(manifest["layout"], kv_dtype, activations)
    if processes * ranks_per_process != tp:
        raise MpiStartError(f"{directory} was converted for tp {tp}, but {processes} MPI processes with "
                            f"{ranks_per_process} ranks per process hold {processes * ranks_per_process}: run P "
                            f"processes (mpiexec -n P) with --ranks-per-process R where P * R = {tp}")

    def start():
        converted = formats.open(directory, ranks=ranks)
        return _core.Engine(converted.model, converted.layout, rank_sources(converted), threads, max_context,
                            verify_crc, kv_dtype, activations == "bf16", mpi_library=library_path(),
                            mpi_comm=comm.handle)

    engine = None

    def start_here():
        nonlocal engine
        engine = start()
        return {"process": process, "ranks": ranks, "pid": os.getpid(), "host": socket.gethostname()}

    places = agree(start_here)
    if process != 0:
        follow(engine, comm, where)
        sys.exit(0)
    # Which pid holds which ranks: a launcher reports a process that died by its pid.
    print("qwen3pack: " + "; ".join(f"MPI process {p['process']} (ranks {p['ranks'][0]} to {p['ranks'][-1]}) is "
                                    f"pid {p['pid']} on {p['host']}" for p in places), file=sys.stderr, flush=True)
    _loaded = True
    driver = DrivingEngine(engine, comm, places)
    atexit.register(_close_at_exit, weakref.ref(driver))  # before mpi4py finalizes MPI (atexit runs in reverse)
    return make_model(driver, manifest)


def _close_at_exit(driver_ref):
    driver = driver_ref()
    if driver is not None:
        driver.close()


class DrivingEngine:
    """Process 0's engine: _core.Engine's interface; a forward pass is checked here, then told to
    the followers, then computed here as there."""

    def __init__(self, engine, comm, processes):
        self._engine = engine
        self._comm = comm
        self.processes = processes
        self._lock = threading.Lock()  # a step's check, broadcast and compute, one step at a time
        self._next_session = 0
        self._dropped = []  # sessions gone here, dropped by the followers with the next step
        for name in ("vocab_size", "max_context", "world_size", "threads", "threads_per_rank", "isa",
                     "first_rank", "local_ranks", "kv_dtype", "activations"):
            setattr(self, name, getattr(engine, name))

    @property
    def closed(self):
        return self._engine.closed

    def _tell(self, *step):
        dropped = []
        while self._dropped:
            dropped.append(self._dropped.pop())
        message = pickle.dumps((dropped, step))
        self._comm.Ibcast(np.array([len(message)], dtype=np.int64), root=0).Wait()  # see next_step
        self._comm.Bcast(message, root=0)

    def new_session(self):
        with self._lock:
            self._next_session += 1
            return DrivingSession(self, self._next_session, self._engine.new_session())

    def forward(self, sessions, ids, all_logits):
        cores = [s._core for s in sessions]
        with self._lock:
            self._engine.check(cores, ids)  # a step refused here is sent to no one
            before = [core.position for core in cores]
            self._tell("forward", [s._id for s in sessions], ids, all_logits)
            try:
                return self._engine.forward(cores, ids, all_logits)
            except (_core.NumericalError, _core.FormatError):
                # Raised after the compute, here alone (the logits and these files are this
                # process's): the followers' sessions advanced, and go back to where these stayed.
                self._tell("rewind", [(s._id, position) for s, position in zip(sessions, before)])
                raise

    def logits_batch(self, ids):
        return self.forward([self.new_session() for _ in ids], ids, [True] * len(ids))

    def close(self):
        with self._lock:
            if self._engine.closed:
                return
            self._tell("close")
            self._engine.close()


class DrivingSession:
    """Process 0's session: _core.Session's interface, each change made here, then told to the
    followers (these steps compute nothing, so a refused one is sent to no one)."""

    def __init__(self, driver, id, core):
        self._driver, self._id, self._core = driver, id, core

    @property
    def position(self):
        return self._core.position

    @property
    def kv_cache_bytes(self):
        return self._core.kv_cache_bytes

    def append(self, ids, all_logits=False):
        return self._driver.forward([self], [ids], [all_logits])[0]

    def fork(self):
        driver = self._driver
        with driver._lock:
            driver._next_session += 1
            copy = DrivingSession(driver, driver._next_session, self._core.fork())
            driver._tell("fork", self._id, copy._id)
            return copy

    def reset(self):
        with self._driver._lock:
            self._core.reset()
            self._driver._tell("reset", self._id)

    def truncate(self, length):
        with self._driver._lock:
            self._core.truncate(length)
            self._driver._tell("truncate", self._id, length)

    def __del__(self):
        self._driver._dropped.append(self._id)


# A follower waiting for the next step spins this long (longer than the gap between two steps of a
# generation, when process 0 samples), then sleeps between polls: MPI's blocking calls spin, and
# an idle server's followers would each keep a core busy.
SPIN_SECONDS = 0.005
MAX_POLL_SECONDS = 0.01


def next_step(comm):
    """(sessions dropped, step): process 0's next message, as DrivingEngine._tell sends it."""
    size = np.zeros(1, dtype=np.int64)
    request = comm.Ibcast(size, root=0)
    started = time.monotonic()
    while not request.Test():
        waited = time.monotonic() - started
        if waited > SPIN_SECONDS:
            time.sleep(min(waited / 10, MAX_POLL_SECONDS))
    message = bytearray(int(size[0]))
    comm.Bcast(message, root=0)
    return pickle.loads(message)


def follow(engine, comm, where):
    """A follower's loop: process 0's steps, in order, until it closes the model. Process 0 sends
    only steps it checked, so any failure here stops every process."""
    sessions = {}
    if threading.current_thread() is threading.main_thread():
        # The launcher passes Ctrl-C and SIGTERM to every process: process 0 finishes its work
        # (a server its requests) and then closes the model, which ends this loop.
        for stop in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop, signal.SIG_IGN)
    try:
        while True:
            dropped, step = next_step(comm)
            for id in dropped:
                sessions.pop(id, None)
            op, args = step[0], step[1:]
            if op == "close":
                engine.close()
                return
            _follow_step(engine, sessions, op, args)
    except BaseException as error:
        print(f"qwen3pack: {where}: {type(error).__name__}: {error}; stopping every process", file=sys.stderr,
              flush=True)
        comm.Abort(1)


def _follow_step(engine, sessions, op, args):
    def session(id):
        if id not in sessions:
            sessions[id] = engine.new_session()
        return sessions[id]

    if op == "forward":
        ids, arrays, all_logits = args
        engine.forward([session(i) for i in ids], arrays, all_logits)
    elif op == "fork":
        source, copy = args
        sessions[copy] = session(source).fork()
    elif op == "reset":
        session(args[0]).reset()
    elif op == "truncate":
        session(args[0]).truncate(args[1])
    elif op == "rewind":
        for id, position in args[0]:
            session(id).truncate(position)
    else:
        raise RuntimeError(f"unknown step {op!r} from process 0")
