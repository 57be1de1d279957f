"""The node's settings, read once from the environment at the process edge.

Owns every variable of DESIGN section 9 that a node reads, with the seed's defaults; the
KAFKA_*, I2V_TOPIC_* and MINIO_* ones through `i2v_fleet.connection`, shared with the SDK.
Must never be read deep inside the service: `i2v worker` builds it and passes it down.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from i2v_fleet.connection import KafkaSettings, ObjectStoreSettings, TopicSettings
from i2v_fleet.pipeline.layout import ParallelLayout
from i2v_fleet.schemas import TopicNames
from i2v_fleet.schemas.topics import REAPERS_GROUP, WORKERS_GROUP

_SHARED: dict[str, type[BaseSettings]] = {
    "kafka": KafkaSettings,
    "object_store": ObjectStoreSettings,
    "topics": TopicSettings,
}
"""The fields that hold connection settings shared with the SDK, and the class reading each."""


class _OwnVariables(EnvSettingsSource):
    """The environment, for the node's own fields: the shared ones read their prefixed
    variables themselves, so a variable named KAFKA, TOPICS or OBJECT_STORE is nobody's."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name in _SHARED:
            return None, field_name, False
        return super().get_field_value(field, field_name)


class WorkerSettings(BaseSettings):
    """Everything a worker node is configured with (environment names in capitals)."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, case_sensitive=False)

    # -- the model and its layout (node-wide: a loaded model cannot change per job) --------
    model_ckpt_dir: Path = Path("/data/models/modelscope/hub/Wan-AI/Wan2.1-I2V-14B-720P")
    device: Literal["cuda", "npu", "cpu"] | None = None
    t5_cpu: bool = False
    dit_fsdp: bool = True
    t5_fsdp: bool = False
    vae_parallel: bool = True
    ulysses_size: int = Field(8, ge=1)
    cfg_size: int = Field(1, ge=1, le=2)
    nproc: int | None = Field(None, ge=1, description="Ranks per lane [default: cards / lanes].")
    lanes: int = Field(1, ge=1)
    use_attention_cache: bool = False
    attention_backend: str = Field(
        "native",
        description=(
            "The attention kernel: native (torch SDPA), auto (time the exact kernels this "
            "node can run at start and take the fastest), or a diffusers backend name "
            "(_native_flash, _native_cudnn, flash, _flash_3, xformers, _native_npu, ...; "
            "8-bit sage kernels only by name). A name this node cannot run stops the worker."
        ),
    )
    torch_compile: bool = Field(
        False,
        description=(
            "Compile the transformer blocks at engine start and warm them at "
            "COMPILE_WARMUP_SIZES (minutes on a cold TORCHINDUCTOR_CACHE_DIR)."
        ),
    )
    compile_warmup_sizes: str = Field(
        "1280*720,720*1280",
        description=(
            "Sizes WIDTH*HEIGHT[*FRAMES] (frames default 81) the engine warms when "
            "TORCH_COMPILE is on; the largest is also what ATTENTION_BACKEND=auto times."
        ),
    )
    collective_timeout_s: float = Field(
        600.0,
        gt=0,
        description="A rank waiting this long in a collective counts the engine as broken (s).",
    )
    model_loras: str = Field(
        "",
        description=(
            "LoRA adapters fused into the transformer at engine start: PATH[:SCALE],... "
            "(.safetensors files only; scale 1.0 by default)."
        ),
    )
    distilled: bool = Field(
        False,
        description=(
            "The loaded weights are step/CFG distilled (e.g. MODEL_LORAS naming LightX2V's "
            "distill LoRA): the node serves the turbo preset only, and refuses the others."
        ),
    )

    # -- jobs ------------------------------------------------------------------------------
    task_timeout: int = Field(1800, ge=1, description="Default run-time limit per job (s).")
    max_attempts: int = Field(3, ge=1)
    lease_s: float = Field(60.0, gt=0, description="A claim lasts this long unless renewed (s).")
    heartbeat_s: float = Field(15.0, gt=0, description="Lease renewal interval (s).")
    lease_grace_s: float = Field(
        30.0, ge=0, description="Reapers wait this long past a lease's end: covers clock skew."
    )
    reaper_lookback_s: float = Field(
        24 * 3600.0, gt=0, description="How far back a reaper reads i2v.status on assignment (s)."
    )
    reaper_interval_s: float = Field(1.0, gt=0, description="How often a reaper checks leases.")
    shutdown_grace: float = Field(60.0, ge=0)
    leave_group_while_busy: Literal["auto", "always", "never"] = Field(
        "auto",
        description=(
            "auto: a busy node leaves i2v-workers when records wait in its partitions; "
            "always: at every claim; never: it keeps its partitions paused (one-node fleets)."
        ),
    )
    upload_retry_s: float = Field(
        300.0, ge=0, description="How long a finished video's upload keeps retrying (s)."
    )
    i2v_failpoints: str = Field(
        "",
        description="Testing only: name[=probability],... of points where the node kills itself.",
    )
    standin_engine: str = Field(
        "",
        description=(
            "Testing only: run a stand-in engine instead of the model, one behaviour per job "
            "(sleep:S, fail:CODE[/retryable], die, stall:S; the last repeats). Refused unless "
            "I2V_TEST_TOOLS=true."
        ),
    )
    i2v_test_tools: bool = Field(
        False, description="Allow the test tools (STANDIN_ENGINE). Never set on a real node."
    )
    engine_stall_timeout: float = Field(600.0, gt=0)
    engine_start_timeout: float = Field(1800.0, gt=0)
    allowed_hosts: str = "*"
    fetch_timeout_s: float = Field(20.0, gt=0)
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0)
    progress_interval_s: float = Field(0.5, ge=0, description="At most 2 progress events/s.")
    work_dir: Path = Field(default_factory=lambda: Path("/tmp/i2v-worker"))

    # -- node ------------------------------------------------------------------------------
    node_id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128)
    server_host: str = "0.0.0.0"
    server_port: int = Field(8088, ge=0, le=65535)
    node_info_interval_s: float = Field(30.0, gt=0)

    # -- Kafka: the connection (KAFKA_*, I2V_TOPIC_*) is the SDK's; the group tuning the node's --
    kafka: KafkaSettings = Field(
        default_factory=KafkaSettings,
        description="KAFKA_BOOTSTRAP_SERVERS, KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*, KAFKA_SSL_*.",
    )
    topics: TopicNames = Field(
        default_factory=lambda: TopicSettings().names(), description="I2V_TOPIC_<ROLE>."
    )
    kafka_heartbeat_interval_ms: int = Field(500, ge=100)
    kafka_session_timeout_ms: int = Field(10000, ge=1000)
    kafka_max_poll_interval_ms: int = Field(300000, ge=1000)
    broker_check_s: float = Field(
        5.0,
        gt=0,
        description=(
            "How often the node checks that the broker answers; it is not ready after about "
            "3 x this without an answer (s)."
        ),
    )
    shutdown_hand_back_s: float = Field(
        30.0,
        ge=0,
        description=(
            "After SHUTDOWN_GRACE, how long handing the running job back may take before the "
            "node stops anyway and leaves the job to its lease (s; 3 s while the broker is lost)."
        ),
    )
    workers_group: str = WORKERS_GROUP
    reapers_group: str = REAPERS_GROUP

    # -- object store ----------------------------------------------------------------------
    object_store: ObjectStoreSettings = Field(
        default_factory=ObjectStoreSettings,
        description="MINIO_ENDPOINT, MINIO_ACCESS_KEY, MINIO_SECRET_KEY, MINIO_BUCKET, ...",
    )
    output_retention_days: int | None = Field(None, ge=1)
    presign_expiry_s: int = Field(7 * 24 * 3600, ge=1, le=7 * 24 * 3600)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _OwnVariables(settings_cls), dotenv_settings, file_secret_settings

    @model_validator(mode="before")
    @classmethod
    def _shared_by_flat_names(cls, data: Any) -> Any:
        """Names spelled as in the environment (`kafka_bootstrap_servers=`, `minio_bucket=`,
        `i2v_topic_status=`) set the shared settings, instead of being silently ignored."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for field, shared in _SHARED.items():
            prefix = str(shared.model_config.get("env_prefix", "")).lower()
            flat = {
                key.lower().removeprefix(prefix): data.pop(key)
                for key in list(data)
                if key.lower().startswith(prefix)
                and key.lower().removeprefix(prefix) in shared.model_fields
            }
            if flat:
                given = data.get(field) or {}
                base = given.model_dump() if isinstance(given, BaseModel) else dict(given)
                built = shared(**(base | flat))
                data[field] = built.names() if isinstance(built, TopicSettings) else built
        return data

    @field_validator("attention_backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from i2v_fleet.pipeline.attention import ATTENTION_BACKENDS

        value = value.strip().lower()
        if value not in ATTENTION_BACKENDS:
            raise ValueError(f"ATTENTION_BACKEND must be one of {', '.join(ATTENTION_BACKENDS)}")
        return value

    @field_validator("model_loras")
    @classmethod
    def _safetensors_loras(cls, value: str) -> str:
        from i2v_fleet.pipeline.lora import parse_loras

        parse_loras(value)  # ValueError names the entry that is not a .safetensors path
        return value

    @field_validator("compile_warmup_sizes")
    @classmethod
    def _sizes(cls, value: str) -> str:
        from i2v_fleet.pipeline.compile import parse_sizes

        parse_sizes(value)  # ValueError names the bad entry
        return value

    @model_validator(mode="after")
    def _test_tools_only_when_allowed(self) -> WorkerSettings:
        if self.standin_engine and not self.i2v_test_tools:
            raise ValueError(
                "STANDIN_ENGINE replaces the model with a test tool; a node runs it only with "
                "I2V_TEST_TOOLS=true (never on a real node): unset STANDIN_ENGINE"
            )
        if self.standin_engine:
            from .engine.standin import parse

            parse(self.standin_engine)  # ValueError names the behaviour it does not know
        return self

    @model_validator(mode="after")
    def _heartbeat_inside_lease(self) -> WorkerSettings:
        if self.heartbeat_s >= self.lease_s:
            raise ValueError(
                f"HEARTBEAT_S ({self.heartbeat_s}) must be below LEASE_S ({self.lease_s}) "
                "or leases expire between heartbeats"
            )
        return self

    def engine_layout(self, cards: int) -> ParallelLayout:
        """One lane's layout on a node with `cards` devices (the CPU counts as one card but
        runs any NPROC). NPROC defaults to cards / LANES; ULYSSES_SIZE, unless set, to
        NPROC / CFG_SIZE; FSDP and VAE_PARALLEL only mean something with several ranks."""
        nproc = self.nproc or max(1, cards // self.lanes)
        explicit = "ulysses_size" in self.model_fields_set
        ulysses = self.ulysses_size if explicit else max(1, nproc // self.cfg_size)
        several = nproc > 1
        return ParallelLayout(
            nproc=nproc,
            ulysses_size=ulysses,
            cfg_size=self.cfg_size,
            dit_fsdp=self.dit_fsdp and several,
            t5_fsdp=self.t5_fsdp and several and not self.t5_cpu,
            t5_cpu=self.t5_cpu,
            vae_parallel=self.vae_parallel and several,
        )

    def lane(self, index: int) -> WorkerSettings:
        """The settings of lane `index` of LANES: its own group member id, ops port and
        work directory (lane 0 of a one-lane node keeps the node's own)."""
        if self.lanes == 1:
            return self
        return self.model_copy(
            update={
                "node_id": f"{self.node_id}-lane{index}",
                "server_port": self.server_port + index if self.server_port else 0,
                "work_dir": self.work_dir / f"lane{index}",
            }
        )

    def group_member(self, group_id: str, offset_reset: str) -> dict[str, Any]:
        """Options of a consumer-group member of this node (claims or reaper): manual
        commits, and the group timings KAFKA_HEARTBEAT_INTERVAL_MS, KAFKA_SESSION_TIMEOUT_MS,
        KAFKA_MAX_POLL_INTERVAL_MS."""
        return {
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": offset_reset,
            "heartbeat_interval_ms": self.kafka_heartbeat_interval_ms,
            "session_timeout_ms": self.kafka_session_timeout_ms,
            "max_poll_interval_ms": self.kafka_max_poll_interval_ms,
        }

    def kafka_kwargs(self) -> dict[str, Any]:
        """Connection arguments for every aiokafka client of the node (the SDK's, named
        after this node)."""
        return {**self.kafka.client_kwargs(), "client_id": f"i2v-worker-{self.node_id}"}
