"""Label Studio tokens that /setup handed over, on their way to a worker or the trainer.

rq keeps a job's spec in Redis (and so in its AOF) for as long as it keeps the job; a token in it
would outlive its use by days. A spec carries a reference instead, and the token waits in a
short-lived Redis entry, renewed each time it is handed over again. LABEL_STUDIO_API_KEY never
travels: every process reads it from its own environment.
"""

from __future__ import annotations

import hashlib

from redis import Redis

from ml_backend.schemas import RedisKeys

TOKEN_TTL_S = 3600  # a predict job older than this has long timed out


def token_ref(token: str) -> str:
    """The reference of ``token``: one Redis entry per token, however often it travels."""
    return hashlib.sha256(f"talk2sam-token|{token}".encode()).hexdigest()[:32]


def hand_over(redis: Redis, keys: RedisKeys, token: str | None,
              ttl_s: int = TOKEN_TTL_S) -> str | None:
    """Store ``token`` for at least ``ttl_s`` more seconds (a longer life it has, for a
    training job, is kept); its reference, or None for no token."""
    if not token:
        return None
    ref = token_ref(token)
    key = keys.handed_token(ref)
    pipe = redis.pipeline()
    pipe.set(key, token, nx=True, ex=ttl_s)
    pipe.ttl(key)
    _, left = pipe.execute()
    if left < ttl_s:
        redis.expire(key, ttl_s)
    return ref


def collect(redis: Redis, keys: RedisKeys, ref: str | None) -> str | None:
    """The token handed over as ``ref``, or None (none, or it expired)."""
    if not ref:
        return None
    raw = redis.get(keys.handed_token(ref))
    return raw.decode() if isinstance(raw, bytes) else raw
