"""Typed wire models (the pydantic mirror of docs/ota-protocol.md).

Device-side models are strict about types (a string where a number belongs is a
422, never coerced) and ignore unknown keys so newer clients can add fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="sha256 hex of the .epk")]
Number = Union[StrictInt, StrictFloat]
Ident = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]


class _Device(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _Admin(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


# ------------------------------------------------------------------- device API


class BundleRef(_Device):
    name: StrictStr
    version: StrictStr
    digest: Digest


class Health(_Device):
    serving: Optional[StrictBool] = None
    requests: Optional[Annotated[StrictInt, Field(ge=0)]] = None
    errors: Optional[Annotated[StrictInt, Field(ge=0)]] = None
    p95_ms: Optional[Number] = None
    nonfinite: Optional[Annotated[StrictInt, Field(ge=0)]] = None
    uptime_s: Optional[Number] = None


class CheckinRequest(_Device):
    seq: Annotated[StrictInt, Field(ge=0)]
    state: Annotated[StrictStr, Field(max_length=64)]
    current: Optional[BundleRef] = None
    previous: Optional[BundleRef] = None
    health: Optional[Health] = None
    runtime_version: Optional[Annotated[StrictStr, Field(max_length=64)]] = None
    engines: list[Annotated[StrictStr, Field(max_length=64)]] = Field(default_factory=list, max_length=32)
    summaries: dict[str, Any] = Field(default_factory=dict)


class DirectiveBundle(BaseModel):
    name: str
    version: str
    digest: str
    size: int
    url: str


class DirectiveDelta(BaseModel):
    from_digest: str
    digest: str
    size: int
    url: str


class Probation(_Admin):
    requests: Annotated[StrictInt, Field(ge=0)] = 50
    seconds: Annotated[Number, Field(ge=0)] = 30
    max_error_rate: Annotated[Number, Field(ge=0, le=1)] = 0.05
    max_latency_ratio: Annotated[Number, Field(gt=0)] = 3.0


class DirectiveResponse(BaseModel):
    action: Literal["none", "update", "rollback"]
    rollout_id: Optional[str] = None
    bundle: Optional[DirectiveBundle] = None
    delta: Optional[DirectiveDelta] = None
    probation: Optional[Probation] = None
    poll_interval_s: int


EventType = Literal["downloaded", "installed", "self_test_failed", "probation_failed", "rolled_back", "committed",
                    "install_failed"]
ReasonCode = Literal["self_test", "crash_loop", "error_rate", "latency_regression", "nonfinite", "verify", "download"]


class Reason(_Device):
    code: ReasonCode
    detail: Optional[Annotated[StrictStr, Field(max_length=2000)]] = None


class Event(_Device):
    seq: Annotated[StrictInt, Field(ge=0)]
    type: EventType
    rollout_id: Optional[Annotated[StrictStr, Field(max_length=128)]] = None
    digest: Optional[Digest] = None
    version: Optional[Annotated[StrictStr, Field(max_length=128)]] = None
    reason: Optional[Reason] = None
    at: Optional[Number] = None


class EventsRequest(_Device):
    events: Annotated[list[Event], Field(min_length=1, max_length=1000)]


class EventsResponse(BaseModel):
    accepted: int
    last_seq: int


# -------------------------------------------------------------------- admin API


class BundleOut(BaseModel):
    id: str
    name: str
    version: str
    digest: str
    size: int
    stage: str
    key_id: str
    created_at: float


class StageChangeOut(BaseModel):
    from_stage: Optional[str]
    to_stage: str
    at: float


class BundleDetail(BundleOut):
    manifest: dict[str, Any]
    stage_history: list[StageChangeOut]


class StageRequest(_Admin):
    stage: Literal["staging", "production", "archived"]


class DeviceCreate(_Admin):
    id: Ident
    group: Annotated[StrictStr, Field(min_length=1, max_length=128)] = "default"
    tags: list[Annotated[StrictStr, Field(max_length=64)]] = Field(default_factory=list, max_length=64)
    profile: Optional[Annotated[StrictStr, Field(max_length=128)]] = None


class DeviceUpdate(_Admin):
    group: Optional[Annotated[StrictStr, Field(min_length=1, max_length=128)]] = None
    tags: Optional[list[Annotated[StrictStr, Field(max_length=64)]]] = None
    profile: Optional[Annotated[StrictStr, Field(max_length=128)]] = None


class DeviceCreated(BaseModel):
    id: str
    token: str = Field(description="Shown once; only its sha256 is stored.")


class DeviceOut(BaseModel):
    id: str
    group: str
    tags: list[str]
    profile: Optional[str]
    created_at: float
    last_seen: Optional[float]
    last_seq: int
    state: Optional[str]
    current: Optional[dict[str, Any]]
    previous: Optional[dict[str, Any]]
    health: Optional[dict[str, Any]]
    runtime_version: Optional[str]
    engines: list[str]


class RolloutGates(_Admin):
    """ML gates a rollout step must pass before it advances; a violation halts it like install failures."""
    min_shadow_agreement: Optional[Annotated[Number, Field(ge=0, le=1)]] = None
    max_prediction_shift_psi: Optional[Annotated[Number, Field(gt=0)]] = None
    min_live_accuracy_vs_previous: StrictBool = False


class RolloutCreate(_Admin):
    bundle_id: StrictStr
    group: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    steps: Annotated[list[Number], Field(min_length=1, max_length=20)] = Field(default_factory=lambda: [1, 10, 50, 100])
    soak_seconds: Annotated[Number, Field(ge=0)] = 60
    min_devices_succeeded: Annotated[StrictInt, Field(ge=0)] = 1
    max_failure_rate: Annotated[Number, Field(ge=0, le=1)] = 0.1
    halt_min_count: Annotated[StrictInt, Field(ge=1)] = 1
    probation: Probation = Field(default_factory=Probation)
    gates: Optional[RolloutGates] = None


class StepOut(BaseModel):
    index: int
    percent: float
    status: Literal["done", "current", "pending"]
    eligible: int
    joined: int
    succeeded: int
    failed: int
    in_flight: int
    reverted: int


class MemberOut(BaseModel):
    device_id: str
    step_index: int
    state: str
    from_digest: Optional[str]
    failure_code: Optional[str]
    failure_detail: Optional[str]
    updated_at: float


class RolloutOut(BaseModel):
    id: str
    bundle_id: str
    bundle: Optional[dict[str, Any]]
    group: str
    steps: list[float]
    soak_seconds: float
    min_devices_succeeded: int
    max_failure_rate: float
    halt_min_count: int
    probation: dict[str, Any]
    status: Literal["active", "paused", "halted", "aborted", "completed", "rolled_back"]
    step_index: int
    current_percent: float
    step_started_at: float
    created_at: float
    updated_at: float
    halt_reasons: list[dict[str, Any]]
    halt_message: Optional[str] = None
    waiting_for: list[str] = Field(default_factory=list)
    progress: list[StepOut]
    members: list[MemberOut] = Field(default_factory=list)
    history: list[dict[str, Any]] = Field(default_factory=list)
    gates: dict[str, Any] = Field(default_factory=dict)
    gate_status: Optional[dict[str, Any]] = None
