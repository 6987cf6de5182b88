"""What a request must present, and how a reject is answered.

Owns: token extraction (`extract`), the route's claim and scope policy (`policy`), API keys
(`apikeys`), DPoP rules (`dpop`), the replay store (`replay`: the in-process store and the
factory; `replay_redis` over our own RESP client `redis_resp`; `replay_codes`, shared by
both), and the precomputed reject and error responses (`responses`, serialised by `wire`).
Each compiles its part of the config into runtime tables at start-up.
May import: `fastgate.token`, `fastgate.config`, the leaf modules.
"""
