import sys

from rankwise.core.memory import release_free_memory


def test_release_free_memory_runs_where_glibc_allows_and_is_a_no_op_elsewhere():
    ran = release_free_memory()
    assert isinstance(ran, bool)
    if not sys.platform.startswith("linux"):
        assert ran is False
    assert release_free_memory() == ran  # idempotent, cached lookup
