"""The serve tests' model: the export tests' (see tests/export/conftest.py)."""

import pytest

from ..export.conftest import session_micro_model


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    return session_micro_model(tmp_path_factory)
