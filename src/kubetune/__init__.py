"""kubetune: the LLM fine-tune → merge → quantize → infer → evaluate lifecycle, locally or as Kubernetes Jobs."""

__version__ = "0.1.0"
