"""Import a folder of images into a Label Studio project as tasks (``{"image": URL}``).

Three ways for Label Studio to reach the images:
  local files (default)  the folder lies under Label Studio's local-files root
                         (LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, --document-root; the
                         scripts/labelstudio_env.sh default is ./data); a local storage for the
                         folder is added to the project (Label Studio serves local files only to
                         projects with one) and tasks point at /data/local-files/?d=<path>
  --url-prefix URL       the images are served elsewhere: tasks point at URL + relative path
  --upload               the files are uploaded into Label Studio (copied into its media folder)

Usage:
  python scripts/import_tasks.py data/wires --project 3
  python scripts/import_tasks.py photos/ --project 3 --upload --api-key TOKEN
"""

from __future__ import annotations

import argparse
import mimetypes
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from _labelstudio import connect, project_parser  # sibling module of scripts/

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def list_images(folder: Path, recursive: bool) -> list[Path]:
    """Image files of ``folder`` (and its subfolders when recursive), sorted by path."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern)
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def prefixed_urls(images: Sequence[Path], folder: Path, url_prefix: str) -> list[str]:
    """Task image URLs for images served at ``url_prefix`` + their path relative to ``folder``."""
    return [url_prefix.rstrip("/") + "/" + p.relative_to(folder).as_posix() for p in images]


def local_file_urls(images: Sequence[Path], document_root: Path) -> list[str]:
    """Task image URLs of Label Studio local files (``/data/local-files/?d=<relative path>``).

    Raises:
        SystemExit: an image is not under the document root.
    """
    root = document_root.resolve()
    try:
        return [f"/data/local-files/?d={p.resolve().relative_to(root).as_posix()}"
                for p in images]
    except ValueError:
        raise SystemExit(f"the images are not under the local-files root {root}: pass "
                         "--document-root (Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT), "
                         "--url-prefix or --upload") from None


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def ensure_local_storage(client: Any, project: int, folder: Path) -> None:
    """Add a local storage for ``folder`` to the project unless one covers it already."""
    path = str(folder.resolve())
    for storage in client.import_storage.local.list(project=project):
        if storage.path and path.startswith(str(storage.path).rstrip("/")):
            return
    client.import_storage.local.create(project=project, path=path, use_blob_urls=True,
                                       title=f"talk2sam {folder.name}")


def upload(client: Any, project: int, images: Sequence[Path], batch: int) -> int:
    """Upload files through the SDK's authenticated HTTP client (label-studio-sdk 2.1.2 has no
    upload method); one request per batch, each file under its own form field."""
    from tqdm import tqdm

    http = client._client_wrapper.httpx_client
    created = 0
    with tqdm(total=len(images), desc="uploading", unit="img") as bar:
        for chunk in batches(images, batch):
            files = {f"file{i}": (p.name, p.read_bytes(),
                                  mimetypes.guess_type(p.name)[0] or "application/octet-stream")
                     for i, p in enumerate(chunk)}
            response = http.request(f"api/projects/{project}/import", method="POST", files=files,
                                    params={"return_task_ids": "true"})
            response.raise_for_status()
            created += len(response.json().get("task_ids") or [])
            bar.update(len(chunk))
    return created


def import_urls(client: Any, project: int, urls: Sequence[str], image_key: str,
                batch: int) -> int:
    from tqdm import tqdm

    created = 0
    with tqdm(total=len(urls), desc="importing", unit="task") as bar:
        for chunk in batches(urls, batch):
            done = client.projects.import_tasks(project, request=[{image_key: u} for u in chunk],
                                                return_task_ids=True)
            created += len(done.task_ids or [])
            bar.update(len(chunk))
    return created


def build_parser() -> argparse.ArgumentParser:
    parser = project_parser(__doc__)
    parser.add_argument("folder", type=Path, help="folder of images")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--document-root", type=Path,
                     default=Path(os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "data")),
                     help="Label Studio's local-files root (default "
                          "$LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT or ./data)")
    how.add_argument("--url-prefix", help="images are served at URL/<relative path>")
    how.add_argument("--upload", action="store_true", help="upload the files into Label Studio")
    parser.add_argument("--recursive", action="store_true", help="include subfolders")
    parser.add_argument("--image-key", default="image",
                        help="task data key of the label config's <Image value=\"$image\"> "
                             "(default image)")
    parser.add_argument("--no-storage", action="store_true",
                        help="local files: do not add a local storage to the project")
    parser.add_argument("--batch", type=int, default=200, help="tasks per request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    images = list_images(args.folder, args.recursive)
    if not images:
        print(f"error: no images in {args.folder}", file=sys.stderr)
        return 2
    if args.upload:
        created = upload(connect(args), args.project, images, max(1, min(args.batch, 50)))
    else:
        local = args.url_prefix is None
        urls = (local_file_urls(images, args.document_root) if local
                else prefixed_urls(images, args.folder, args.url_prefix))
        client = connect(args)
        if local and not args.no_storage:
            ensure_local_storage(client, args.project, args.folder)
        created = import_urls(client, args.project, urls, args.image_key, args.batch)
    print(f"{created} tasks created in project {args.project} from {len(images)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
