"""vLLM's tokenizer endpoints, ``/tokenize`` and ``/detokenize``."""

from __future__ import annotations

from .protocol import DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse
from .serving_engine import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    def tokenize(self, body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        self.check_model(body.model)
        if isinstance(body, TokenizeChatRequest):
            ids = self.chat_prompt_ids(body.messages, body.add_generation_prompt)
        else:
            ids = self.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        strs = self.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=strs)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        self.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))
