"""The language model provider: chat completions through the ``openai`` SDK.

OpenAI itself (``OPENAI_API_KEY``), or any compatible server through ``OPENAI_BASE_URL``
(Ollama, vLLM, llama.cpp). SDK errors become domain errors: transient ones retryable, the
rest permanent. The SDK is imported on first use, not at import.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from cpa_scheduler import errors, settings

log = logging.getLogger("cpa.llm")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    model: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "latency_ms": round(self.latency_ms, 1), "model": self.model}  # fmt: skip


class Provider(Protocol):
    async def chat(
        self, messages: list[dict[str, str]], *, schema: dict[str, Any] | None, temperature: float
    ) -> tuple[str, Usage]:
        """The assistant's text (JSON when a schema is given) and the call's usage."""


def _map_error(exc: Exception) -> errors.CpaError:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return errors.RetryableError(f"The language model timed out: {exc}.")
    if isinstance(exc, openai.APIConnectionError):
        return errors.RetryableError(f"The language model is unreachable: {exc}.")
    if isinstance(exc, openai.RateLimitError):
        return errors.RetryableError("The language model is rate limited (429); retrying later.")
    if isinstance(exc, openai.InternalServerError):
        return errors.RetryableError(
            f"The language model failed ({exc.status_code}); retrying later."
        )
    if isinstance(exc, openai.APIStatusError):
        return errors.PermanentError(
            f"The language model rejected the request ({exc.status_code}): {exc.message}"
        )
    return errors.PermanentError(f"The language model call failed: {exc}")


class OpenAIProvider:
    """Chat completions through the ``openai`` SDK (OpenAI or any compatible server)."""

    def __init__(
        self,
        *,
        model: str,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 1,
        http_client: Any = None,
    ) -> None:
        import openai  # imported here: the SDK is slow to import and most paths never call it

        self.model = model
        self._client = openai.AsyncOpenAI(
            api_key=api_key or "not-needed",  # Ollama and friends ignore it; the SDK needs one
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            http_client=http_client,
        )

    async def chat(
        self, messages: list[dict[str, str]], *, schema: dict[str, Any] | None, temperature: float
    ) -> tuple[str, Usage]:
        import openai

        kwargs: dict[str, Any] = {}
        if schema is not None:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "plan", "strict": True, "schema": schema},
            }
        started = time.perf_counter()
        try:
            completion = await self._client.chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                temperature=temperature,
                **kwargs,
            )
        except openai.OpenAIError as exc:
            raise _map_error(exc) from None
        latency = (time.perf_counter() - started) * 1000
        choice = completion.choices[0]
        refusal = getattr(choice.message, "refusal", None)
        if refusal:
            raise errors.PermanentError(f"The language model refused: {refusal}")
        usage = completion.usage
        info = Usage(
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            latency_ms=latency,
            model=completion.model,
        )
        log.info("llm call model=%s tokens=%s+%s latency_ms=%.0f", info.model,
                 info.prompt_tokens, info.completion_tokens, latency)  # fmt: skip
        return choice.message.content or "", info


def provider_from(config: settings.Settings, *, http_client: Any = None) -> Provider | None:
    """OpenAI when OPENAI_API_KEY is set, a compatible server with OPENAI_BASE_URL, else None."""
    if not config.planner_configured:
        return None
    return OpenAIProvider(
        model=config.llm_model,
        api_key=config.openai_api_key,
        base_url=config.openai_base_url,
        http_client=http_client,
    )
