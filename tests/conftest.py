import pipelines  # noqa: F401  (tool defaults: telemetry off, stores inside the repo) before anything else
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is far faster than several on shared cores (the thread
    pool's spinning dominates at these sizes); the previous count is restored afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
