"""ChatGLM-6B (v1) for current transformers: its configuration, model and tokenizer as the upstream code defines
them (`configuration`, `modeling`, `tokenization`), reading and converting its folders (`folders`), and the
registration with transformers' Auto classes (`register`) that `import fedtune` arranges without importing torch."""
