"""Hugging Face ``transformers`` causal LMs as targets: loading (local files only), topology per
architecture family, the tokenizer behind the text tools, and text data from a file."""
