"""The README's test command builds the C++ extension; make its absence a failure there, not a
quiet fallback (the native-vs-twin comparisons would otherwise all skip)."""
import os

import pytest

from gcomp import ops


def test_extension_loaded_when_required():
    if os.environ.get("GCOMP_REQUIRE_NATIVE", "0") != "1":
        pytest.skip("GCOMP_REQUIRE_NATIVE is not set: the pure-torch path is allowed here")
    if not ops.native_enabled():
        pytest.skip("GCOMP_NATIVE=0 forces the pure-torch path")
    assert ops.native_available(), "gcomp._C was not built or did not load (see launch/setup_env.sh)"
