"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

from tqdm.auto import tqdm

from pdray.config import EngineConfig, Role
from pdray.engine.llm_engine import LLMEngine
from pdray.outputs import RequestOutput
from pdray.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """An engine plus a batch loop.

    `model` is a local Hugging Face directory or `dummy:<preset>`. Other keyword arguments are
    `EngineConfig` fields (max_model_len, max_num_seqs, block_size, enable_prefix_caching, ...).
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        role: str | Role = "mixed",
        **engine_args,
    ):
        config = EngineConfig.from_kwargs(
            model, dtype=dtype, device=device, role=role, **engine_args
        )
        if config.role is Role.DECODE:
            raise ValueError(
                "role='decode' engines take requests whose KV a prefill engine computed; "
                "use role='mixed' (or 'prefill') for offline generation"
            )
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the engine's other tensor-parallel ranks (with tensor_parallel_size > 1)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; a prompt is text or a list of token ids."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        return self._run(prompts, params, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list, rendered with the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.render_chat(
                c, add_generation_prompt=add_generation_prompt, chat_template=chat_template
            )
            for c in conversations
        ]
        return self._run(prompts, _as_params_list(sampling_params, len(prompts)), use_tqdm)

    def render_chat(
        self, conversation: list[Message], *, add_generation_prompt: bool = True, chat_template=None
    ) -> list[int]:
        tokenizer = self.engine.tokenizer
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; pass chat_template=...")
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
        )  # fmt: skip
        return tokenizer.encode(text, add_special_tokens=False)

    def _run(
        self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        engine = self.engine
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                request_id = f"offline-{next(self._ids)}"
                engine.add_request(request_id, prompt, p)
                ids.append(request_id)
        except ValueError:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            while len(results) < len(ids):
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
                        engine.release(out.request_id)
        finally:
            bar.close()
            for request_id in ids:
                if request_id not in results:
                    engine.abort_request(request_id)
        return [results[request_id] for request_id in ids]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    return prompts


def _as_params_list(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return params
