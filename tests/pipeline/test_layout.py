"""Node layouts: what is refused (and what the refusal suggests), lanes, per-card weights."""

from __future__ import annotations

import pytest

from i2v_fleet.pipeline.layout import (
    LayoutError,
    ModelSizes,
    ParallelLayout,
    lane_devices,
    weight_bytes_per_card,
)

HEADS_14B = 40


@pytest.mark.parametrize(
    ("nproc", "ulysses", "cfg"), [(1, 1, 1), (8, 8, 1), (8, 4, 2), (4, 2, 2), (2, 1, 2), (5, 5, 1)]
)
def test_layouts_that_fit_are_accepted(nproc: int, ulysses: int, cfg: int) -> None:
    ParallelLayout(nproc=nproc, ulysses_size=ulysses, cfg_size=cfg).check(HEADS_14B)


def test_a_product_that_misses_nproc_names_the_splits_that_work() -> None:
    with pytest.raises(LayoutError) as refused:
        ParallelLayout(nproc=8, ulysses_size=3, cfg_size=2).check(HEADS_14B)
    message = str(refused.value)
    assert "3 x 2 != 8" in message
    assert "ULYSSES_SIZE=8 CFG_SIZE=1 or ULYSSES_SIZE=4 CFG_SIZE=2" in message


def test_ulysses_must_divide_the_heads() -> None:
    with pytest.raises(LayoutError) as refused:
        ParallelLayout(nproc=6, ulysses_size=6).check(HEADS_14B)
    message = str(refused.value)
    assert "does not divide the model's 40 attention heads" in message
    assert "ULYSSES_SIZE can be 1, 2, 4, 5" in message
    # 6 ranks: 6 x 1 does not divide 40, 3 x 2 does not either.
    assert "a different NPROC (6 fits no split)" in message


@pytest.mark.parametrize(
    ("layout", "fragment"),
    [
        (ParallelLayout(nproc=2, ulysses_size=1, cfg_size=3), "CFG_SIZE must be 1 or 2"),
        (ParallelLayout(nproc=0, ulysses_size=0), "at least 1"),
        (ParallelLayout(t5_cpu=True, t5_fsdp=True), "set only one of them"),
    ],
)
def test_other_refusals_say_why(layout: ParallelLayout, fragment: str) -> None:
    with pytest.raises(LayoutError, match=fragment):
        layout.check(HEADS_14B)


def test_lanes_split_the_cards_evenly_or_are_refused() -> None:
    assert lane_devices(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lane_devices(4, 4) == [[0], [1], [2], [3]]
    with pytest.raises(LayoutError, match="LANES can be 1, 2, 4, 8"):
        lane_devices(8, 3)


def test_weights_per_card_follow_the_placement_rules() -> None:
    sizes = ModelSizes(transformer=16_000, text_encoder=5_000, image_encoder=600, vae=100)
    whole = weight_bytes_per_card(ParallelLayout(nproc=8, ulysses_size=8), sizes)
    assert whole == {
        "transformer": 32_000,
        "text_encoder": 10_000,
        "image_encoder": 2_400,
        "vae": 400,
    }
    sharded = weight_bytes_per_card(
        ParallelLayout(nproc=8, ulysses_size=8, dit_fsdp=True, t5_fsdp=True), sizes
    )
    assert (sharded["transformer"], sharded["text_encoder"]) == (4_000, 1_250)
    on_cpu = weight_bytes_per_card(ParallelLayout(nproc=8, ulysses_size=8, t5_cpu=True), sizes)
    assert on_cpu["text_encoder"] == 0


def test_a_layout_is_the_node_settings_of_the_same_names() -> None:
    """`as_fields` gives every field under its node setting's name; the node's settings,
    its presets and the layout it reports on the wire (`schemas.Layout`) use exactly those."""
    from i2v_fleet.consumer.presets import PRESETS
    from i2v_fleet.consumer.settings import WorkerSettings
    from i2v_fleet.schemas import Layout

    layout = ParallelLayout(nproc=4, ulysses_size=2, cfg_size=2, dit_fsdp=True, t5_cpu=True)
    fields = layout.as_fields()
    assert ParallelLayout(**fields) == layout
    assert set(fields) <= set(WorkerSettings.model_fields)
    assert Layout(lanes=2, **fields).model_dump() == {"lanes": 2, **fields}
    for preset in PRESETS.values():
        assert {name.upper() for name in fields} <= set(preset.worker), preset.name
