import platform
import sys

import pytest
import torch

import rankwise.core.memory as memory
import rankwise.core.pipeline as pipeline
from rankwise.core.errors import Cancelled
from rankwise.core.memory import release_free_memory
from rankwise.core.rank import RankPolicy, RankRule
from rankwise.core.resize import resize
from rankwise.core.types import Lora, LoraLayer


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="malloc_trim is a glibc function")
def test_malloc_trim_is_found_and_runs_on_glibc():
    assert memory._malloc_trim() is not None
    assert release_free_memory() is True


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="mallopt is a glibc function")
def test_keep_freed_memory_applies_on_glibc_and_the_cli_asks_for_it(monkeypatch, tmp_path):
    assert memory.keep_freed_memory() is True
    import rankwise.core.cli as cli

    asked = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: asked.append(1) or True)
    assert cli.main(["info", str(tmp_path / "missing.safetensors")]) == 2  # a user error, after the setting
    assert asked == [1]


@pytest.mark.skipif(sys.platform.startswith("linux"), reason="the no-op path is for other platforms")
def test_no_op_elsewhere():
    assert release_free_memory() is False


def _lora(n: int = 3) -> Lora:
    g = torch.Generator().manual_seed(0)
    return Lora({f"lora_unet_l{i}": LoraLayer(up=torch.randn(20, 4, generator=g), down=torch.randn(4, 30, generator=g),
                                             alpha=4.0) for i in range(n)})


@pytest.mark.parametrize("outcome", ["done", "cancelled"])
def test_every_layer_loop_hands_memory_back_once_even_when_cancelled(monkeypatch, outcome):
    calls = []
    monkeypatch.setattr(pipeline, "release_free_memory", lambda: calls.append(1) or True)

    def progress(done, total, name):
        if outcome == "cancelled" and done == 2:
            raise Cancelled("stop")

    if outcome == "done":
        resize(_lora(), RankPolicy(RankRule.parse("2")), progress=progress)
    else:
        with pytest.raises(Cancelled):
            resize(_lora(), RankPolicy(RankRule.parse("2")), progress=progress, workers=2)
    assert calls == [1]
