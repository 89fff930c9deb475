"""Weight formats: reading the official safetensors layout (reading), 8-bit and the format
dispatch (quant), 4-bit (int4), pre-quantized single files (quant_file) and layers streamed from
RAM per token (streaming)."""
