"""Fine-tuning engine: encoding, batching and the training loop (named steps over a typed state)."""
