"""MLLM domain priors: describe clean training images with a multimodal LLM (vLLM on Ray Data) and embed the
descriptions."""
