"""Models built offline for the recipes that need no hub: a tiny GPT-2 trained briefly on BBC
text (tiny_decoder), random-weight BERT-shaped encoders (random_encoder). Each writes a normal
Hugging Face folder atomically; the Makefile's model rules call them."""
