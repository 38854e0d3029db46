"""The unit tests' model."""


def tiny_llama(vocab_size=256, tie=False):
    """A Llama of 2 layers, hidden 32, grouped-query attention, seeded: the unit tests' model."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
