"""Deploying a validated model into a TF Serving model base path, and rolling back.

A version appears in ``<base>/<model_name>/<version>/`` all at once: it is copied into a hidden
temporary folder beside it and renamed into place, so a server that polls the base path never
sees half a model. A rollback moves the newest version out of the base path (into
``<base>/<model_name>/.retired/``, with a note of when and what), so a server with the usual
"latest version" policy serves the previous one again; nothing is deleted.

Deploys and rollbacks of one model base path hold its lock (``<base>/<model_name>/.lock``), so
two of them never pick the same version number, and the staging copies a killed deploy left are
removed by the next one. A model is deployed only on a current verdict: one that compared it
with the version served now, made after any rollback of it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serving.release.server_client import ModelServerClient, ModelServerError
from transform.artifacts import (
    VERDICT_FILE,
    check_models_dir,
    export_dir,
    version_dir,
    versions,
)
from transform.errors import WidedeepError
from transform.paths import locked, remove_leftovers

log = logging.getLogger(__name__)

RETIRED_DIR = ".retired"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"


class DeployError(WidedeepError, RuntimeError):
    """A model that may not be deployed, or a deployment the server did not confirm."""


@dataclass(frozen=True)
class Deployment:
    """What a deploy or rollback did."""

    model_name: str
    version: int
    path: Path
    confirmed: bool
    previous: int | None


def fingerprint(model_dir: str | Path) -> str:
    """A hash of every file of a SavedModel: a verdict holds only for the model it judged."""
    root = export_dir(model_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def check_verdict(model_dir: str | Path) -> dict:
    """The model's passing verdict; raises :class:`DeployError` if there is none for it."""
    model = Path(model_dir)
    path = model / VERDICT_FILE
    if not path.exists():
        raise DeployError(f"{model}: no {VERDICT_FILE}; run 'widedeep validate' on it first")
    verdict = json.loads(path.read_text())
    if not verdict.get("passed"):
        reasons = "; ".join(verdict.get("reasons", [])) or "see the verdict"
        raise DeployError(f"{model}: its validation failed ({reasons}); it is not deployed")
    if verdict.get("fingerprint") != fingerprint(model):
        raise DeployError(
            f"{model}: the model changed after it was validated (fingerprint "
            f"{verdict.get('fingerprint')} vs {fingerprint(model)}); validate it again"
        )
    return verdict


def stale_verdict(verdict: dict, base_path: str | Path, model_name: str) -> str | None:
    """Why a passing verdict no longer holds for deploying into this base path, if it does not.

    A verdict holds when it compared the model with the version served now (the newest under
    the base path; any verdict holds while nothing is served), and was made after the last
    rollback of this very model.
    """
    folder = Path(base_path) / model_name
    existing = versions(base_path, model_name)
    model = verdict.get("model", "the model")
    created = _parse_time(verdict.get("created"))
    for record in _rollbacks(folder):
        retired = _parse_time(record.get("retired"))
        if record.get("fingerprint") != verdict.get("fingerprint"):
            continue
        if created is None or retired is None or created <= retired:
            return (
                f"{model}: it was deployed as version {record.get('version')} and rolled back "
                f"at {record.get('retired')}, after its verdict ({verdict.get('created')})"
            )
    if not existing:
        return None
    served = version_dir(base_path, model_name, existing[-1])
    if verdict.get("baseline") is None:
        return (
            f"{model}: its verdict was made when no model was served, but version "
            f"{existing[-1]} of {model_name} is served now ({served}); it was never compared "
            "with it"
        )
    baseline_fingerprint = verdict.get("baseline_fingerprint")
    if baseline_fingerprint is None:  # a verdict written before baselines were fingerprinted
        try:
            baseline_fingerprint = fingerprint(verdict["baseline"])
        except (DeployError, OSError):
            baseline_fingerprint = None
    if baseline_fingerprint != fingerprint(served):
        return (
            f"{model}: its verdict compared it with {verdict['baseline']}, but version "
            f"{existing[-1]} of {model_name} is served now ({served}), another model"
        )
    return None


Revalidate = Callable[[Path | None], None]
"""Validates the model again against a baseline (the version served now, or None)."""


def deploy(
    model_dir: str | Path,
    base_path: str | Path,
    model_name: str,
    server: str | None = None,
    timeout_s: float = 120.0,
    *,
    wait: bool = False,
    revalidate: Revalidate | None = None,
    echo: Callable[[str], None] | None = None,
) -> Deployment:
    """Copies a validated model into the base path as the next version.

    Args:
      model_dir: Training output folder (or its SavedModel).
      base_path: The TF Serving model base path (holds ``<model_name>/<version>/``).
      model_name: The model's name on the server.
      server: ``host:port`` of a server watching the base path, to confirm the new version
        becomes AVAILABLE; None to skip the check.
      timeout_s: How long to wait for the confirmation.
      wait: When another deploy or rollback holds the base path, wait for it instead of
        failing.
      revalidate: Called (holding the base path) when the model's verdict is not current (see
        :func:`stale_verdict`), with the version served now; it must write a new verdict,
        which is then checked like the first.
      echo: Where a wait is announced (default: the log).

    Raises:
      DeployError: no passing verdict for this exact model, a verdict that is not current
        (without ``revalidate``), or the server did not confirm.
      InUseError: another deploy or rollback holds the base path (and ``wait`` is False).
    """
    verdict = check_verdict(model_dir)
    source = export_dir(model_dir)
    check_models_dir(base_path, model_name)
    folder = Path(base_path) / model_name
    folder.mkdir(parents=True, exist_ok=True)
    with locked(
        folder / LOCK_FILE, f"the model base path {folder}", wait=wait, echo=echo or log.info
    ):
        _remove_staging(folder)
        problem = stale_verdict(verdict, base_path, model_name)
        if problem and revalidate is not None:
            existing = versions(base_path, model_name)
            revalidate(version_dir(base_path, model_name, existing[-1]) if existing else None)
            verdict = check_verdict(model_dir)
            problem = stale_verdict(verdict, base_path, model_name)
        if problem:
            raise DeployError(
                f"{problem}; validate it again (widedeep validate --model_base_path), or deploy "
                "with --revalidate"
            )
        # The version is picked holding the lock: two deploys never pick the same one.
        existing = versions(base_path, model_name)
        retired = _retired_versions(folder)
        version = max([0, *existing, *retired]) + 1
        staging = folder / f"{STAGING_PREFIX}{version}-{os.getpid()}"
        try:
            shutil.copytree(source, staging)
            # A rename within one folder is atomic: the version appears whole or not at all.
            os.rename(staging, version_dir(base_path, model_name, version))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    confirmed = False
    if server:
        wait_for_version(server, model_name, version, timeout_s)
        confirmed = True
    return Deployment(
        model_name,
        version,
        version_dir(base_path, model_name, version),
        confirmed,
        existing[-1] if existing else None,
    )


def rollback(
    base_path: str | Path,
    model_name: str,
    server: str | None = None,
    timeout_s: float = 120.0,
    *,
    wait: bool = False,
    echo: Callable[[str], None] | None = None,
) -> Deployment:
    """Retires the newest version so the previous one is served again.

    The retired version keeps its folder under ``.retired/``, beside a note of its fingerprint
    and time: the model it holds is deployed again only on a verdict made after the rollback.

    Raises:
      DeployError: fewer than two versions, or the server did not confirm the previous one.
      InUseError: another deploy or rollback holds the base path (and ``wait`` is False).
    """
    check_models_dir(base_path, model_name)
    folder = Path(base_path) / model_name
    if not folder.is_dir():
        raise DeployError(
            f"{folder}: no such model base path; a rollback needs a previous version to return to"
        )
    with locked(
        folder / LOCK_FILE, f"the model base path {folder}", wait=wait, echo=echo or log.info
    ):
        _remove_staging(folder)
        existing = versions(base_path, model_name)
        if len(existing) < 2:
            raise DeployError(
                f"{folder}: {len(existing)} version(s); a rollback needs a previous version to "
                "return to"
            )
        newest, previous = existing[-1], existing[-2]
        retired = folder / RETIRED_DIR
        retired.mkdir(exist_ok=True)
        # Noted first: a deploy of this model must then bring a verdict made after it.
        note = {
            "version": newest,
            "fingerprint": fingerprint(version_dir(base_path, model_name, newest)),
            "retired": dt.datetime.now(dt.UTC).isoformat(),
        }
        (retired / f"{newest}.json").write_text(json.dumps(note, indent=2) + "\n")
        os.rename(version_dir(base_path, model_name, newest), retired / str(newest))
    confirmed = False
    if server:
        wait_for_version(server, model_name, previous, timeout_s)
        confirmed = True
    return Deployment(
        model_name, previous, version_dir(base_path, model_name, previous), confirmed, newest
    )


def _retired_versions(folder: Path) -> list[int]:
    retired = folder / RETIRED_DIR
    if not retired.is_dir():
        return []
    return [int(p.name) for p in retired.iterdir() if p.name.isdigit()]


def _rollbacks(folder: Path) -> list[dict]:
    """The notes rollbacks left beside the versions they retired."""
    notes = []
    for path in sorted((folder / RETIRED_DIR).glob("*.json")):
        try:
            notes.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return notes


def _remove_staging(folder: Path) -> None:
    """Removes the staging copies of deploys that were killed (call holding the lock)."""
    for path in remove_leftovers(folder, [f"{STAGING_PREFIX}*"]):
        log.info("deploy: removed %s, left by an interrupted deploy", path)


def _parse_time(text: object) -> dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        return None


def wait_for_version(server: str, model_name: str, version: int, timeout_s: float) -> None:
    """Waits until ``version`` is the server's newest AVAILABLE version.

    Raises:
      DeployError: not so within ``timeout_s``, or the version failed to load; the message
        gives the last states seen.
    """
    try:
        with ModelServerClient(server, model_name) as client:
            client.wait_for_version(version, timeout_s, newest=True)
    except ModelServerError as e:
        raise DeployError(f"{server}: {e}") from None
