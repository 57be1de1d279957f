"""The turbo preset for distilled weights: what it resolves to, who serves it, how a node
that does not serve it answers, and how nodes advertise what they serve."""

from __future__ import annotations

import json
import uuid

from i2v_fleet.schemas import (
    DISTILLED_PRESETS,
    NODE_INFO_ADAPTER,
    ErrorCode,
    ErrorInfo,
    JobRequest,
    Layout,
    NodeInfo,
    QualityPreset,
    SampleSolver,
    served_presets,
)


def _job(**extra: object) -> JobRequest:
    return JobRequest.model_validate(
        {"job_id": str(uuid.uuid4()), "prompt": "a cat", "image": {"url": "https://x.io/a.png"}}
        | extra
    )


def test_turbo_is_four_euler_steps_without_guidance_at_shift_5() -> None:
    """turbo: 4 steps, guidance 1.0 (no unconditional pass), euler, shift 5."""
    sampling = _job(quality_preset="turbo").sampling()
    assert (sampling.infer_steps, sampling.guidance_scale) == (4, 1.0)
    assert sampling.sample_solver is SampleSolver.EULER
    assert sampling.sample_shift == 5.0


def test_turbo_fields_can_still_be_overridden() -> None:
    """Explicit advanced fields win over turbo's, as over any preset's."""
    sampling = _job(quality_preset="turbo", infer_steps=8, sample_solver="unipc").sampling()
    assert (sampling.infer_steps, sampling.sample_solver) == (8, SampleSolver.UNIPC)
    assert sampling.guidance_scale == 1.0


def test_distilled_nodes_serve_turbo_alone_and_the_others_serve_the_rest() -> None:
    """Every preset is served by exactly one kind of node."""
    assert served_presets(True) == [QualityPreset.TURBO]
    assert set(served_presets(False)) == set(QualityPreset) - DISTILLED_PRESETS
    assert QualityPreset.TURBO not in served_presets(False)


def test_preset_unavailable_is_a_final_client_error() -> None:
    """The submitter must route the job elsewhere; resubmitting it as-is fails again."""
    code = ErrorCode("preset_unavailable")
    assert code is ErrorCode.PRESET_UNAVAILABLE
    assert code.is_client_error
    assert "turbo" in code.description
    info = ErrorInfo.of(code, "quality_preset 'turbo' runs only on DISTILLED nodes")
    assert info.retryable is False
    assert ErrorInfo.model_validate_json(info.model_dump_json()) == info


def test_node_info_carries_the_presets_it_serves() -> None:
    """`presets` round-trips; a heartbeat from an older node (no field) reads as []."""
    node = NodeInfo(
        node_id="turbo-1",
        hostname="h",
        version="0.1.0",
        state="ready",
        device="cuda",
        layout=Layout(nproc=8),
        presets=["turbo"],
    )
    assert NODE_INFO_ADAPTER.validate_json(node.model_dump_json()).presets == ["turbo"]
    older = json.loads(node.model_dump_json())
    del older["presets"]
    assert NODE_INFO_ADAPTER.validate_python(older).presets == []
