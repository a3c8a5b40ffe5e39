"""Model families moegps can hook, the Mixtral tokenizer, and the bundled trained tiny models."""
