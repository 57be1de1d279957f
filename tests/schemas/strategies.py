"""Hypothesis strategies for valid messages, shared by the schema tests."""

from __future__ import annotations

import base64
from datetime import timezone
from typing import Any

from hypothesis import strategies as st

from i2v_fleet.schemas import ImageSize, QualityPreset, SampleSolver

text = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=80)

image_sources = st.one_of(
    st.builds(
        lambda host, path: {"url": f"https://{host}.example.com/{path}.png"},
        st.from_regex(r"[a-z][a-z0-9]{0,20}", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9_-]{1,30}", fullmatch=True),
    ),
    st.builds(
        lambda bucket, key: {"s3": {"bucket": bucket, "key": key}},
        st.from_regex(r"[a-z0-9][a-z0-9-]{1,20}[a-z0-9]", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9/_.-]{1,60}", fullmatch=True).filter(
            lambda key: not {".", ".."} & set(key.split("/"))
        ),
    ),
    st.binary(min_size=1, max_size=300).map(lambda b: {"base64": base64.b64encode(b).decode()}),
)

caches = st.one_of(
    st.none(),
    st.builds(
        lambda start, length, interval: {
            "kind": "attention",
            "start_step": start,
            "end_step": start + length,
            "interval": interval,
        },
        st.integers(0, 60),
        st.integers(1, 40),
        st.integers(1, 10),
    ),
    st.builds(
        lambda t: {"kind": "first_block", "threshold": t},
        st.floats(0.001, 1.0, allow_nan=False),
    ),
    st.just({"kind": "none"}),
)


@st.composite
def job_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A dict that must validate as a JobRequest."""
    preset = draw(st.sampled_from(list(QualityPreset)))
    custom = preset is QualityPreset.CUSTOM
    maybe = (lambda s: s) if custom else (lambda s: st.one_of(st.none(), s))
    data: dict[str, Any] = {
        "job_id": str(draw(st.uuids())),
        "prompt": draw(text),
        "negative_prompt": draw(st.one_of(st.just(""), text)),
        "image": draw(image_sources),
        "quality_preset": preset.value,
        "image_size": draw(st.sampled_from(list(ImageSize))).value,
        "num_frames": 4 * draw(st.integers(1, 30)) + 1,
        "guidance_scale": draw(maybe(st.floats(1.0, 20.0, allow_nan=False))),
        "infer_steps": draw(maybe(st.integers(1, 100))),
        "seed": draw(st.one_of(st.none(), st.integers(0, 2**31 - 1))),
        "sample_solver": draw(st.one_of(st.none(), st.sampled_from(list(SampleSolver)))),
        "sample_shift": draw(st.one_of(st.none(), st.floats(0.1, 20.0, allow_nan=False))),
        "fps": draw(st.integers(1, 60)),
        "cache": draw(caches),
        "timeout_s": draw(st.one_of(st.none(), st.integers(1, 86400))),
        "ttl_s": draw(st.one_of(st.none(), st.integers(1, 7 * 86400))),
        "metadata": draw(
            st.dictionaries(st.from_regex(r"[a-z_]{1,20}", fullmatch=True), text, max_size=5)
        ),
        "submitted_at": draw(st.datetimes(timezones=st.just(timezone.utc))).isoformat(),
        "attempt": draw(st.integers(1, 100)),
    }
    if isinstance(data["sample_solver"], SampleSolver):
        data["sample_solver"] = data["sample_solver"].value
    return data
