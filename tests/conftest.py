import os
import sys
import time

# The Triton interpreter must be chosen before triton is first imported; on a machine without a
# GPU it is the only way to run the kernels.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

# torch.compile's on-disk caches (Inductor's FX graph cache, AOTAutograd's cache) do not key on a custom operator's
# Python code: an entry written before a change to our operators can be loaded after it (seen: a backward that
# received the old saved tensors). Each test session compiles into its own fresh directory, as a fresh CI
# machine does.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpt1-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


_LINEAR = torch.nn.functional.linear


@pytest.fixture(autouse=True)
def _linear_left_alone():
    """A DeepSpeed ZeRO-3 engine built in the test process replaces torch.nn.functional.linear for the whole process
    (zero3_linear_wrap, which rounds differently); left in place it moves the eager references of the later tests in
    the same worker (seen: a checkpoint test's loss off by 2e-5). A test that builds one must put it back
    (monkeypatch); this names the one that did not, and restores it."""
    yield
    if torch.nn.functional.linear is not _LINEAR:
        leaked = torch.nn.functional.linear
        torch.nn.functional.linear = _LINEAR
        pytest.fail(f"the test left torch.nn.functional.linear replaced by {leaked!r}")


def pytest_runtest_logreport(report):
    """With GPT1_TEST_FAILURES=<file>, each failure's report is appended to that file as it happens: a GPU session
    whose time box interrupts pytest (bench/gpu_session.sh) keeps the failures seen so far, which pytest itself
    prints only at the end."""
    path = os.environ.get("GPT1_TEST_FAILURES")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"FAILED {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n\n")


def pytest_collection_finish(session):
    """Where the collected tests start DeepSpeed on a CPU (a test file that names it), build its shared-memory
    communication op here, once, before any test runs. Its JIT build holds a lock file for as long as it takes
    (about a minute on a fresh 2-core machine); a test's subprocess killed by its time box in that minute (the
    GPU-session smoke stages have 40 s ones) leaves the file behind, and every later DeepSpeed start then waits on it
    forever (seen: a suite's profile_step runs each hanging until their 600 s timeout)."""
    if DEVICE != "cpu":
        return
    files = {str(item.path) for item in session.items}
    if any("deepspeed" in open(f).read().lower() for f in files):
        from deepspeed.comm.torch import build_shm_op

        _clear_stale_build_lock("deepspeed_shm_comm")
        build_shm_op()


def _clear_stale_build_lock(name, max_age_s=600):
    """Remove torch's JIT-build lock file of extension `name` if it is older than any build takes: a build killed
    midway (a pytest run stopped in its first minute) leaves it, and every later build of the op waits on it
    forever."""
    from torch.utils import cpp_extension

    lock = os.path.join(cpp_extension._get_build_directory(name, verbose=False), "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > max_age_s:
        print(f"conftest: removing the stale build lock {lock}", file=sys.stderr)
        os.remove(lock)
