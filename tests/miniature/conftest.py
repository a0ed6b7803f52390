"""A reduced miniature world, written once per session (a few seconds)."""

import pytest

from fastsamclip.miniature import write_world

TRAIN, HELDOUT = 16, 16


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mini-world"))
    meta = write_world(root, TRAIN, HELDOUT, shard_size=20)
    return {"root": root, "meta": meta}
