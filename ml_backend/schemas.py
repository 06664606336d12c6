"""What the web process and the inference workers exchange through Redis: predict job specs
and results, worker heartbeats, the names of our Redis keys, and :func:`known_fields`, the
tolerant reading every record crossing Redis goes through (the training requests, version records
and recorded annotations of their own modules too).

The records are JSON-able frozen dataclasses (rq's ``JSONSerializer`` carries ``to_dict()`` as
job kwargs and return values; nothing is pickled), so that both sides agree without importing
each other. This module imports nothing of ours.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any
from urllib.parse import urlsplit

PREDICT_JOB = "ml_backend.worker.predict_job"
WARM_JOB = "ml_backend.worker.warm_job"
TRAIN_JOB = "ml_backend.trainer.train_job"


@dataclass(frozen=True)
class RedisKeys:
    """Names of our queues and keys; all start with the configured prefix (``talk2sam:``)."""

    prefix: str = "talk2sam:"

    @property
    def predict_queue(self) -> str:
        """Shared queue any worker takes jobs from."""
        return f"{self.prefix}predict"

    @property
    def batch_queue(self) -> str:
        """Queue of Retrieve-predictions jobs, taken after interactive ones."""
        return f"{self.prefix}batch"

    @property
    def warm_queue(self) -> str:
        """Low-priority queue of cache-warming jobs."""
        return f"{self.prefix}warm"

    def worker_queue(self, worker: str) -> str:
        """Queue only ``worker`` listens to (sticky routing: jobs for images it holds)."""
        return f"{self.prefix}worker-queue:{worker}"

    @property
    def workers(self) -> str:
        """Set of worker names that have announced themselves (dead ones are pruned lazily)."""
        return f"{self.prefix}workers"

    def last_boxes(self, project: str, task: int) -> str:
        """Hash: label -> JSON box the backend last answered for that task, with a TTL; clicks
        placed later (sent without their box) are paired with it."""
        return f"{self.prefix}last-boxes:{project}:{task}"

    def handed_token(self, ref: str) -> str:
        """A /setup token on its way to a worker or the trainer (``ml_backend.tokens``)."""
        return f"{self.prefix}token:{ref}"

    def heartbeat(self, worker: str) -> str:
        """JSON :class:`WorkerHeartbeat` of ``worker``, expiring when it stops refreshing it."""
        return f"{self.prefix}heartbeat:{worker}"

    def metrics(self, worker: str) -> str:
        """Hash of counters of ``worker`` (see ``worker.WorkerMetrics``)."""
        return f"{self.prefix}metrics:{worker}"

    # ---- learning from corrections (annotations, trainer, versions)

    @property
    def annotations(self) -> str:
        """Hash: Label Studio annotation id -> JSON ``annotations.RecordedAnnotation``."""
        return f"{self.prefix}annotations"

    def new_annotations(self, project: int | str) -> str:
        """Counter of annotations recorded in ``project`` since training was last requested."""
        return f"{self.prefix}annotations-new:{project}"

    @property
    def train_queue(self) -> str:
        """Queue of fine-tuning jobs, served by ``python -m ml_backend.trainer`` only."""
        return f"{self.prefix}train"

    @property
    def train_lock(self) -> str:
        """Id of the one training job queued or running (no duplicates)."""
        return f"{self.prefix}train:lock"

    @property
    def train_progress(self) -> str:
        """JSON progress of the current or last training job (epoch, loss, ETA)."""
        return f"{self.prefix}train:progress"

    @property
    def train_outcomes(self) -> str:
        """Hash: project scope -> JSON outcome of its last training job (done or failed, why)."""
        return f"{self.prefix}train:outcomes"

    def training_refusal(self, ref: str) -> str:
        """HTTP status of a START_TRAINING refusal sent to Label Studio by redirect, for a few
        minutes (``app.REFUSED_PATH``)."""
        return f"{self.prefix}train:refusal:{ref}"

    @property
    def trainers(self) -> str:
        """Set of trainer names that have announced themselves (dead ones are pruned lazily)."""
        return f"{self.prefix}trainers"

    @property
    def annotations_bytes(self) -> str:
        """Total bytes of the values of :attr:`annotations` (the store's bound)."""
        return f"{self.prefix}annotations:bytes"

    @property
    def projects(self) -> str:
        """Hash: Label Studio project id -> JSON of its last /setup (hostname, time)."""
        return f"{self.prefix}projects"

    def trainer_heartbeat(self, trainer: str) -> str:
        """JSON heartbeat of a trainer process, expiring when it stops refreshing it."""
        return f"{self.prefix}trainer-heartbeat:{trainer}"

    @property
    def versions(self) -> str:
        """Hash: model version name -> JSON ``versions.VersionRecord``."""
        return f"{self.prefix}versions"

    @property
    def versions_lock(self) -> str:
        """Lock around read-modify-write of the version registry."""
        return f"{self.prefix}versions:lock"

    @property
    def serving(self) -> str:
        """JSON ``{"name", "checkpoint"}`` of the base version the workers serve (to every
        project without a version of its own)."""
        return f"{self.prefix}serving"

    @property
    def project_serving(self) -> str:
        """Hash: project scope (``schemas.project_scope``) -> JSON ``{"name", "checkpoint"}``
        of the version fine-tuned for that project and serving it."""
        return f"{self.prefix}serving:projects"


NO_ORIGIN = "-"  # a scope's origin while no Label Studio URL is known


def project_scope(ls_url: str | None, project: int | None) -> str | None:
    """A project's name across Label Studio instances, ``<origin>#<id>``, e.g.
    ``http://127.0.0.1:8080#3``: the origin is the scheme, host and port of its Label Studio URL,
    lower-cased (``-`` when unknown); None for no project. Versions, lineage and training
    outcomes are kept under it."""
    if project is None:
        return None
    origin = NO_ORIGIN
    if ls_url:
        parts = urlsplit(ls_url.strip())
        if parts.scheme and parts.netloc:
            origin = f"{parts.scheme}://{parts.netloc}".lower()
    return f"{origin}#{project}"


def image_key(image_url: str, ls_url: str | None) -> str:
    """Cache key of a task image: same URL on the same Label Studio, same image.

    Args:
        image_url: the task's image URL as Label Studio sent it (may be relative).
        ls_url: Label Studio's base URL that resolves a relative one, or None.

    Returns:
        16 hex digits.
    """
    raw = f"{ls_url or ''}|{image_url}".encode()
    return hashlib.sha1(raw, usedforsecurity=False).hexdigest()[:16]


@dataclass(frozen=True)
class PredictJobSpec:
    """One image and all its prompts: one job (the worker decodes them a few at a time).

    Attributes:
        request_id: id of the HTTP request, for logs.
        task_id: Label Studio task id (needed to resolve cloud-storage URLs), or None.
        image_url: the task's image URL as Label Studio sent it.
        ls_url: Label Studio base URL for relative URLs, or None.
        ls_token_ref: reference of the /setup token to download with (``ml_backend.tokens``:
            the token itself never rides in a spec), or None (the worker's own
            LABEL_STUDIO_API_KEY wins when set).
        width, height: original image size in pixels that the boxes refer to.
        boxes_xyxy: N boxes, XYXY float pixels in that frame, already clipped to it; an entry
            None for a prompt of clicks alone.
        words: N text prompts, or None for plain SAM-HQ (box only).
        clicks: N lists of [x, y, positive] pixels in that frame, or None (no clicks).
        polygons: N flags, answer that prompt as polygons instead of brush RLE; None: brush
            for all. With ``find_word``, one flag for every region found.
        find_word: text alone: segment every instance of this word (no boxes; ``words`` and
            ``clicks`` unused), or None.
        find_threshold, find_max_regions: ``talk2sam.find``'s threshold and region cap.
        scope: the project's scope (``schemas.project_scope``: Label Studio origin and
            project id), whose own fine-tuned version answers; None: the base version.
    """

    request_id: str
    task_id: int | None
    image_url: str
    ls_url: str | None
    ls_token_ref: str | None
    width: int
    height: int
    boxes_xyxy: list[list[float] | None] = field(default_factory=list)
    words: list[str] | None = None
    clicks: list[list[list[float]]] | None = None
    polygons: list[bool] | None = None
    find_word: str | None = None
    find_threshold: float = 0.5
    find_max_regions: int = 20
    scope: str | None = None

    @property
    def image_key(self) -> str:
        return image_key(self.image_url, self.ls_url)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictJobSpec:
        # a spec of the previous release (``ls_token``, during a rolling upgrade) has no ref
        return cls(**known_fields(cls, {"ls_token_ref": None, **data}))


@dataclass(frozen=True)
class BoxPrediction:
    """The model's answer for one box.

    Attributes:
        rle: the (height, width) mask as Label Studio's brush RLE (``ls_format.mask_to_rle``),
            passed on to Label Studio as it is.
        score: the decoder's predicted IoU (confidence), in [0, 1] for a trained model.
        text_score: max-head text/image similarity, or None without a text prompt.
        polygons: when asked for, the mask as polygons instead (``rle`` empty): one list of
            [x, y] pixel-edge points per part (``ls_format.mask_to_polygons``).
        box_xyxy: the box found for it (text alone), or None.
    """

    rle: list[int]
    score: float
    text_score: float | None = None
    polygons: list[list[list[float]]] | None = None
    box_xyxy: list[float] | None = None


@dataclass(frozen=True)
class JobError:
    """An expected failure sent back as data: the ``ml_backend.errors`` class name and message."""

    type: str
    message: str


@dataclass(frozen=True)
class PredictJobResult:
    """What ``predict_job`` returns.

    Attributes:
        worker: name of the worker that ran it.
        model_version: the version that answered: the project's own, else the base.
        base_version: the worker's base version (what serves projects without their own).
        width, height: size of the decoded image, which is the size of every mask.
        cache_hit: whether the image's features were already cached in the worker.
        predictions: one per box, in the spec's order.
        error: set instead of predictions when the job failed in an expected way.
    """

    worker: str
    model_version: str
    base_version: str | None = None
    width: int = 0
    height: int = 0
    cache_hit: bool = False
    predictions: list[BoxPrediction] = field(default_factory=list)
    error: JobError | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictJobResult:
        fields = known_fields(cls, data)
        fields["predictions"] = [BoxPrediction(**known_fields(BoxPrediction, p))
                                 for p in fields.get("predictions", [])]
        error = fields.get("error")
        fields["error"] = JobError(**known_fields(JobError, error)) if error else None
        return cls(**fields)


@dataclass(frozen=True)
class WorkerHeartbeat:
    """What a worker publishes about itself (JSON under ``RedisKeys.heartbeat``), every third of
    WORKER_HEARTBEAT_TTL_S and whenever it takes or ends a job.

    Attributes:
        name: the rq worker name.
        model_version: its predictor version.
        busy: whether it is running a job now.
        images: image keys whose features it holds, most recent last.
        seen_at: UNIX time of this heartbeat.
    """

    name: str
    model_version: str
    busy: bool = False
    images: list[str] = field(default_factory=list)
    seen_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerHeartbeat:
        return cls(**known_fields(cls, data))


def pixel_prompts_refusal(prompts: int, width: int, height: int, limit: int) -> str | None:
    """Why a request is too large for a worker's memory, which grows with image pixels x
    prompts (one full-size mask each), or None when it is within MAX_PIXEL_PROMPTS."""
    if prompts * width * height <= limit:
        return None
    return (f"{prompts} prompts on a {width}x{height} image are {prompts * width * height} "
            f"pixel-prompts, over MAX_PIXEL_PROMPTS={limit}: an image this size takes at most "
            f"{limit // (width * height)} prompts per request")


def known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the keys ``cls`` has no field for: every record that crosses Redis is
    read so, since a process of another release (during an upgrade, or a record stored long
    ago) may have written a field removed or added since."""
    names = {f.name for f in dataclass_fields(cls)}
    return {k: v for k, v in data.items() if k in names}
