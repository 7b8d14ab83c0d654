"""Request bodies of the HTTP API (OpenAI's field names; unknown fields are ignored).

Types are strict (no "1" for 1, no true for 1): a wrong type is a 400 with the field's name, never a guess.
Ranges that depend on the model (context length, vocabulary) are checked in app.py.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings, as OpenAI allows
MAX_INPUTS = 2048  # texts per classify/embeddings/translate request


def _unicode(text: str) -> str:
    """JSON may carry a lone UTF-16 surrogate ("\\ud800"), which is no character: no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start}") \
            from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # every text a tokenizer will see


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Sampling(_Body):
    model: Text | None = Field(None, description="the served model's name (see GET /v1/models); optional")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, description="0: greedy (default 1)")
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="nucleus sampling (default 1)")
    top_k: int | None = Field(None, ge=0, description="extension: sample from the k most likely tokens (0: off)")
    n: int | None = Field(None, ge=1, le=MAX_N, description="choices to generate")
    stream: bool | None = Field(None, description="send server-sent events as tokens are generated")
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = Field(None, description="up to 4 strings that end the text (not included)")
    seed: int | None = Field(None, description="same seed and request: same sample")
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100]")
    user: str | None = None
    ignore_eos: bool | None = Field(None, description="extension: keep generating past end-of-text tokens")


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        "", description="text, texts, token ids, or lists of token ids")
    echo: bool | None = Field(None, description="prepend the prompt to the text")
    logprobs: int | None = Field(None, description="not supported (must be null)")
    best_of: int | None = Field(None, description="not supported beyond n")
    suffix: str | None = Field(None, description="not supported (must be empty)")


class ContentPart(_Body):
    type: str
    text: Text | None = None


class ChatMessage(_Body):
    role: str
    content: Text | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., description="the conversation so far")
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    logprobs: bool | None = Field(None, description="not supported (must be false)")
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'}")
    tools: list[Any] | None = Field(None, description="not supported")
    tool_choice: Any = None


class ClassifyRequest(_Body):
    model: Text | None = None
    input: Text | list[Text] = Field(..., description="a text or a list of texts")
    text_pair: Text | list[Text] | None = Field(None, description="for a classifier fine-tuned on text pairs: "
                                                "the second text of each input, in the same shape")


class EmbeddingsRequest(_Body):
    model: Text | None = None
    input: Text | list[Text] | list[int] | list[list[int]] = Field(..., description="a text or a list of texts")
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1, description="keep the first N dimensions (then re-normalised)")
    user: str | None = None


class AnswerRequest(_Body):
    model: Text | None = None
    question: Text
    context: Text
    max_answer_length: int | None = Field(None, ge=1, le=512)


class TranslateRequest(_Body):
    model: Text | None = None
    input: Text | list[Text] = Field(..., description="a text or a list of texts")
    max_tokens: int | None = Field(None, ge=1, description="tokens per translation at most")
