"""File names of the artifacts ``dreamguide train`` writes, read by everything that loads them."""

LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"
