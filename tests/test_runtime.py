"""keep_freed_memory: the glibc malloc settings the CLI applies."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from earmark.runtime import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_takes_effect_on_glibc_and_tensors_still_work() -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert keep_freed_memory() is True
    x = torch.ones(1 << 20)  # 4 MiB: served from the heap now, freed and reused
    del x
    assert float(torch.ones(1 << 20).sum()) == float(1 << 20)
