"""One writer at a time per registered model, across processes and machines, held in the registry.

Two registrations of one model that overlap -- two retrains, a retrain and ``make repro``, two
machines sharing one tracking server -- would otherwise both miss the version the other is
creating (a duplicate version of the same adapter), or both find no champion and both take the
alias. :func:`model_lock` makes the version lookup, the new version and the gate decision one
step per model.

The lock is the registered model ``_lock.<name>``: creating a registered model is atomic in every
MLflow backend (its name is unique), so exactly one of several creators succeeds; deleting it
releases it. The name is outside the ``ctrlora-`` prefix that the registry's listings search. A
holder that died leaves its lock behind: a waiter removes a lock older than ``stale_after``
seconds (tag ``acquired_at``), so that bound must exceed the longest registration.
"""
from __future__ import annotations

import functools
import os
import random
import socket
import time
import uuid
from contextlib import contextmanager
from typing import Callable, Iterator

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

LOCK_PREFIX = "_lock."
TIMEOUT_ENV = "CTRLORA_REGISTRY_LOCK_TIMEOUT"   # seconds a registration waits (default 1800)
STALE_ENV = "CTRLORA_REGISTRY_LOCK_STALE"       # seconds after which a lock is abandoned (default 3600)


class RegistryLockTimeout(RuntimeError):
    """The model's lock stayed held for longer than the wait allowed."""


def _exists_error(exc: MlflowException) -> bool:
    """The create lost to another holder. MLflow's SQL store answers a name clash by looking the
    existing model up to word its error; when that holder releases the lock in between, the lookup
    says RESOURCE_DOES_NOT_EXIST instead — the same contention, so it is retried too."""
    return exc.error_code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST")


def _holder(client: MlflowClient, lock: str) -> tuple[str, float] | None:
    """(holder, acquired_at) of a held lock; None when it is free."""
    try:
        tags = client.get_registered_model(lock).tags
    except MlflowException:
        return None
    try:
        since = float(tags.get("acquired_at", "nan"))
    except ValueError:
        since = float("nan")
    return tags.get("holder", "?"), since


@contextmanager
def model_lock(name: str, client: MlflowClient | None = None, timeout: float | None = None,
               stale_after: float | None = None, poll: float = 0.2) -> Iterator[str]:
    """Hold the lock of registered model ``name`` for the ``with`` body; yields the holder id."""
    client = client or MlflowClient()
    timeout = float(timeout if timeout is not None else os.environ.get(TIMEOUT_ENV, 1800))
    stale_after = float(stale_after if stale_after is not None else os.environ.get(STALE_ENV, 3600))
    lock = f"{LOCK_PREFIX}{name}"
    me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_registered_model(
                lock, tags={"holder": me, "acquired_at": repr(time.time())},
                description=f"registration lock of {name} (removed when the registration ends)")
            break
        except MlflowException as exc:
            if not _exists_error(exc):
                raise
        held = _holder(client, lock)
        if held is not None and time.time() - held[1] > stale_after:
            try:  # its holder died; the next creator wins
                client.delete_registered_model(lock)
            except MlflowException:
                pass
            continue
        if time.monotonic() > deadline:
            who = f"held by {held[0]} since {time.ctime(held[1])}" if held else "held"
            raise RegistryLockTimeout(f"registered model {name}: lock {lock} {who}; gave up after "
                                      f"{timeout:g} s (remove it if its holder is gone)")
        time.sleep(poll * (1 + random.random()))
    try:
        yield me
    finally:
        try:
            client.delete_registered_model(lock)
        except MlflowException:
            pass  # removed as stale by a waiter: nothing left to release


def locked_by_model(name_of: Callable[[str], str]):
    """Decorator: the call runs under :func:`model_lock` of ``name_of(first argument)``."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(first, *args, **kwargs):
            with model_lock(name_of(first)):
                return fn(first, *args, **kwargs)
        return inner
    return wrap
