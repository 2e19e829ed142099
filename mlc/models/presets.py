"""Named architecture configs (HF config.json fields) for dummy-weight benchmarks."""

from __future__ import annotations

from mlc.errors import MLCError

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
                         vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "tinyllama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632,
                           num_attention_heads=32, num_key_value_heads=4, num_hidden_layers=22,
                           vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0,
                           max_position_embeddings=2048),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                       num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32,
                       vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=4096),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                       num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
                       vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=8192),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
                         vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                         max_position_embeddings=131072, rope_scaling=_LLAMA3_ROPE),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672,
                        num_attention_heads=64, num_key_value_heads=8, num_hidden_layers=80,
                        vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                        max_position_embeddings=8192),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                       num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
                       vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=32768, sliding_window=4096),
    "phi-2": dict(model_type="phi", hidden_size=2560, intermediate_size=10240,
                  num_attention_heads=32, num_hidden_layers=32, vocab_size=51200,
                  layer_norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=0.4,
                  hidden_act="gelu_new", max_position_embeddings=2048),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                         num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=24,
                         vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                       num_attention_heads=28, num_key_value_heads=4, num_hidden_layers=28,
                       vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       max_position_embeddings=32768),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     num_hidden_layers=36, vocab_size=151936, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, max_position_embeddings=40960),
    "gemma3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                        num_hidden_layers=18, vocab_size=262144, rms_norm_eps=1e-6,
                        sliding_window=512, max_position_embeddings=32768),
    "gemma3-1b": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                      num_hidden_layers=26, vocab_size=262144, rms_norm_eps=1e-6,
                      sliding_window=512, max_position_embeddings=32768),
}


def get_preset(name: str) -> dict:
    """An HF-style config dict by preset name, or an error listing the presets."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise MLCError(f"Unknown model config {name!r}; presets: {', '.join(PRESETS)}.",
                       param="model_config") from None
