"""KServe v2 / Open Inference Protocol: the .proto and its generated stubs (see ../codegen.py)."""
