"""`mlc_llm.protocol.error_protocol`: the error a bad request raises.

mlc's server answers OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`
with status 400, where MLC-LLM answers `{"object": "error", "message", "code"}`.
"""

from mlc.errors import BadRequestError

__all__ = ["BadRequestError"]
