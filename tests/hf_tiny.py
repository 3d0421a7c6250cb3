"""Tiny randomly initialised Hugging Face SSL models for tests (no download): one place for their sizes."""

import torch

MODEL_TYPES = {
    "hubert": ("HubertConfig", "HubertModel"),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"),
    "wavlm": ("WavLMConfig", "WavLMModel"),
}
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(32, 32),
    conv_kernel=(10, 3),
    conv_stride=(5, 2),
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=4,
)


def tiny_hf_model(model_type: str = "hubert", seed: int = 0, **overrides):
    """A :data:`TINY` ``model_type`` model (settings overridden by ``overrides``), weights drawn under ``seed``,
    in eval mode."""
    import transformers

    cfg_name, model_name = MODEL_TYPES[model_type]
    config = getattr(transformers, cfg_name)(**{**TINY, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()
