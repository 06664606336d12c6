"""The Label Studio ML backend model, in the label-studio-ml convention.

``Talk2SamBackend`` has ``setup()``, ``predict(tasks, context=None, **kwargs)`` and
``fit(event, data, **kwargs)``. It holds no model: ``predict`` turns tasks and context into job
specs (one per image, all its boxes together) and hands them to the queue client; GPU workers
answer.

Scores: each brush result carries ``score``, the decoder's predicted IoU for that mask (the
model's own confidence; low = uncertain, the tasks to correct first: docs/ACTIVE_LEARNING.md); a
task's ``score`` is the mean over its masks, 0.0 when it has none.
``model_version`` is per project, and predictions carry the one /setup reports: MODEL_VERSION
when set, else the version fine-tuned for the project and serving it (``ml_backend.versions``),
else the base version the live workers report (learned from heartbeats and job results), else
``talk2sam-<MODEL_CONFIG>`` until a worker has been seen. Label Studio thus re-predicts only the
project whose version changed.

Text prompts: a rectangle's label goes through LABEL_PROMPTS (an unmapped label is its own
prompt); text typed in a TextArea of the label config on the same image overrides it: a
per-region TextArea's text (same region ``id``) for its own box, a global one's for every box
without its own text. This holds in interactive and in batch mode.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from redis.exceptions import RedisError

from ml_backend.annotations import (
    DELETE_EVENTS,
    RECORD_EVENTS,
    TASK_DELETE_EVENTS,
    AnnotationStore,
)
from ml_backend.errors import (
    BackendError,
    InvalidRequestError,
    NoTrainerError,
    TrainingBusyError,
    TrainingError,
)
from ml_backend.label_config import LabelConfig, parse_label_config
from ml_backend.ls_protocol import (
    BoxPrompt,
    TextAlonePrompt,
    boxes_from_results,
    clicks_from_results,
    known_boxes,
    task_boxes,
    task_text_alone_prompt,
    text_alone_prompt,
    with_clicks,
)
from ml_backend.predict_jobs import (
    SkippedTasks,
    box_job,
    box_prediction,
    find_job,
    found_prediction,
    prediction,
)
from ml_backend.projects import (
    MAX_PROJECTS,
    ProjectSetup,
    ProjectStore,
    image_key_of,
    parse_project,
    payload_project,
    project_label_prompts,
)
from ml_backend.promotion import annotated_tasks_needed
from ml_backend.queue_client import QueueClient
from ml_backend.schemas import PredictJobResult, PredictJobSpec, project_scope
from ml_backend.settings import Settings
from ml_backend.tokens import hand_over
from ml_backend.training_queue import TrainingQueue, TrainRequest
from ml_backend.versions import read_project_serving, utc_now

log = logging.getLogger(__name__)
MAX_HOSTNAME_CHARS = 2048  # a /setup hostname is a URL: longer ones are refused
MAX_BATCH_TASKS = 1000  # tasks of one Retrieve predictions answered; the rest are asked again
MAX_TOKEN_CHARS = 4096  # a legacy token is 40 characters, a JWT a few hundred


class Talk2SamBackend:
    """Label Studio model class: prompts in, brush results out, inference on the workers.

    Args:
        settings: backend settings.
        queue: the queue client.
    """

    def __init__(self, settings: Settings, queue: QueueClient):
        self.settings = settings
        self.queue = queue
        self._projects: dict[int, ProjectSetup] = {}
        self._last_setup: ProjectSetup | None = None
        self._lock = threading.Lock()
        # told the error type of each batch task left without a prediction (/metrics)
        self.on_skipped: Callable[[str], None] = lambda reason: None
        self._model_version = settings.model_version or (
            "noop" if settings.model == "noop" else f"talk2sam-{settings.model_config}"
        )

    @functools.cached_property
    def annotations(self) -> AnnotationStore:
        """Webhook annotations in the queue's Redis (made on first use)."""
        return AnnotationStore(self.queue.redis, self.queue.keys,
                               max_bytes=self.settings.annotation_store_mb * 2**20,
                               max_pixels=self.settings.max_image_pixels)

    @functools.cached_property
    def projects(self) -> ProjectStore:
        """Projects set up and tasks' last boxes in the queue's Redis (made on first use)."""
        return ProjectStore(self.queue.redis, self.queue.keys)

    @functools.cached_property
    def training(self) -> TrainingQueue:
        """The training queue in the queue's Redis (made on first use)."""
        return TrainingQueue(self.settings, self.queue.redis)

    @property
    def model_version(self) -> str:
        return self._model_version

    def _answered_by(self, answer: PredictJobResult) -> str:
        """The model_version a prediction carries: MODEL_VERSION when set, else the version
        that answered (the project's own, or the base)."""
        self.observe_worker_version(answer.base_version or answer.model_version)
        return self.settings.model_version or answer.model_version

    def project_version(self, scope: str | None) -> str:
        """The model_version of a project: MODEL_VERSION when set, else the version fine-tuned
        for it and serving it, else the base's (what the workers report)."""
        if self.settings.model_version is None and scope is not None:
            try:
                own = read_project_serving(self.queue.redis, self.queue.keys, scope)
            except RedisError as exc:
                log.warning("version of project %s unknown: %s", scope, exc)
                own = None
            if own is not None:
                return own.name
        return self.model_version

    def observe_worker_version(self, version: str) -> None:
        """Adopt the workers' model version unless MODEL_VERSION pins one."""
        if self.settings.model_version is None and version and version != self._model_version:
            log.info("model_version is now %s (reported by the workers)", version)
            self._model_version = version

    # ------------------------------------------------------------ label-studio-ml API

    def setup(self, project: str | int | None = None, schema: str | None = None,
              hostname: str | None = None, access_token: str | None = None,
              extra_params: Any = None, **kwargs: Any) -> dict[str, str]:
        """Remember the project's Label Studio credentials and the model's extra
        params (``{"label_prompts": {"Power line": "wire"}}``: this project's label -> prompt
        map, over LABEL_PROMPTS); answer from memory.

        Tokens go only where they belong: with LABEL_STUDIO_URL or LABEL_STUDIO_ORIGINS set, a
        ``hostname`` outside them is refused; a token is kept only with the hostname it came with.

        Raises:
            InvalidRequestError: extra_params that are not such an object; a hostname that is
                not a trusted Label Studio.
        """
        prompts = project_label_prompts(extra_params)
        if hostname and len(hostname) > MAX_HOSTNAME_CHARS:
            raise InvalidRequestError(f"/setup hostname is {len(hostname)} characters long; a "
                                      f"Label Studio URL of at most {MAX_HOSTNAME_CHARS} is read")
        if access_token and len(access_token) > MAX_TOKEN_CHARS:
            raise InvalidRequestError(f"/setup access_token is longer than {MAX_TOKEN_CHARS} "
                                      "characters")
        project = parse_project(project, "/setup")
        hostname = (hostname or "").rstrip("/") or None
        if hostname and self.settings.trusted_label_studios and not self.settings.trusts(hostname):
            raise InvalidRequestError(
                f"/setup names Label Studio at {hostname[:200]!r}, which is neither "
                "LABEL_STUDIO_URL nor in LABEL_STUDIO_ORIGINS: add its origin there to connect "
                "it (tokens go to those only)")
        if project is not None:
            self._check_project_room(project)
        with self._lock:
            # a call without hostname or token (a health probe, a script) keeps what is known
            # of the same project (of the last one, for a call that names none); a token that
            # came with another hostname is not kept for this one
            known = self._projects.get(project) if project is not None else self._last_setup
            same_host = known is not None and hostname in (None, known.hostname)
            entry = ProjectSetup(
                hostname=hostname or (known.hostname if known else None),
                access_token=access_token or (known.access_token if same_host else None),
                label_prompts=prompts if extra_params is not None
                else (known.label_prompts if known else {}),
                image_key=image_key_of(schema) or (known.image_key if known else None))
            if project is not None:
                self._projects[project] = entry
            self._last_setup = entry
        scope = project_scope(self.settings.label_studio_url or entry.hostname, project)
        if project is not None:  # START_TRAINING is accepted only for projects set up (anywhere)
            try:
                self.projects.record(project, replace(entry, scope=scope))
            except RedisError as exc:
                log.warning("project %s not recorded: %s", project, exc)
        return {"model_version": self.project_version(scope)}

    def _check_project_room(self, project: int) -> None:
        """A new project beyond MAX_PROJECTS is refused: /setup needs no auth when auth is
        off, and every project stays in memory and in Redis.

        Raises:
            InvalidRequestError: naming the cap.
        """
        with self._lock:
            known_here = project in self._projects
            room = known_here or len(self._projects) < MAX_PROJECTS
        if room and not known_here:  # other web processes may have set up others
            try:
                room = self.projects.has_room_for(project)
            except RedisError as exc:  # the cap in memory still holds
                log.warning("projects not counted in Redis: %s", exc)
        if not room:
            raise InvalidRequestError(f"this backend holds {MAX_PROJECTS} projects already "
                                      f"(MAX_PROJECTS); project {project} is refused")

    def predict(self, tasks: list[dict[str, Any]], context: dict[str, Any] | None = None, *,
                label_config: str, project: str | int | None = None, request_id: str = "-",
                **kwargs: Any) -> list[dict[str, Any] | list[Any]]:
        """One slot per task, in order.

        Interactive mode (``context`` set): every rectangle of ``context.result`` of the single
        task goes to a worker in one job; any failure is the request's error.

        Batch mode (``context`` None: Retrieve predictions, or a task opened in the editor):
        each task's boxes come from its newest annotation with rectangles, else its newest
        prediction; a task with none, but a text-alone prompt in an annotation or draft, finds
        every instance of its word. Each task stands alone: one with neither (it may warm a
        worker's cache),
        one that fails (its reason is logged) or one not answered before the deadline gets an
        empty list, which Label Studio stores nothing for, so the next Retrieve predictions
        asks again; only answered tasks get a prediction.

        Raises:
            InvalidRequestError and the queue client's errors (interactive mode; in batch mode
            only when nothing could run at all, e.g. NoWorkerError).
        """
        config = parse_label_config(label_config)
        project = parse_project(project, "/predict")
        access = self._project_access(project)
        # handed over once per request, for every job of it
        access = replace(access, token_ref=hand_over(self.queue.redis, self.queue.keys,
                                                     access.access_token))
        if context is not None:
            return [self._interactive(tasks, context, config, access, request_id, project)]
        return self._batch(tasks, config, access, request_id)

    def _interactive(self, tasks: list[dict[str, Any]], context: dict[str, Any],
                     config: LabelConfig, access: ProjectSetup, request_id: str,
                     project: int | None) -> dict[str, Any]:
        if len(tasks) != 1:
            raise InvalidRequestError(
                f"an interactive request carries one task, this one has {len(tasks)}")
        results = context.get("result") or []
        boxes = boxes_from_results(results, config, strict=True, where="context")
        clicks = clicks_from_results(results, config, "context")
        if clicks:  # the editor sends clicks without their box: pair them here
            boxes = with_clicks(boxes, clicks, self._known_boxes(tasks[0], config, project))
        if not boxes:
            text = text_alone_prompt(results, config, access.label_prompts, "context")
            if text is None:
                return prediction([], None, self.project_version(access.scope))
            (answer,) = self.queue.predict([self._find_job(tasks[0], text, config, access,
                                                            request_id)])
            return self._found(answer, text, config)
        spec = box_job(tasks[0], boxes, config, access, request_id,
                       self.settings.max_pixel_prompts)
        (answer,) = self.queue.predict([spec])
        if project is not None and isinstance(tasks[0].get("id"), int):
            self.projects.remember_boxes(project, tasks[0]["id"], boxes)
        return box_prediction(answer, boxes, config, self._answered_by(answer))

    def _known_boxes(self, task: dict[str, Any], config: LabelConfig, project: int | None
                     ) -> list[BoxPrompt]:
        """Boxes a click may refine, oldest first: the task's predictions, annotations and
        drafts as the request carries them, then the box answered last for its label."""
        known = known_boxes(task, config)
        if project is not None and isinstance(task.get("id"), int):
            known += self.projects.last_boxes(project, task["id"])
        return known

    def _batch(self, tasks: list[dict[str, Any]], config: LabelConfig, access: ProjectSetup,
               request_id: str) -> list[dict[str, Any] | list[Any]]:
        slots: list[dict[str, Any] | list[Any]] = [[] for _ in tasks]
        if len(tasks) > MAX_BATCH_TASKS:  # an empty slot: Label Studio asks again next time
            log.warning("request %s: %d tasks, %d answered (MAX_BATCH_TASKS); Retrieve "
                        "predictions again for the other %d", request_id, len(tasks),
                        MAX_BATCH_TASKS, len(tasks) - MAX_BATCH_TASKS)
        skipped = SkippedTasks(request_id, self.on_skipped)
        # each job answers boxes, or a text-alone prompt (a task with no box but a word)
        jobs: list[tuple[int, list[BoxPrompt] | TextAlonePrompt, PredictJobSpec]] = []
        for index, task in enumerate(tasks[:MAX_BATCH_TASKS]):
            try:
                boxes = task_boxes(task, config)
                spec = box_job(task, boxes, config, access, request_id,
                               self.settings.max_pixel_prompts)
                text = None if boxes else task_text_alone_prompt(task, config,
                                                                 access.label_prompts)
            except BackendError as exc:
                skipped.add(task, exc)
                continue
            if boxes:
                jobs.append((index, boxes, spec))
            elif text is not None:
                jobs.append((index, text, self._find_job(task, text, config, access,
                                                          request_id)))
            elif self.settings.warm_on_open:
                self.queue.enqueue_warm(spec)
        outcomes = self.queue.predict_each([spec for _, _, spec in jobs]) if jobs else []
        for (index, prompts, _), outcome in zip(jobs, outcomes):
            try:
                if isinstance(outcome, BackendError):
                    raise outcome
                slots[index] = self._found(outcome, prompts, config) \
                    if isinstance(prompts, TextAlonePrompt) \
                    else box_prediction(outcome, prompts, config, self._answered_by(outcome))
            except BackendError as exc:
                skipped.add(tasks[index], exc)
        skipped.log(len(tasks))
        return slots

    def fit(self, event: str, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Webhook events (label-studio-ml's ``fit``): record corrections, start training.

        ANNOTATION_CREATED / ANNOTATION_UPDATED are recorded, after cheap checks, for the
        trainer (``ml_backend.annotations``), ANNOTATIONS_DELETED and TASKS_DELETED drop them;
        START_TRAINING of a project this backend was set up for, or TRAIN_EVERY_N recorded
        annotations of one, enqueue one fine-tuning job (``ml_backend.training_queue``);
        anything else is acknowledged and ignored. Only Redis is touched, so the answer comes
        well within Label Studio's 1 s.

        Raises:
            InvalidRequestError: START_TRAINING without a project, or for one never set up.
            NoTrainerError: training requested and no trainer is alive.
            TrainingError: START_TRAINING for a project with too few annotated tasks.
            TrainingBusyError: START_TRAINING while another project's job runs.
        """
        project = payload_project(data)
        if event in RECORD_EVENTS:
            records = self.annotations.record(data)
            answer: dict[str, Any] = {"status": "recorded", "event": event,
                                      "annotations": [r.annotation_id for r in records],
                                      "brush_regions": sum(r.brush_regions for r in records)}
            every = self.settings.train_every_n
            if records and every and self.annotations.count_new([project]) >= every:
                if self._set_up(project):
                    try:
                        answer["training"] = self._request_training(project, "TRAIN_EVERY_N")
                    except (NoTrainerError, TrainingBusyError) as exc:  # recorded all the same
                        log.warning("TRAIN_EVERY_N reached for project %s: %s", project, exc)
                        answer["training"] = {"status": "not started", "error": str(exc)}
                else:
                    log.warning("TRAIN_EVERY_N reached for project %s, which was never set up "
                                "here: no training requested", project)
            return answer
        if event in DELETE_EVENTS:
            return {"status": "deleted", "event": event, "dropped": self.annotations.drop(data)}
        if event in TASK_DELETE_EVENTS:
            return {"status": "deleted", "event": event,
                    "dropped": self.annotations.drop_tasks(data)}
        if event == "START_TRAINING":
            if project is None:
                raise InvalidRequestError("START_TRAINING must name its project")
            if not self._set_up(project):
                raise InvalidRequestError(
                    f"START_TRAINING for project {project}, which this backend was never set up "
                    f"for (Label Studio calls /setup when the model is connected)")
            self.training.require_trainer()  # what it can check at once, it checks now
            self._check_annotated_tasks(project, data)
            return {"status": "training", "event": event,
                    "training": self._request_training(project, event)}
        log.info("webhook %s ignored", event)
        return {"status": "ignored", "event": str(event)}

    def _check_annotated_tasks(self, project: int, data: dict[str, Any]) -> None:
        """Refuse at once what a job would refuse later: a project with too few annotated tasks
        (Label Studio's own count, ``num_tasks_with_annotations``, in the START_TRAINING
        payload; a payload without it is left to the job).

        Raises:
            TrainingError: naming the count and what training needs.
        """
        counted = data["project"].get("num_tasks_with_annotations") \
            if isinstance(data.get("project"), dict) else None
        needed = annotated_tasks_needed(self.settings)
        if isinstance(counted, int) and not isinstance(counted, bool) and counted < needed:
            raise TrainingError(
                f"project {project} has {counted} annotated task{'' if counted == 1 else 's'}; "
                f"training needs {needed}: {self.settings.promote_min_heldout_tasks} held out to "
                f"judge the new version (PROMOTE_MIN_HELDOUT_TASKS) and as many to train on")

    def _request_training(self, project: int | None, reason: str) -> dict[str, Any]:
        access = self._project_access(project)
        s = self.settings
        ref = hand_over(self.queue.redis, self.queue.keys, access.access_token,
                        s.train_queue_ttl_s + s.train_timeout_s)
        answer = self.training.request(TrainRequest(
            project=project, ls_url=access.hostname, ls_token_ref=ref, reason=reason,
            requested_at=utc_now(), label_prompts=dict(access.label_prompts),
            image_key=access.image_key, scope=access.scope,
            # with auth off a webhook may be forged: train on Label Studio's export alone
            recorded_fallback=s.auth_enabled))
        if answer["status"] == "queued":  # the job will see every annotation made so far
            self.annotations.reset_new(project)
        return answer

    # ------------------------------------------------------------ helpers

    def _find_job(self, task: dict[str, Any], text: TextAlonePrompt, config: LabelConfig,
                  access: ProjectSetup, request_id: str) -> PredictJobSpec:
        return find_job(task, text, config, access, request_id, self.settings.find_threshold,
                        self.settings.find_max_regions)

    def _found(self, answer: PredictJobResult, text: TextAlonePrompt, config: LabelConfig
               ) -> dict[str, Any]:
        return found_prediction(answer, text, config, self._answered_by(answer),
                                self.settings.find_threshold)

    def _set_up(self, project: int | None) -> bool:
        """Whether /setup was called for ``project`` (by this process or another one)."""
        if project is None:
            return False
        with self._lock:
            if project in self._projects:
                return True
        return self.projects.is_set_up(project)

    def _project_access(self, project: int | None) -> ProjectSetup:
        """Label Studio URL and token for image downloads (settings first, then /setup's) and
        the label -> prompt map (LABEL_PROMPTS, the project's extra_params over it).

        A project set up by another web process, or before a restart, is found in Redis (its
        hostname and prompts; tokens stay in memory); prompts never come from another project.
        """
        with self._lock:
            own = self._projects.get(project) if project is not None else None
            last = self._last_setup
        if own is None and project is not None:
            own = self.projects.recorded(project)
        # URL and token from one /setup call (a token goes only to the host it came with),
        # unless the settings name Label Studio; the settings' key only to a trusted one
        source = own if own is not None and (own.hostname or self.settings.label_studio_url) \
            else last
        hostname = self.settings.label_studio_url or (source.hostname if source else None)
        # the settings' key never travels (each process has its own); /setup's token does,
        # for a worker or trainer started without the key
        return ProjectSetup(
            hostname=hostname, access_token=source.access_token if source else None,
            label_prompts={**self.settings.label_prompts, **(own.label_prompts if own else {})},
            image_key=own.image_key if own else None, scope=project_scope(hostname, project))
