"""The embedded demo: three sources, a validation set and a sentencepiece tokenizer (tools/make_demo_data.py)."""
