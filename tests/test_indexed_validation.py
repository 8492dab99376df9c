"""A shard whose .idx was corrupted with its header intact (a sizes or pointers entry changed) is
refused where it is opened — by pretraining's dataset, merge_datasets and every reader — with one
line naming the file and the sequence, instead of training on the wrong tokens."""
import shutil
import struct

import numpy as np
import pytest

from megagpt.data.indexed import HEADER_SIZE, IndexedDataset
from megagpt.errors import MegaGPTError


@pytest.mark.parametrize("field", ["sizes", "pointers"])
def test_corrupt_index_entry_is_refused(tmp_path, shakespeare_prefix, field):
    good = IndexedDataset(shakespeare_prefix)
    n = len(good)
    for ext in (".bin", ".idx"):
        shutil.copyfile(shakespeare_prefix + ext, tmp_path / f"bad{ext}")
    idx = tmp_path / "bad.idx"
    raw = bytearray(idx.read_bytes())
    i = n // 2
    if field == "sizes":                     # one size +1 and the next -1: total bytes unchanged
        off = HEADER_SIZE + 4 * i
        a, b = struct.unpack_from("<ii", raw, off)
        struct.pack_into("<ii", raw, off, a + 1, b - 1)
    else:
        off = HEADER_SIZE + 4 * n + 8 * i
        struct.pack_into("<q", raw, off, struct.unpack_from("<q", raw, off)[0] + 2)
    idx.write_bytes(bytes(raw))
    with pytest.raises(MegaGPTError, match=rf"bad.idx: sequence {i if field == 'pointers' else i + 1} has size"):
        IndexedDataset(str(tmp_path / "bad"))
    assert np.array_equal(IndexedDataset(shakespeare_prefix).sizes, good.sizes)   # the good one still opens
