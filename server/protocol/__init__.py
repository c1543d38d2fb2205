"""OpenAI wire format: request bodies, response bodies and the error object, a module per endpoint
(``chat``, ``completions``, ``responses``, ``tokenization``, ``models``) and what they share (``shared``).

Vendor extensions (sent by the OpenAI SDK through ``extra_body``):
  ``capping``             bool or "auto", request body: cap along the Assistant Axis (default: the
                          server's); "auto" caps from where the conversation or the answer drifts
  ``return_projections``  bool, request body: add ``axis_projections`` to each choice
  ``repetition_penalty``, ``min_tokens``, ``ignore_eos``: vLLM's sampling extensions
Responses add ``capping`` (whether it was applied, or "auto") at the top level, and a gated
request's choices ``capping_from`` (the index of the first token generated capped). The tokenizer endpoints
(``/tokenize``, ``/detokenize``, ``/version``) take and give what vLLM's do.
"""

from .chat import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                   ChatCompletionRequest, ChatDelta, ChatLogprobs, ChatMessage, ChatTokenLogprob, ConversationDrift,
                   DeltaToolCall, MessageProjection, PromptProjections, ResponseFunction, ResponseToolCall, Tool)
from .completions import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from .models import ModelCard, ModelList, VersionResponse
from .responses import ResponsesRequest
from .shared import (APIError, TopLogprob, Usage, _GenerationBody, error_body, new_id, now,
                     validation_message)
from .tokenization import (DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizeCompletionRequest,
                           TokenizeResponse)

__all__ = ["APIError", "AssistantMessage", "ChatChoice", "ChatChunkChoice", "ChatCompletion", "ChatCompletionChunk",
           "ChatCompletionRequest", "ChatDelta", "ChatLogprobs", "ChatMessage", "ChatTokenLogprob", "Completion",
           "CompletionChoice", "CompletionLogprobs", "CompletionRequest", "ConversationDrift", "DeltaToolCall",
           "DetokenizeRequest", "DetokenizeResponse", "MessageProjection", "ModelCard", "ModelList",
           "PromptProjections", "ResponseFunction", "ResponseToolCall", "ResponsesRequest", "TokenizeChatRequest",
           "TokenizeCompletionRequest", "TokenizeResponse", "Tool", "TopLogprob", "Usage", "VersionResponse",
           "_GenerationBody", "error_body", "new_id", "now", "validation_message"]
