"""The vLLM backend, an optional extra: ``engine_module()`` imports it or says how to install it."""


def engine_module():
    """``vllm.engine`` (``VllmEngine``, ``VllmOptions``), or a RuntimeError naming the missing extra."""
    try:
        from . import engine
    except ImportError as exc:  # vLLM (or what it brings, e.g. pyzmq) is not installed
        raise RuntimeError(f"--backend vllm needs vLLM 0.32 ({exc}): pip install 'axiscap[vllm]'") from None
    return engine
