"""Training loops on DeepSpeed: pre-training now; fine-tuning and evaluation build on the same parts."""
