"""keep_freed_memory: a freed block is reused without page faults, and the config switches it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tailtune.build import trainer

# A training step's pattern in miniature: blocks of 1 to 50 MiB allocated, written and freed,
# four times over. glibc's defaults map each large block afresh and return it when freed
# (about 61,000 faults of 4 KiB); with freed memory kept, every later step reuses the first
# step's memory, already mapped.
PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from tailtune.allocator import keep_freed_memory
    took = keep_freed_memory() if sys.argv[1] == "keep" else None
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    MIB = (1, 3, 7, 20, 50, 5, 2)
    def step():
        blocks = [libc.malloc(mib << 20) for mib in MIB]
        for block, mib in zip(blocks, MIB):
            ctypes.memset(block, 1, mib << 20)
        for block in reversed(blocks):
            libc.free(block)
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        step()
    print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def later_step_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults() -> None:
    took, kept = later_step_faults("keep")
    _, default = later_step_faults("default")
    assert took == "True"
    assert default > 20_000  # 88 MiB a step mapped afresh: up to 22,528 pages each time
    assert kept < 1_000


@pytest.mark.parametrize("setting", [True, False])
def test_configure_process_applies_the_switch(setting: bool, smoke_cfg,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append(True) or True)
    cfg, _ = smoke_cfg(f"keep_freed_memory={setting}")
    trainer.configure_process(cfg)
    assert calls == ([True] if setting else [])
