"""How a node's settings become lanes, layouts and rank devices (no processes started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from i2v_fleet.consumer.engine import EngineConfig
from i2v_fleet.consumer.settings import WorkerSettings
from i2v_fleet.consumer.worker import check_layout
from i2v_fleet.pipeline.layout import LayoutError, ParallelLayout


def _settings(**env: object) -> WorkerSettings:
    return WorkerSettings.model_validate(env)


def test_the_defaults_use_every_card_in_one_lane_with_ulysses_over_all_of_them() -> None:
    layout = _settings().engine_layout(cards=8)
    assert layout == ParallelLayout(
        nproc=8, ulysses_size=8, dit_fsdp=True, t5_fsdp=False, vae_parallel=True
    )


def test_ulysses_follows_nproc_and_cfg_unless_set() -> None:
    assert _settings(cfg_size=2).engine_layout(8).ulysses_size == 4
    assert _settings(lanes=2).engine_layout(8).nproc == 4
    assert _settings(nproc=4, ulysses_size=2, cfg_size=2).engine_layout(1).nproc == 4
    one = _settings().engine_layout(cards=1)  # a CPU node: one rank, nothing to shard
    assert one == ParallelLayout(nproc=1, ulysses_size=1)


def test_each_lane_is_its_own_member_with_its_own_port_and_work_dir() -> None:
    s = _settings(lanes=2, node_id="gpu-7", server_port=8088, work_dir="/tmp/w")
    lanes = [s.lane(i) for i in range(2)]
    assert [lane.node_id for lane in lanes] == ["gpu-7-lane0", "gpu-7-lane1"]
    assert [lane.server_port for lane in lanes] == [8088, 8089]
    assert [lane.work_dir for lane in lanes] == [Path("/tmp/w/lane0"), Path("/tmp/w/lane1")]
    assert _settings(node_id="solo").lane(0).node_id == "solo"


def test_every_rank_gets_its_card_of_the_lane() -> None:
    config = EngineConfig(
        model_dir="/m", device="cuda", layout=ParallelLayout(nproc=4), cards=(4, 5, 6, 7)
    )
    assert [config.rank_device(r) for r in range(4)] == ["cuda:4", "cuda:5", "cuda:6", "cuda:7"]
    assert (
        EngineConfig(model_dir="/m", device="cpu", layout=ParallelLayout(nproc=4)).rank_device(3)
        == "cpu"
    )


def test_an_impossible_layout_is_refused_before_loading_with_what_would_work(
    tmp_path: Path,
) -> None:
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"num_attention_heads": 40}))
    s = _settings(model_ckpt_dir=tmp_path, nproc=4, ulysses_size=4, cfg_size=2)
    with pytest.raises(LayoutError, match="use ULYSSES_SIZE=4 CFG_SIZE=1 or ULYSSES_SIZE=2"):
        check_layout(s, cards=1)
    s = _settings(model_ckpt_dir=tmp_path, nproc=6, ulysses_size=3, cfg_size=2)
    with pytest.raises(LayoutError, match="does not divide the model's 40 attention heads"):
        check_layout(s, cards=1)
    ok = _settings(model_ckpt_dir=tmp_path, nproc=4, ulysses_size=2, cfg_size=2)
    assert check_layout(ok, cards=1).nproc == 4
