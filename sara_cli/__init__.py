"""sara: fine-tune Hugging Face causal LMs with SVD-based adapters."""

__version__ = "0.1.0"
