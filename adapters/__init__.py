"""Backend adapters: each module turns Open Inference Protocol calls into one backend's protocol.

The gateway only ever sees the narrow `Adapter` interface in `adapters.base`.
"""
