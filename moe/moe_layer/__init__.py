"""The MoE layer as router -> token dispatcher -> experts (megatron-core's moe package).

    router.py      the routing rule (scores, group-limited top-k, bias, gates), the
                   balance losses and MaxVio; :class:`Router`
    dispatcher.py  token copies to expert-contiguous rows and back (LocalDispatcher,
                   TritonDispatcher; the all-to-all one is moe.parallel.expert_parallel's)
    experts.py     the experts' SwiGLU over their segments (grouped_mm, loop, Triton)
    layer.py       MoEFeedForward: shared experts + router + dispatcher + experts

Import from those modules; this package file hands nothing on.
"""
