"""The shared Triton test helpers keep `-m "not triton"` free of servers."""

from __future__ import annotations

import pytest

from treeops.workspace import Workspace
from triton_fixtures import triton_server


def test_a_server_for_a_test_without_the_triton_marker_is_refused(tmp_path):
    with pytest.raises(AssertionError, match=r"test_triton_fixtures.py::.* starts a tritonserver: mark it"):
        triton_server(Workspace(tmp_path))
