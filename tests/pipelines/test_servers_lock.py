"""The registry lock (pipelines/registry/lock.py) on a real sqlite MLflow store: held while the
body runs and released after, a live holder makes a waiter give up with its name, an abandoned
lock is taken over. Two processes racing through a tracking server: test_servers.py."""
from __future__ import annotations

import time

import pytest

pytest.importorskip("mlflow")


@pytest.fixture
def client(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return MlflowClient()


def _names(client) -> list[str]:
    return [m.name for m in client.search_registered_models()]


def test_lock_is_held_released_waited_for_and_taken_over_when_abandoned(client):
    from pipelines.registry.lock import LOCK_PREFIX, RegistryLockTimeout, model_lock

    with model_lock("ctrlora-x", client) as me:
        assert _names(client) == [f"{LOCK_PREFIX}ctrlora-x"]
        with pytest.raises(RegistryLockTimeout, match=f"held by {me}"):
            with model_lock("ctrlora-x", client, timeout=0.5):
                pass
        with model_lock("ctrlora-y", client):  # another model is not blocked
            pass
    assert _names(client) == []

    client.create_registered_model(f"{LOCK_PREFIX}ctrlora-x", tags={
        "holder": "gone:1", "acquired_at": repr(time.time() - 7200)})
    with model_lock("ctrlora-x", client, timeout=5, stale_after=3600) as me:
        assert client.get_registered_model(f"{LOCK_PREFIX}ctrlora-x").tags["holder"] == me
    assert _names(client) == []
