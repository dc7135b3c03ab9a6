"""ChatGLM-6B (v1) for current transformers: its configuration, model and tokenizer as the upstream code
defines them (`configuration`, `modeling`, `tokenization`), loading and converting its folders (`loading`;
what a folder must hold is checked in `fedtune.model.folders`), and the registration with transformers'
Auto classes (`register`) that `import fedtune` arranges without importing torch."""
