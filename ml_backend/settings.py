"""Backend settings: the one place that reads the environment.

Every setting has one environment variable; Label Studio's own names are kept where it has one
(``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``, ``MODEL_DIR``, ``BASIC_AUTH_USER``,
``BASIC_AUTH_PASS``). ``Settings.from_env(os.environ)`` validates everything at start-up and
raises :class:`SettingsError` naming the first bad variable. The object is frozen and passed
down explicitly; no other module reads ``os.environ``.

| variable | default | meaning |
|---|---|---|
| LABEL_STUDIO_URL (or LABEL_STUDIO_HOST) | unset | base URL of Label Studio, used to download task images; when unset the ``hostname`` sent to /setup is used |
| LABEL_STUDIO_API_KEY (or LABEL_STUDIO_ACCESS_TOKEN) | unset | legacy token or personal access token (JWT refresh token), sent only to LABEL_STUDIO_URL and LABEL_STUDIO_ORIGINS; when unset the ``access_token`` sent to /setup is used, and only with the ``hostname`` of the same call |
| LABEL_STUDIO_ORIGINS | empty | further Label Studio origins (comma-separated ``http(s)://host[:port]``) that may call /setup and receive tokens; with this or LABEL_STUDIO_URL set, a /setup naming any other ``hostname`` is refused (400) |
| MODEL_DIR (or TALK2SAM_WEIGHTS_DIR) | ``~/.cache/talk2sam/weights`` | directory of model weights, the same for ``talk2sam download-weights`` and the workers (the backend's default was ``.cache/talk2sam`` in the working folder: move its files, or set MODEL_DIR to it) |
| BASIC_AUTH_USER / BASIC_AUTH_PASS | unset | HTTP basic auth on every route but /health (/webhook included: docs/RELIABILITY.md shows the webhook header to set in Label Studio); both or neither |
| API_TOKEN | unset | bearer token (``Authorization: Bearer <token>``) accepted on the same routes, beside basic auth |
| MAX_REQUEST_BYTES | 20971520 | larger request bodies are refused with 413 before they are parsed |
| IMAGE_HOST_ALLOWLIST | empty | hosts (``host`` or ``host:port``, comma-separated) besides Label Studio's own that absolute http(s) image URLs may point to; ``*``: any host |
| REDIS_URL | ``redis://127.0.0.1:6379/1`` | Redis for the job queue; database 0 is refused (Label Studio keeps its own rq queues there) |
| KEY_PREFIX | ``talk2sam:`` | prefix of every queue name and key of ours |
| JOB_TIMEOUT_S | 90 | longest a /predict waits for its jobs; below Label Studio's 100 s predict timeout |
| QUEUE_MAX_DEPTH | 64 | jobs waiting in the shared queue above which /predict answers 503 at once |
| BATCH_WINDOW | 8 | jobs of one Retrieve-predictions request waiting at a time (the rest are submitted as these finish) |
| LABEL_PROMPTS | empty | label -> text prompt, JSON object or ``"Power line=wire;Fence=fence"``; unmapped labels are their own prompt. Per project: the model's *Extra params* in Label Studio, ``{"label_prompts": {...}}``, over this |
| MODEL | ``talk2sam`` | ``talk2sam`` (the real predictor), ``noop`` (rectangles, score 1.0: queue-overhead benchmarks and tests only) or ``random`` (MODEL_CONFIG's architecture with random weights, no file read: timing benchmarks only, its masks mean nothing) |
| MODEL_CONFIG | ``tiny`` | predictor config name (``tiny``, ``tiny-768`` (the demo's), ``vit_b``, ``vit_l``, ``vit_h``, ``vit_tiny``) |
| MODEL_CHECKPOINT | unset | path of a Talk2SAM checkpoint of trained parts |
| MODEL_VERSION | unset | model_version reported to Label Studio; unset: the one the workers report |
| DEVICE | unset | torch device of the workers; unset: CUDA when available, else CPU |
| ENCODER_DTYPE | ``auto`` | dtype of the two image encoders: ``auto`` (bfloat16 on CUDA and on CPUs with native bfloat16, else float32), ``float32`` or ``bfloat16``; the decoder always runs in float32 |
| TORCH_THREADS | unset | CPU math threads per worker; unset: torch's default (all cores). Several CPU workers on one host: cores / workers |
| IMAGE_CACHE_SIZE | 8 | images whose features a worker keeps (LRU) |
| IMAGE_CACHE_MB | 1024 | bytes of those features at most (ViT-H with DINOv2 ViT-L: about 30 MiB an image in float32); images warmed for a batch never evict the ones predict jobs used |
| HEAD_CACHE_SIZE | 16 | projects' fine-tuned heads (trained parts: decoder, psi, mask-prompt encoder, gate) a worker keeps in memory beside its one base model (LRU) |
| HEAD_CACHE_MB | 512 | bytes of those heads at most (vit_b: about 26 MiB a head, vit_tiny: 24 MiB); a project whose head was evicted reloads it from its checkpoint |
| MASK_BOX_MARGIN_PX | 0.0 | drop mask pixels centred farther than this outside their box; -1 keeps all (text alone always cuts to the boxes it found) |
| IMAGE_DOWNLOAD_CACHE_MB | 256 | downloaded image bytes a worker keeps in memory, by URL |
| IMAGE_DOWNLOAD_DIR | unset | when set, downloaded images are also cached on disk there |
| IMAGE_FETCH_TIMEOUT_S | 20 | timeout of one image download |
| MAX_IMAGE_PIXELS | 100000000 | larger images are refused (decompression-bomb guard) |
| MAX_IMAGE_DOWNLOAD_MB | 512 | an image download (or ``data:`` URI) larger than this is refused while it streams |
| MAX_PIXEL_PROMPTS | 1073741824 | image pixels x prompts of one request at most (a worker's memory grows with both): 256 prompts on a 4 MP image, 89 on a 12 MP (4000x3000) photo; more is refused (400 naming it) |
| WORKER_HEARTBEAT_TTL_S | 5 | a worker that has not refreshed its heartbeat for this long counts as dead |
| STICKY_WAIT_S | 2.0 | how long a job routed to the worker holding its image may wait before it moves to the shared queue |
| FIND_THRESHOLD | 0.5 | text alone (no box): share of the word's similarity map range a patch must reach to start a region (lower finds more) |
| FIND_MAX_REGIONS | 20 | text alone: at most this many regions per image |
| WARM_ON_OPEN | true | batch tasks with no box enqueue a low-priority job that caches their image's features |
| LOG_LEVEL | ``INFO`` | Python logging level |
| PROMETHEUS_MULTIPROC_DIR | unset | prometheus_client's multiprocess folder: /metrics sums the web processes' counters (``python -m ml_backend.app --workers N`` makes one when unset) |
| VERSIONS_DIR | unset | where ``versions.json`` and fine-tuned checkpoints are written (shared by trainer and workers); unset: MODEL_DIR |
| TRAIN_EVERY_N | 0 | request a fine-tuning job after this many new annotations of a project; 0: only on START_TRAINING |
| TRAIN_EPOCHS | 2 | epochs of one fine-tuning job |
| TRAIN_LR | 0.0005 | learning rate of fine-tuning (AdamW; on ten corrected wire tasks the demo's IoU on other tasks went 0.40 -> 0.80 in 100 steps) |
| TRAIN_OPTIMIZER | ``adamw`` | ``adamw`` or ``sgd`` (the paper's) |
| TRAIN_BATCH_SIZE | 4 | objects per optimiser step |
| TRAIN_MIN_STEPS | 100 | optimiser steps a job runs at least (more epochs when the corrected objects are few) |
| TRAIN_LOSS_POINTS | 12544 | points sampled by the BCE + Dice loss per mask (SAM-HQ: 112 x 112) |
| TRAIN_HOLDOUT_PERCENT | 20 | share of tasks (by a hash of the task id, stable) held out for evaluation |
| TRAIN_TIMEOUT_S | 3600 | longest one fine-tuning job may run |
| TRAIN_QUEUE_TTL_S | 600 | a fine-tuning job that no trainer took within this long expires (the next request queues a new one) |
| ANNOTATION_STORE_MB | 256 | bytes of webhook annotations kept in Redis; a webhook that would outgrow it is refused (507) |
| PROMOTE_MIN_GAIN | 0.0 | the new version serves its project only when the low end of its held-out IoU gain over the project's serving version (paired bootstrap interval at PROMOTE_CONFIDENCE) is above this, and its mean IoU on the same objects beats box-only SAM-HQ's |
| PROMOTE_CONFIDENCE | 0.9 | the two-sided confidence of that interval (0.9: the gain is above its low end with 95 % confidence) |
| PROMOTE_MIN_HELDOUT_OBJECTS | 5 | a new version is judged on at least this many held-out objects: with fewer the job is refused before training, saying how many there were |
| PROMOTE_MIN_HELDOUT_TASKS | 3 | and those objects come from at least this many held-out tasks (the split holds out this many when the project has twice as many) |
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import parse_qs, urlparse

from ml_backend.errors import SettingsError
from talk2sam.find import DEFAULT_MAX_REGIONS, DEFAULT_THRESHOLD  # numpy only
from talk2sam.weights import DEFAULT_WEIGHTS_DIR, weights_dir  # file registry: no torch

T = TypeVar("T")

MODELS = ("talk2sam", "noop", "random")
ENCODER_DTYPES = ("auto", "float32", "bfloat16")
TRAIN_OPTIMIZERS = ("adamw", "sgd")
LABEL_STUDIO_PREDICT_TIMEOUT_S = 100
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Settings:
    """Validated configuration of the app and the workers (see the module docstring)."""

    label_studio_url: str | None = None
    label_studio_api_key: str | None = None
    label_studio_origins: tuple[str, ...] = ()
    model_dir: str = str(DEFAULT_WEIGHTS_DIR)
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    api_token: str | None = None
    max_request_bytes: int = 20 * 2**20
    image_host_allowlist: tuple[str, ...] = ()
    redis_url: str = "redis://127.0.0.1:6379/1"
    key_prefix: str = "talk2sam:"
    job_timeout_s: int = 90
    queue_max_depth: int = 64
    batch_window: int = 8
    label_prompts: Mapping[str, str] = field(default_factory=dict)
    model: str = "talk2sam"
    model_config: str = "tiny"
    model_checkpoint: str | None = None
    model_version: str | None = None
    device: str | None = None
    encoder_dtype: str = "auto"
    torch_threads: int | None = None
    image_cache_size: int = 8
    image_cache_mb: int = 1024
    head_cache_size: int = 16
    head_cache_mb: int = 512
    mask_box_margin_px: float = 0.0  # negative: keep the model's mask as it is
    image_download_cache_mb: int = 256
    image_download_dir: str | None = None
    image_fetch_timeout_s: float = 20.0
    max_image_pixels: int = 100_000_000
    max_image_download_mb: int = 512
    max_pixel_prompts: int = 1 << 30
    worker_heartbeat_ttl_s: int = 5
    sticky_wait_s: float = 2.0
    warm_on_open: bool = True
    find_threshold: float = DEFAULT_THRESHOLD
    find_max_regions: int = DEFAULT_MAX_REGIONS
    log_level: str = "INFO"
    prometheus_multiproc_dir: str | None = None
    versions_dir: str | None = None
    train_every_n: int = 0
    train_epochs: int = 2
    train_lr: float = 5e-4
    train_optimizer: str = "adamw"
    train_batch_size: int = 4
    train_min_steps: int = 100
    train_loss_points: int = 112 * 112
    train_holdout_percent: int = 20
    train_timeout_s: int = 3600
    train_queue_ttl_s: int = 600
    annotation_store_mb: int = 256
    promote_min_gain: float = 0.0
    promote_confidence: float = 0.9
    promote_min_heldout_objects: int = 5
    promote_min_heldout_tasks: int = 3

    @property
    def versions_path(self) -> str:
        """Directory of ``versions.json`` and the fine-tuned checkpoints."""
        return self.versions_dir or self.model_dir

    @property
    def trusted_label_studios(self) -> tuple[str, ...]:
        """LABEL_STUDIO_URL and LABEL_STUDIO_ORIGINS: where tokens may go, who may call /setup
        (empty: any /setup hostname is adopted, with only the token of the same call)."""
        return ((self.label_studio_url,) if self.label_studio_url else ()) + \
            self.label_studio_origins

    def trusts(self, url: str | None) -> bool:
        """True when ``url`` is on the origin of a trusted Label Studio."""
        return url is not None and url_origin(url) in {
            url_origin(trusted) for trusted in self.trusted_label_studios}

    def api_key_for(self, url: str | None) -> str | None:
        """LABEL_STUDIO_API_KEY when ``url`` is a trusted Label Studio, else None: the key never
        goes to a host that only a /setup call named."""
        return self.label_studio_api_key if self.trusts(url) else None

    @property
    def basic_auth_enabled(self) -> bool:
        return self.basic_auth_user is not None

    @property
    def box_margin_px(self) -> float | None:
        """MASK_BOX_MARGIN_PX as the predictor takes it: None (a negative setting) keeps the
        model's mask as it is."""
        return self.mask_box_margin_px if self.mask_box_margin_px >= 0 else None

    @property
    def auth_enabled(self) -> bool:
        """Basic auth or the bearer token guards the routes."""
        return self.basic_auth_enabled or self.api_token is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build and validate settings from an environment mapping.

        Args:
            env: usually ``os.environ``; empty values count as unset.

        Returns:
            The settings.

        Raises:
            SettingsError: naming the first variable whose value is invalid.
        """
        d = cls()
        get = _Reader(env)
        settings = cls(
            # the names of Label Studio's own ML backend examples work as well
            label_studio_url=get.opt("LABEL_STUDIO_URL", _http_url)
            or get.opt("LABEL_STUDIO_HOST", _http_url),
            label_studio_api_key=get.opt("LABEL_STUDIO_API_KEY", str)
            or get.opt("LABEL_STUDIO_ACCESS_TOKEN", str),
            label_studio_origins=get("LABEL_STUDIO_ORIGINS", _url_list, d.label_studio_origins),
            model_dir=str(weights_dir(env=env)),  # MODEL_DIR, its older name, the default
            basic_auth_user=get.opt("BASIC_AUTH_USER", str),
            basic_auth_pass=get.opt("BASIC_AUTH_PASS", str),
            api_token=get.opt("API_TOKEN", str),
            max_request_bytes=get("MAX_REQUEST_BYTES", _int_in(1024, 2**31), d.max_request_bytes),
            image_host_allowlist=get("IMAGE_HOST_ALLOWLIST", _host_list, d.image_host_allowlist),
            redis_url=get("REDIS_URL", _redis_url, d.redis_url),
            key_prefix=get("KEY_PREFIX", _key_prefix, d.key_prefix),
            job_timeout_s=get("JOB_TIMEOUT_S", _int_in(1, LABEL_STUDIO_PREDICT_TIMEOUT_S - 1),
                              d.job_timeout_s),
            queue_max_depth=get("QUEUE_MAX_DEPTH", _int_in(1, 100_000), d.queue_max_depth),
            batch_window=get("BATCH_WINDOW", _int_in(1, 1024), d.batch_window),
            label_prompts=get("LABEL_PROMPTS", parse_label_prompts, {}),
            model=get("MODEL", _one_of(MODELS), d.model),
            model_config=get("MODEL_CONFIG", str, d.model_config),
            model_checkpoint=get.opt("MODEL_CHECKPOINT", str),
            model_version=get.opt("MODEL_VERSION", str),
            device=get.opt("DEVICE", str),
            encoder_dtype=get("ENCODER_DTYPE", _one_of(ENCODER_DTYPES), d.encoder_dtype),
            torch_threads=get.opt("TORCH_THREADS", _int_in(1, 1024)),
            image_cache_size=get("IMAGE_CACHE_SIZE", _int_in(1, 1024), d.image_cache_size),
            image_cache_mb=get("IMAGE_CACHE_MB", _int_in(1, 1_000_000), d.image_cache_mb),
            head_cache_size=get("HEAD_CACHE_SIZE", _int_in(1, 10_000), d.head_cache_size),
            head_cache_mb=get("HEAD_CACHE_MB", _int_in(1, 1_000_000), d.head_cache_mb),
            mask_box_margin_px=get("MASK_BOX_MARGIN_PX", _float_in(-1.0, 10_000.0),
                                   d.mask_box_margin_px),
            image_download_cache_mb=get("IMAGE_DOWNLOAD_CACHE_MB", _int_in(0, 1_000_000),
                                        d.image_download_cache_mb),
            image_download_dir=get.opt("IMAGE_DOWNLOAD_DIR", str),
            image_fetch_timeout_s=get("IMAGE_FETCH_TIMEOUT_S", _float_in(0.1, 600.0),
                                      d.image_fetch_timeout_s),
            max_image_pixels=get("MAX_IMAGE_PIXELS", _int_in(1, 10**10), d.max_image_pixels),
            max_image_download_mb=get("MAX_IMAGE_DOWNLOAD_MB", _int_in(1, 1 << 20),
                                      d.max_image_download_mb),
            max_pixel_prompts=get("MAX_PIXEL_PROMPTS", _int_in(1, 1 << 50), d.max_pixel_prompts),
            worker_heartbeat_ttl_s=get("WORKER_HEARTBEAT_TTL_S", _int_in(2, 600),
                                       d.worker_heartbeat_ttl_s),
            sticky_wait_s=get("STICKY_WAIT_S", _float_in(0.0, 60.0), d.sticky_wait_s),
            warm_on_open=get("WARM_ON_OPEN", _bool, d.warm_on_open),
            find_threshold=get("FIND_THRESHOLD", _float_in(0.0, 1.0), d.find_threshold),
            find_max_regions=get("FIND_MAX_REGIONS", _int_in(1, 256), d.find_max_regions),
            log_level=get("LOG_LEVEL", _log_level, d.log_level),
            prometheus_multiproc_dir=get.opt("PROMETHEUS_MULTIPROC_DIR", str),
            versions_dir=get.opt("VERSIONS_DIR", str),
            train_every_n=get("TRAIN_EVERY_N", _int_in(0, 1_000_000), d.train_every_n),
            train_epochs=get("TRAIN_EPOCHS", _int_in(1, 10_000), d.train_epochs),
            train_lr=get("TRAIN_LR", _float_in(1e-9, 1.0), d.train_lr),
            train_optimizer=get("TRAIN_OPTIMIZER", _one_of(TRAIN_OPTIMIZERS),
                                d.train_optimizer),
            train_batch_size=get("TRAIN_BATCH_SIZE", _int_in(1, 4096), d.train_batch_size),
            train_min_steps=get("TRAIN_MIN_STEPS", _int_in(0, 1_000_000), d.train_min_steps),
            train_loss_points=get("TRAIN_LOSS_POINTS", _int_in(16, 1 << 24),
                                  d.train_loss_points),
            train_holdout_percent=get("TRAIN_HOLDOUT_PERCENT", _int_in(1, 90),
                                      d.train_holdout_percent),
            train_timeout_s=get("TRAIN_TIMEOUT_S", _int_in(10, 7 * 86400), d.train_timeout_s),
            train_queue_ttl_s=get("TRAIN_QUEUE_TTL_S", _int_in(5, 7 * 86400),
                                  d.train_queue_ttl_s),
            annotation_store_mb=get("ANNOTATION_STORE_MB", _int_in(1, 1_000_000),
                                    d.annotation_store_mb),
            promote_min_gain=get("PROMOTE_MIN_GAIN", _float_in(-1.0, 1.0), d.promote_min_gain),
            promote_confidence=get("PROMOTE_CONFIDENCE", _float_in(0.5, 0.999),
                                   d.promote_confidence),
            promote_min_heldout_objects=get("PROMOTE_MIN_HELDOUT_OBJECTS", _int_in(1, 1_000_000),
                                            d.promote_min_heldout_objects),
            promote_min_heldout_tasks=get("PROMOTE_MIN_HELDOUT_TASKS", _int_in(1, 1_000_000),
                                          d.promote_min_heldout_tasks),
        )
        if (settings.basic_auth_user is None) != (settings.basic_auth_pass is None):
            missing = "BASIC_AUTH_PASS" if settings.basic_auth_pass is None else "BASIC_AUTH_USER"
            raise SettingsError(missing, "BASIC_AUTH_USER and BASIC_AUTH_PASS go together")
        return settings


class _Reader:
    """Reads one variable, converts it and names the variable when conversion fails."""

    def __init__(self, env: Mapping[str, str]):
        self._env = env

    def __call__(self, name: str, convert: Callable[[str], T], default: T) -> T:
        value = self.opt(name, convert)
        return default if value is None else value

    def opt(self, name: str, convert: Callable[[str], T]) -> T | None:
        raw = self._env.get(name, "").strip()
        if not raw:
            return None
        try:
            return convert(raw)
        except (ValueError, TypeError) as exc:
            raise SettingsError(name, f"{exc} (got {raw!r})") from None


def parse_label_prompts(raw: str) -> dict[str, str]:
    """Parse the label -> text prompt mapping.

    Args:
        raw: a JSON object of strings, or ``"label=prompt;label=prompt"``.

    Returns:
        The mapping; labels and prompts are stripped and must be non-empty.

    Raises:
        ValueError: on malformed input.
    """
    if raw.lstrip().startswith("{"):
        parsed = json.loads(raw)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()):
            raise ValueError("the JSON object must map strings to strings")
        pairs = list(parsed.items())
    else:
        pairs = []
        for item in filter(None, (part.strip() for part in raw.split(";"))):
            label, sep, prompt = item.partition("=")
            if not sep:
                raise ValueError(f"expected label=prompt, got {item!r}")
            pairs.append((label, prompt))
    mapping = {label.strip(): prompt.strip() for label, prompt in pairs}
    if any(not label or not prompt for label, prompt in mapping.items()):
        raise ValueError("labels and prompts must be non-empty")
    return mapping


def settings_for_command(env: Mapping[str, str]) -> Settings | None:
    """Settings for a command's ``main``: None after telling stderr which variable is invalid
    (the command then exits with status 2)."""
    try:
        return Settings.from_env(env)
    except SettingsError as exc:
        print(f"invalid setting {exc}", file=sys.stderr)
        return None


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        value = int(raw)
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return convert


def _float_in(low: float, high: float) -> Callable[[str], float]:
    def convert(raw: str) -> float:
        value = float(raw)
        if not low <= value <= high:  # also rejects NaN
            raise ValueError(f"must be between {low} and {high}")
        return value

    return convert


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return raw

    return convert


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _http_url(raw: str) -> str:
    parsed = urlparse(raw)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return raw.rstrip("/")


def _url_list(raw: str) -> tuple[str, ...]:
    return tuple(_http_url(u.strip()) for u in raw.split(",") if u.strip())


def url_origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in; user info ignored."""
    parsed = urlparse(url)
    try:
        port = parsed.port or _DEFAULT_PORTS.get(parsed.scheme)
    except ValueError:  # a port that is not a number
        port = -1
    return parsed.scheme, (parsed.hostname or "").lower(), port


def _redis_url(raw: str) -> str:
    parsed = urlparse(raw)
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    db_text = parse_qs(parsed.query).get("db", [None])[0]
    if db_text is None and parsed.scheme != "unix":
        db_text = parsed.path.lstrip("/") or None
    db = int(db_text) if db_text is not None else 0
    if db == 0:
        raise ValueError(
            "must select a database other than 0 (Label Studio keeps its rq queues in 0), "
            "e.g. redis://127.0.0.1:6379/1"
        )
    return raw


def _host_list(raw: str) -> tuple[str, ...]:
    hosts = tuple(h.strip().lower() for h in raw.split(",") if h.strip())
    for host in hosts:
        if host != "*" and ("/" in host or "@" in host or any(ch.isspace() for ch in host)):
            raise ValueError(f"expected host or host:port entries, got {host!r}")
    return hosts


def _key_prefix(raw: str) -> str:
    if any(ch.isspace() for ch in raw):
        raise ValueError("must not contain whitespace")
    return raw


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in logging.getLevelNamesMapping():
        raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level
