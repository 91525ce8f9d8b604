"""Stage engines (compute), backends (in-process / Triton) and the stage workers around them."""
