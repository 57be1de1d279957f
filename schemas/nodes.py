"""`NodeInfo`, the heartbeat each node writes to the compacted `i2v.nodes` topic.

Owns what the fleet view shows about a node. Must never do I/O.
"""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from pydantic import Field, TypeAdapter

from ._base import Message, SchemaVersion, StrEnum, Timestamp, utcnow


class NodeState(StrEnum):
    """Life of a node's supervisor."""

    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    DEFUNCT = "defunct"
    STOPPED = "stopped"


class DeviceKind(StrEnum):
    CUDA = "cuda"
    NPU = "npu"
    CPU = "cpu"


class DeviceInfo(Message):
    """One accelerator card (or the CPU)."""

    index: Annotated[int, Field(ge=0, description="Device index on the node.")]
    name: Annotated[str, Field(description="Product name.", examples=["NVIDIA H100 80GB HBM3"])]
    memory_total_bytes: Annotated[int | None, Field(ge=0, description="Device memory.")] = None
    memory_used_bytes: Annotated[int | None, Field(ge=0, description="Memory in use.")] = None


class HostMemory(Message):
    """The host's memory: what `i2v monitor --alert-on-high-memory` compares with its limit."""

    total_bytes: Annotated[int, Field(ge=0, description="Host memory (MemTotal).")]
    used_bytes: Annotated[
        int, Field(ge=0, description="In use: MemTotal less MemAvailable (Linux's own count).")
    ]


class Layout(Message):
    """How the node spreads one job over its cards (node settings of the same names)."""

    nproc: Annotated[int, Field(ge=1, description="NPROC: ranks per lane.")]
    lanes: Annotated[int, Field(ge=1, description="LANES: independent engines.")] = 1
    ulysses_size: Annotated[int, Field(ge=1, description="ULYSSES_SIZE.")] = 1
    cfg_size: Annotated[int, Field(ge=1, le=2, description="CFG_SIZE.")] = 1
    dit_fsdp: Annotated[bool, Field(description="DIT_FSDP.")] = False
    t5_fsdp: Annotated[bool, Field(description="T5_FSDP.")] = False
    t5_cpu: Annotated[bool, Field(description="T5_CPU.")] = False
    vae_parallel: Annotated[bool, Field(description="VAE_PARALLEL.")] = False


class NodeInfo(Message):
    """A node's state, written keyed by `node_id` when it changes and every 30 s."""

    schema_version: SchemaVersion = 1
    node_id: Annotated[str, Field(min_length=1, max_length=128, description="NODE_ID.")]
    time: Annotated[Timestamp, Field(description="When this was written.")] = Field(
        default_factory=utcnow
    )
    hostname: Annotated[str, Field(description="Host name.", examples=["gpu-node-17"])]
    version: Annotated[str, Field(description="i2v-fleet version.", examples=["0.1.0"])]
    state: Annotated[NodeState, Field(description="Supervisor state.")]
    state_since: Annotated[
        Timestamp | None,
        Field(description="When the node entered `state` (absent from older nodes)."),
    ] = None
    device: Annotated[DeviceKind, Field(description="Accelerator kind.")]
    devices: Annotated[
        list[DeviceInfo],
        Field(description="Cards seen, with their memory where the driver reports it."),
    ] = Field(default_factory=list)
    memory: Annotated[
        HostMemory | None, Field(description="Host memory; absent from older nodes.")
    ] = None
    layout: Annotated[Layout, Field(description="Parallel layout.")]
    current_jobs: Annotated[list[UUID], Field(description="Jobs running now.")] = Field(
        default_factory=list
    )
    jobs_succeeded: Annotated[int, Field(ge=0, description="Since start.")] = 0
    jobs_failed: Annotated[int, Field(ge=0, description="Since start.")] = 0
    uptime_s: Annotated[float, Field(ge=0, description="Seconds since start.")] = 0.0
    ops_url: Annotated[
        str | None,
        Field(description="Base URL of the ops HTTP server.", examples=["http://10.0.0.17:8088"]),
    ] = None
    presets: Annotated[
        list[str],
        Field(
            description=(
                "The quality presets this node serves: turbo alone on a node with distilled "
                "weights (DISTILLED), the others elsewhere; empty from older nodes."
            ),
            examples=[["fast", "balanced", "high", "custom"], ["turbo"]],
        ),
    ] = Field(default_factory=list)
    attention_backend: Annotated[
        str | None,
        Field(
            description=(
                "The attention kernel the engine runs (ATTENTION_BACKEND, resolved when it "
                "is auto); absent before the engine is ready and from older nodes."
            ),
            examples=["_flash_3", "native"],
        ),
    ] = None


NODE_INFO_ADAPTER: TypeAdapter[NodeInfo] = TypeAdapter(NodeInfo)
