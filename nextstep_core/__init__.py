"""NextStep-1 inference engine, usable without ComfyUI.

Import the parts you need from their modules (`nextstep_core.pipeline`, `.checkpoint`, ...);
this package import stays free of torch so that tools can inspect it cheaply.
"""
__version__ = "0.1.0"
