"""The teacher-cache rehearsal's cheap parts: the paper-size index it measures is one a reader
opens, and sizes that are not whole shards are refused."""

import pytest

from fastsamclip.bench import bench_cache
from fastsamclip.train import TeacherCache


def test_the_paper_size_index_opens_and_counts_its_entries(tmp_path):
    bench_cache.write_paper_index(str(tmp_path))
    cache = TeacherCache(str(tmp_path))
    assert cache.count("clip") == 40_600_000 and cache.count("sam") == 630_000
    assert len(cache) == 3 * 40_600_000 + 630_000
    assert cache.clip("zz/none", 0) is None  # past every piece: nothing opened


@pytest.mark.parametrize("args", [["--images", "1500"], ["--images", "2000", "--entries", "15000"],
                                  ["--images", "2000", "--entries", "30000"], ["--readers-only"]])
def test_sizes_that_are_not_whole_shards_are_refused(args):
    with pytest.raises(SystemExit):
        bench_cache.main(args)
