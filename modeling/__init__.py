"""Single-device model code for the omnimodal sparse-MoE LLM.

Every module here imports only torch, transformers, safetensors, numpy, the standard library and its siblings
(relative imports), so the folder's files can be copied next to exported weights for `trust_remote_code` loading.
"""
