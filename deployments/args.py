"""`applications[0].args` of serve_config.yaml: validated at start, every key described."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pdray.config import EngineConfig, Quantization
from pdray.entrypoints.openai.protocol import DEFAULT_MAX_N, DEFAULT_MAX_REQUEST_BODY_BYTES
from pdray.kv_transfer.base import FailurePolicy


class RoleArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(1, ge=0, description="replicas of this role")
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="ranks per replica: the replica is rank 0, each other rank a worker "
        "actor in the replica's placement group (one GPU each); > 1 for mixed replicas only",
    )
    gpu_memory_utilization: float = Field(
        0.45, gt=0, le=1, description="fraction of a GPU one replica may use (two can share one)"
    )
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs per replica for Ray; default: 0.5 on GPU hosts, 0 on CPU"
    )
    num_cpus: float = Field(0.5, ge=0, description="CPUs Ray reserves per replica")
    quantization: Quantization | None = Field(
        None,
        description="weights of this role's engines: 'wint4' quantizes a full-precision "
        "checkpoint's linear layers to int4 at load (embeddings and LM head stay full "
        "precision); an AWQ/GPTQ int4 checkpoint is int4 either way. Prefill and decode may "
        "differ: they exchange the same KV",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="other pdray EngineConfig fields for this role"
    )

    @model_validator(mode="after")
    def _check(self) -> RoleArgs:
        named = [k for k in ("gpu_memory_utilization", "tensor_parallel_size")
                 if k in self.engine_args]  # fmt: skip
        if named:
            raise ValueError(f"set {named} as keys of the role, not in its engine_args")
        if self.quantization is not None and "quantization" in self.engine_args:
            raise ValueError("quantization is set twice: as a key of the role and in engine_args")
        return self

    def engine_kwargs(self) -> dict[str, Any]:
        """The EngineConfig fields this role sets (model, dtype, device and role aside)."""
        kwargs: dict[str, Any] = {
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "tensor_parallel_size": self.tensor_parallel_size,
        }
        if self.quantization is not None:
            kwargs["quantization"] = self.quantization
        return {**kwargs, **self.engine_args}


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field("dummy:tiny", description="local Hugging Face directory or dummy:<preset>")
    served_model_name: str | None = Field(None, description="name clients use; default: model")
    dtype: str = Field("auto", description="auto, float32, float16 or bfloat16")
    device: str = Field("auto", description="auto (GPU when present), cpu or cuda")
    prefill: RoleArgs = Field(default_factory=RoleArgs, description="prefill replicas")
    decode: RoleArgs = Field(default_factory=RoleArgs, description="decode replicas")
    mixed: RoleArgs = Field(
        default_factory=lambda: RoleArgs(replicas=0), description="replicas doing both"
    )
    transport: str = Field(
        "auto", description="KV transport: auto (cuda_ipc on GPU, ucx otherwise), ucx or cuda_ipc"
    )
    ucx_net_devices: list[str] | None = Field(
        None, description="UCX NICs for KV transfer (FastDeploy's KVCACHE_RDMA_NICS)"
    )
    redis_url: str | None = Field(
        None, description="shared Redis for routing state; none: a private one on 127.0.0.1"
    )
    scheduler_ttl_s: float = Field(10.0, gt=0, description="TTL of instance records in Redis")
    overlap_prefill: bool = Field(
        False,
        description="send the prompt to prefill while decode reserves its blocks (the ticket "
        "follows): saves a round trip of TTFT; off by default, since the failure tests showed "
        "30 s stalls with it after a decode replica died (docs/performance.md)",
    )
    router_replicas: int = Field(
        1,
        ge=1,
        description="replicas of the router (the HTTP ingress): each relays every token of its "
        "requests, so one core caps a deployment's output tokens per second (docs/performance.md)",
    )
    lease_s: float = Field(30.0, gt=0, description="decode waits this long for a prompt's KV")
    failure_policy: FailurePolicy = Field(
        FailurePolicy.RECOMPUTE, description="when KV does not arrive: recompute, retry or fail"
    )
    random_window: float = Field(
        0.1, ge=0, description="pick randomly among instances within this load fraction of best"
    )
    max_attempts: int = Field(
        2, ge=1, description="prefill/decode pairs tried per request after instance failures"
    )
    queue_timeout_s: float = Field(
        60.0,
        ge=0,
        description="a request waits this long for an instance that can take it (a decode "
        "instance with room, a prefill instance, a pair registered)",
    )
    request_timeout_s: float = Field(
        600.0,
        gt=0,
        description="end-to-end deadline of a request (queueing, prefill, decode, streaming): "
        "past it the router ends the request with a timeout error and aborts it on every "
        "instance it reached, freeing its blocks",
    )
    api_key: str | None = Field(None, description="require 'Authorization: Bearer <key>'")
    max_n: int = Field(
        DEFAULT_MAX_N,
        ge=1,
        description="most completions one request may ask for (`n`, `best_of`); more is a 400 "
        "(OpenAI documents 128; vLLM sets no bound)",
    )
    max_request_body_bytes: int = Field(
        DEFAULT_MAX_REQUEST_BODY_BYTES,
        ge=1,
        description="larger request bodies get a 413 before they are parsed",
    )
    app_name: str = Field("pdray", description="namespace of this app's Redis records")

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        pd = self.prefill.replicas > 0 and self.decode.replicas > 0
        if not pd and self.mixed.replicas == 0:
            raise ValueError(
                "no instance can serve: give prefill.replicas and decode.replicas > 0, "
                "or mixed.replicas > 0"
            )
        if self.transport not in ("auto", "ucx", "cuda_ipc"):
            raise ValueError(f"transport must be auto, ucx or cuda_ipc, got {self.transport!r}")
        for role in ("prefill", "decode", "mixed"):
            extra = getattr(self, role).engine_kwargs()
            try:
                EngineConfig(model=self.model, dtype=self.dtype, device=self.device, **extra)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{role}.engine_args: {e}") from None
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
