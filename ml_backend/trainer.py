"""Learning from corrections: the fine-tuning job and its worker, ``python -m ml_backend.trainer``.

Jobs are requested through ``ml_backend.training_queue`` (the web side: one job at a time, none
without a live trainer, unclaimed jobs expire). The job (:func:`train_job`, in this process):

1. loads the version that serves the project now: its own fine-tune when one was promoted for
   it (its scope: Label Studio origin and project id), else the base (the serving pointer, which
   the inference workers register when they start), from its checkpoint or from MODEL_CONFIG /
   MODEL_CHECKPOINT. With no serving version, or a base this trainer's settings do not build,
   it refuses (``TrainingError``): it never registers a model of its own;
2. fetches the project's annotations from Label Studio (label-studio-sdk, JSON export; the
   START_TRAINING webhook carries none), the source of truth; only when Label Studio cannot be
   reached does it fall back, with a warning in the log and in the progress, to the
   annotations recorded from webhooks (``ml_backend.annotations``), whose masks it decodes and
   pairs with their boxes here, never in the web process;
3. splits tasks into training and held-out sets by a hash of the task id (stable: a task never
   moves between sets as the project grows), TRAIN_HOLDOUT_PERCENT held out;
4. scores the serving version on the held-out set, fine-tunes it with ``talk2sam.train.Trainer``
   (TRAIN_EPOCHS, at least TRAIN_MIN_STEPS optimiser steps, TRAIN_LR, TRAIN_OPTIMIZER,
   TRAIN_BATCH_SIZE, TRAIN_LOSS_POINTS) and scores it again (mIoU, mBIoU by
   ``talk2sam.evaluation.evaluate``); scores box-only SAM-HQ (the public decoder, no text) on the
   same tasks;
5. writes the new checkpoint under VERSIONS_DIR/checkpoints (fsynced, then renamed into place:
   the serving checkpoint is never touched) and promotes it for its project only when its gain
   in held-out IoU over the project's serving version holds up (``ml_backend.promotion``: the
   low end of a paired bootstrap interval above PROMOTE_MIN_GAIN) and its mean IoU beats box-only
   SAM-HQ's on the same objects, and only while the version it was trained from still serves the project (a
   rollback during training wins); else it is recorded as rejected with the reason. Inference
   workers answer the project with it from their next job; other projects do not change.

Progress (state, epoch, step, loss, ETA) is written to ``RedisKeys.train_progress`` while it
runs (GET /metrics, ``python scripts/versions.py status``) and logged at each state change and
epoch; the outcome line carries the held-out numbers. A failing or refused job leaves the
serving version as it was and records why, in the version's record and in the progress.

Frozen image features are computed on DEVICE; the decoder is fine-tuned and evaluated on CPU
(``talk2sam.features`` keeps cached features on CPU).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from redis import Redis
from redis.exceptions import RedisError

from ml_backend import rq_process
from ml_backend.annotations import AnnotationStore
from ml_backend.errors import BackendError, TrainingError
from ml_backend.images import ImageFetcher, decode_rgb
from ml_backend.ls_export import LabelStudioExportDataset
from ml_backend.ls_protocol import word_for_label
from ml_backend.promotion import heldout_shortfall, paired_gain, promotion_refusal
from ml_backend.schemas import RedisKeys, project_scope
from ml_backend.serving_model import load_version, serving_record
from ml_backend.settings import Settings
from ml_backend.tokens import collect
from ml_backend.training_data import fetch_project_tasks, has_masks, split_tasks
from ml_backend.training_queue import (
    TrainRequest,
    release_lock,
    trainer_heartbeat,
    write_progress,
)
from ml_backend.versions import VersionError, VersionRecord, VersionRegistry, utc_now

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the job (trainer side)


class TrainingRun:
    """One fine-tuning job.

    Args:
        settings: backend settings.
        redis: connection.
        job_id: the rq job id (also the training lock's value).
    """

    def __init__(self, settings: Settings, redis: Redis, job_id: str):
        self.settings = settings
        self.redis = redis
        self.keys = RedisKeys(settings.key_prefix)
        self.job_id = job_id
        self.registry = VersionRegistry(redis, self.keys, settings.versions_path)
        self._progress: dict[str, Any] = {"job_id": job_id}
        self._fetcher: ImageFetcher | None = None

    def progress(self, **fields: Any) -> None:
        before = (self._progress.get("state"), self._progress.get("stage"),
                  self._progress.get("epoch"))
        self._progress.update(fields)
        try:
            write_progress(self.redis, self.keys, self._progress)
        except RedisError as exc:  # progress is informative; training goes on
            log.warning("progress not written: %s", exc)
        p = self._progress
        if (p.get("state"), p.get("stage"), p.get("epoch")) != before:
            self._log_progress(p)

    def _log_progress(self, p: dict[str, Any]) -> None:
        """One log line per state, evaluation stage and epoch (the stack's log shows them)."""
        line = f"training job {self.job_id[:8]}: {p.get('state')}"
        if p.get("state") == "evaluating":
            line += f" the {p.get('stage')} model on the held-out tasks"
        elif p.get("state") == "training" and p.get("epoch"):
            line += f" epoch {p['epoch']}/{p.get('epochs')}"
            if isinstance(p.get("loss"), float):
                line += f", loss {p['loss']:.4f}, ETA {p.get('eta_s') or 0:.0f} s"
        elif p.get("state") == "preparing" and p.get("train_objects") is not None:
            line += (f" {p['train_objects']} training and {p['heldout_objects']} held-out "
                     f"objects from {p.get('source')}")
        log.info("%s", line)

    def run(self, req: TrainRequest) -> dict[str, Any]:
        """Train, evaluate, save and promote or reject. Returns a summary; raises on failure
        after recording it (the serving version is never changed by a failing job)."""
        started = time.time()
        if req.scope is None and req.project is not None:  # a request of an older web process
            req = replace(req, scope=project_scope(req.ls_url or self.settings.label_studio_url,
                                                   req.project))
        self.progress(state="preparing", project=req.project, scope=req.scope,
                      reason=req.reason, started_at=started, version=None)
        AnnotationStore(self.redis, self.keys).reset_new(req.project)
        try:
            model, parent = self._serving_model(req.scope)
        except BaseException as exc:
            reason = str(exc) if isinstance(exc, TrainingError) else \
                f"cannot load the serving version: {type(exc).__name__}: {exc}"
            self.progress(state="failed", error=reason[:500], finished_at=time.time())
            log.error("training job %s refused: %s", self.job_id, reason)
            raise
        name = self._new_name(req.project)
        try:
            record = self.registry.put(VersionRecord(
                name=name, created=utc_now(), status="training", parent=parent.name,
                job_id=self.job_id, project=req.project, scope=req.scope))
        except BaseException as exc:
            self.progress(state="failed", error=f"cannot record version {name}: "
                          f"{type(exc).__name__}: {exc}"[:500], finished_at=time.time())
            raise
        self.progress(version=name, parent=parent.name)
        run_dir = self.registry.directory / "runs" / name
        try:
            summary = self._train(req, model, record, run_dir)
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"[:500]
            self.registry.put(replace(record, status="failed", reason=reason))
            self.progress(state="failed", error=reason, finished_at=time.time())
            log.error("training job %s failed: %s", self.job_id, reason)
            raise
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
            if self._fetcher is not None:
                self._fetcher.close()
        self.progress(state="done", finished_at=time.time(), result=summary["status"],
                      reason=summary.get("reason"), metrics=summary["metrics"])
        m = summary["metrics"]
        log.info("training job %s: %s %s for project %s in %.0f s: held-out mIoU %.4f (serving "
                 "%s %.4f, box-only SAM-HQ %.4f) on %d objects from %d tasks; gain over serving "
                 "%s; the word changes %s of its mask pixels%s", self.job_id[:8],
                 summary["status"], name, req.scope or "-", time.time() - started,
                 m["new"]["miou"], parent.name, m["old"]["miou"], m["baseline"]["miou"],
                 m["heldout_objects"], m["heldout_tasks"], m["gain_interval"],
                 _percent(m["new"].get("word_effect")),
                 f"; {summary['reason']}" if summary.get("reason") else "")
        return summary

    def _serving_model(self, scope: str | None) -> tuple[Any, VersionRecord]:
        """The model serving the project now (its own version, else the base), by the workers'
        rule; a trainer never decides what serves.

        Raises:
            TrainingError: nothing serves yet, or it comes from other model settings.
        """
        try:
            serving = serving_record(self.settings, self.registry, follow=True)
        except VersionError as exc:
            raise TrainingError(f"{exc}; start the trainer with the workers' model "
                                f"settings") from exc
        if serving is None:
            raise TrainingError(
                "no serving version is registered yet: inference workers register the model "
                "they serve when they start; start them (talk2sam-stack does) before training")
        own = self.registry.project_version(scope)
        record = self.registry.get(own.name) if own is not None else None
        root = self.registry.base_of(serving)
        if record is not None and self.registry.descends_from(record, root.checkpoint,
                                                              root.config):
            serving = record  # the project's lineage goes on from its own version
        elif record is not None:
            log.warning("project %s: its version %s was fine-tuned from another base than %s; "
                        "training starts from the base", scope, record.name, serving.name)
        return load_version(self.settings, serving, trainable_model).model, serving

    def _new_name(self, project: int | None) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        of = f"-p{project}" if project is not None else ""
        return f"talk2sam-{self.settings.model_config}{of}-ft-{stamp}-{self.job_id[:6]}"

    def _handed_token(self, req: TrainRequest) -> str | None:
        return collect(self.redis, self.keys, req.ls_token_ref)

    def _tasks(self, req: TrainRequest) -> tuple[list[dict[str, Any]], str]:
        """The project's tasks from Label Studio's export; from the recorded webhooks only when
        the export cannot be had and the request allows it (``recorded_fallback``)."""
        s = self.settings
        ls_url = s.label_studio_url or req.ls_url
        # the key only to a trusted Label Studio; /setup's token only to its own hostname
        token = s.api_key_for(ls_url) or self._handed_token(req)
        why = "no Label Studio URL, token or project"
        if ls_url and token and req.project is not None:
            try:
                return fetch_project_tasks(ls_url, token, req.project), "label-studio"
            except Exception as exc:  # noqa: BLE001 - any failure of Label Studio: fall back
                why = f"Label Studio unreachable: {type(exc).__name__}: {str(exc)[:200]}"
        if not req.recorded_fallback:
            raise TrainingError(
                f"cannot get Label Studio's export ({why}), and this request may not train on "
                "annotations recorded from webhooks: with the backend's auth off anyone can "
                "forge a webhook, so START_TRAINING trains on Label Studio's own export only. "
                "Let the trainer reach Label Studio (LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY), "
                "or turn auth on (BASIC_AUTH_USER/BASIC_AUTH_PASS or API_TOKEN)")
        records = AnnotationStore(self.redis, self.keys).all(req.project)
        log.warning("NOT training on Label Studio's export (%s): falling back to the %d "
                    "annotations recorded from webhooks, which may miss edits made while the "
                    "backend was unreachable", why, len(records))
        self.progress(warning=f"trained on recorded webhooks, not Label Studio's export ({why})")
        return [r.to_task() for r in records], f"recorded ({why})"

    def _load_image(self, req: TrainRequest, task_ids: dict[str, int]) -> Callable[[str], Any]:
        s = self.settings
        self._fetcher = self._fetcher or ImageFetcher.from_settings(s)
        fetcher = self._fetcher

        def load(url: str) -> Any:
            data = fetcher.fetch(url, req.ls_url, self._handed_token(req), task_ids.get(url))
            return np.array(decode_rgb(data, s.max_image_pixels))  # writable, for torch

        return load

    def _items(self, tasks: list[dict[str, Any]], req: TrainRequest
               ) -> tuple[list[dict], int, int]:
        """Items of the tasks' brush regions, how many were unusable (counted and left out) and
        how many tasks the items come from."""
        key = req.image_key or "image"  # the label config's Image value, as /setup sent it
        task_ids = {str(t.get("data", {}).get(key)): int(t["id"]) for t in tasks}
        dataset = LabelStudioExportDataset(tasks, self._load_image(req, task_ids),
                                           image_key=req.image_key, skip_malformed=True)
        for reason in dataset.left_out:  # one bad record must not fail every training job
            log.warning("left out: %s", reason)
        items, skipped, used_tasks = [], len(dataset.left_out), set()
        for index, region in enumerate(dataset.regions):
            try:
                item = dataset[index]
            except (ValueError, BackendError) as exc:  # empty mask, size mismatch, no image
                log.warning("%s left out: %s", region.name, exc)
                skipped += 1
                continue
            item["word"] = word_for_label(region.word, {**self.settings.label_prompts,
                                                        **req.label_prompts})
            item["task_id"] = region.task_id  # the gate draws a task's objects together
            items.append(item)
            used_tasks.add(region.task_id)
        return items, skipped, len(used_tasks)

    def _train(self, req: TrainRequest, model: Any, record: VersionRecord,
               run_dir: Any) -> dict[str, Any]:
        from talk2sam.build import default_device
        from talk2sam.evaluation import evaluate, word_effect
        from talk2sam.features import FeatureCache, prepare
        from talk2sam.train import TrainConfig, Trainer

        s = self.settings
        tasks, source = self._tasks(req)
        tasks = [t for t in tasks if has_masks(t)]  # a task of rectangles alone teaches nothing
        train_tasks, held_tasks = split_tasks(tasks, s.train_holdout_percent,
                                              s.promote_min_heldout_tasks)
        if len(tasks) >= 2 and len(held_tasks) < s.promote_min_heldout_tasks:
            raise heldout_shortfall(s, f"{len(held_tasks)} held-out tasks of {len(tasks)} with masks "
                                 f"from {source}")  # before any image is downloaded
        train_items, skipped_train, _ = self._items(train_tasks, req)
        held_items, skipped_held, judged_tasks = self._items(held_tasks, req)
        if not train_items or not held_items:
            raise TrainingError(
                f"need brush annotations (or polygons) on at least two tasks (one to train on, "
                f"one held out); found {len(train_items)} training and {len(held_items)} held-out objects "
                f"in {len(tasks)} tasks from {source}")
        if len(held_items) < s.promote_min_heldout_objects or \
                judged_tasks < s.promote_min_heldout_tasks:
            # a version judged on one object could be promoted on luck (or on forged data)
            raise heldout_shortfall(s, f"{len(held_items)} held-out objects from {judged_tasks} tasks "
                                 f"({len(train_items)} training objects, {len(tasks)} annotated "
                                 f"tasks from {source})")
        self.progress(state="preparing", source=source, train_objects=len(train_items),
                      heldout_objects=len(held_items))
        device = default_device(s.device)
        model.to(device)
        cache = FeatureCache(model)
        train_ex = prepare(model, train_items, cache, desc="training features")
        held_ex = prepare(model, held_items, cache, desc="held-out features")
        model.to("cpu")  # talk2sam.train fine-tunes and evaluates on CPU features
        margin = s.box_margin_px  # as served
        self.progress(state="evaluating", stage="old")
        old = _scores(evaluate(model, held_ex, box_margin_px=margin))
        old["word_effect"] = word_effect(model, held_ex, margin)
        self.progress(state="evaluating", stage="baseline")
        baseline = _scores(evaluate(_box_only_baseline(model, s.model_dir), held_ex,
                                    box_margin_px=margin))
        # a few corrected tasks make a short epoch: run at least TRAIN_MIN_STEPS steps
        epochs = max(s.train_epochs, math.ceil(
            s.train_min_steps / math.ceil(len(train_ex) / s.train_batch_size)))
        config = TrainConfig(epochs=epochs, batch_size=s.train_batch_size, lr=s.train_lr,
                             optimizer=s.train_optimizer, num_points=s.train_loss_points,
                             box_margin_px=margin)
        self.progress(state="training", epoch=0, epochs=config.epochs)
        trainer = Trainer(model, config, run_dir, progress=lambda p: self.progress(**p))
        history = trainer.fit(train_ex, resume=False)
        self.progress(state="evaluating", stage="new")
        new = _scores(evaluate(model, held_ex, box_margin_px=margin))
        new["word_effect"] = word_effect(model, held_ex, margin)
        new_ious, old_ious, baseline_ious = (m.pop("ious") for m in (new, old, baseline))
        tasks = [item["task_id"] for item in held_items]
        over_serving = paired_gain(new_ious, old_ious, s.promote_confidence, tasks)
        over_baseline = paired_gain(new_ious, baseline_ious, s.promote_confidence, tasks)
        metrics = {"old": old, "new": new, "baseline": baseline,
                   "gain_miou": new["miou"] - old["miou"],
                   "gain_over_baseline_miou": new["miou"] - baseline["miou"],
                   "gain_interval": str(over_serving), "gain": over_serving.to_dict(),
                   "gain_over_baseline": over_baseline.to_dict(), "source": source,
                   "train_objects": len(train_items), "heldout_objects": len(held_items),
                   "skipped_objects": skipped_train + skipped_held,
                   "train_tasks": len(train_tasks), "heldout_tasks": judged_tasks,
                   "loss": [round(h["loss"], 5) for h in history],
                   "train_config": {"epochs": config.epochs, "lr": config.lr,
                                    "optimizer": config.optimizer,
                                    "batch_size": config.batch_size}}
        self.progress(state="saving")
        path = self.registry.checkpoint_path(record.name)
        trainer.save(path, record.name, metrics)
        record = self.registry.put(replace(record, checkpoint=str(path), metrics=metrics))
        refusal = promotion_refusal(over_serving, over_baseline, s.promote_min_gain)
        if refusal is None:
            try:
                self.registry.promote(record.name, only_if_serving=record.parent)
            except VersionError as exc:  # rolled back or promoted meanwhile: that choice wins
                refusal = str(exc)
        if refusal is None:
            status = "promoted"
        else:
            self.registry.put(replace(record, status="rejected", reason=refusal))
            status = "rejected"
        return {"status": status, "version": record.name, "parent": record.parent,
                "metrics": metrics, "reason": refusal}


def trainable_model(settings: Settings) -> Any:
    """The ``Talk2Sam`` model of these settings (torch is imported here, in the trainer only)."""
    from talk2sam.build import build_model, load_checkpoint

    if settings.model_checkpoint:
        return load_checkpoint(settings.model_checkpoint, settings.model_dir)
    return build_model(settings.model_config, settings.model_dir)


def _box_only_baseline(model: Any, model_dir: str | None) -> Any:
    """Box-only SAM-HQ with the public decoder, on the cached features of the model's frozen
    image encoder (the same weights). Building it reads the whole SAM-HQ file once per job (peak
    memory: a second SAM-HQ, freed after the evaluation). For the tiny configurations the
    "public" decoder is the seeded random one, so there this half of the check is weak."""
    from talk2sam.build import build_model

    return build_model(model.cfg, model_dir, use_text=False)


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f} %"


def _scores(aggregator: Any) -> dict[str, float | None]:
    summary = next(iter(aggregator.summary().values()))
    return {"miou": summary.miou, "mbiou": summary.mbiou, "count": summary.count,
            "score_spearman": summary.score_spearman, "ious": aggregator.ious(summary.dataset)}


# ---------------------------------------------------------------- worker process


# The settings and connection of this trainer process, set by main() (never at import).
_context: tuple[Settings, Redis] | None = None


def train_job(request: dict[str, Any]) -> dict[str, Any]:
    """rq job: one fine-tuning run. Takes and returns JSON-able dicts."""
    from rq import get_current_job

    if _context is None:
        raise RuntimeError("train_job runs only inside `python -m ml_backend.trainer`")
    settings, redis = _context
    job = get_current_job()
    job_id = job.id if job is not None else uuid.uuid4().hex
    try:
        return TrainingRun(settings, redis, job_id).run(TrainRequest.from_dict(request))
    finally:
        release_lock(redis, RedisKeys(settings.key_prefix), job_id)


def main(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> int:
    """``python -m ml_backend.trainer [--name NAME] [--burst]``; settings from the environment."""
    # A random part: after a SIGKILL, rq keeps the old name registered for minutes, and a
    # restarted container often has the same host name and pid.
    process = rq_process.start(
        "python -m ml_backend.trainer", __doc__ or "",
        f"trainer-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}", argv, env)
    if process is None:
        return 2
    global _context
    settings, redis = process.settings, process.redis
    _context = (settings, redis)
    keys = RedisKeys(settings.key_prefix)
    log.info("trainer %s listening on %s (versions in %s)", process.name, keys.train_queue,
             settings.versions_path)

    def set_threads(_worker: object) -> None:  # after the heartbeat: live before torch loads
        if settings.torch_threads:
            import torch  # the job imports it anyway; its CPU share is set before any work

            torch.set_num_threads(settings.torch_threads)

    return rq_process.serve(process, [keys.train_queue], trainer_heartbeat(
        redis, keys, process.name, settings.worker_heartbeat_ttl_s), prepare=set_threads)


if __name__ == "__main__":
    rq_process.run_module("ml_backend.trainer")
