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
