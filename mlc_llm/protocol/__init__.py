"""`mlc_llm.protocol`, as in MLC-LLM: the request/response types of its Python API and server.

    openai_api_protocol   the OpenAI types (mlc's own, under MLC-LLM's names) and the
                          *_MAX_TOP_LOGPROBS limits
    generation_config     GenerationConfig (MLC-LLM's low-level sampling config)
    debug_protocol        DebugConfig, DisaggConfig
    error_protocol        BadRequestError
"""
