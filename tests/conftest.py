from pathlib import Path

import pytest

from qwen3pack.testing import make_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Makes (once per session) small checkpoints keyed by their arguments."""
    made = {}

    def make(**kwargs):
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in made:
            made[key] = make_checkpoint(tmp_path_factory.mktemp("checkpoint"), **kwargs)
        return made[key]

    return make


@pytest.fixture
def unprivileged(tmp_path_factory):
    """(command prefix, open folder) to run a command as an unprivileged user: as root, which reads
    and writes anything, permission errors are tested through setpriv as nobody, in a folder that
    nobody may use (pytest's own tmp folders are closed to other users)."""
    import os
    import shutil
    import tempfile
    if os.geteuid() != 0:
        yield [], tmp_path_factory.mktemp("open")
        return
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv to drop privileges")
    folder = tempfile.mkdtemp(prefix="qwen3pack-open-")
    os.chmod(folder, 0o777)
    yield [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"], Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def interruptible():
    """SIGINT raises KeyboardInterrupt in this process during the test, as in a terminal, whatever
    the suite inherited (a suite run in the background, as CI may run it, has SIGINT ignored)."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)



@pytest.fixture(scope="session")
def tool_caller(tmp_path_factory):
    """A converted model that answers WEATHER_QUESTION with a call of WEATHER_TOOL (testing.make_tool_caller)."""
    from qwen3pack.testing import make_tool_caller
    return make_tool_caller(tmp_path_factory.mktemp("tool-caller"))
