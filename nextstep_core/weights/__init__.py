"""Weight formats: reading the official safetensors layout (reading), 8-bit and the format
dispatch (quant, int8_gpu), 4-bit (int4), ComfyUI's convention for quantized layers (convention),
pre-quantized single files (quant_file reads them, quant_write writes them) and layers streamed
from RAM per token (streaming)."""
