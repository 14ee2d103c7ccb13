"""Weight quantization: stored formats (`formats.py`) and the methods that produce them (RTN, AWQ, GPTQ,
SmoothQuant), used by the `quantize-linear` pass (`llmcompress/passes/quantize_linear.py`)."""
