"""Which model versions are served: the model config, the file-system watch and version switches.

This is TF Serving's ServerCore in small: a `ModelServerConfig` names models and base paths; each
poll lists `<base_path>/<version>/` folders, the version policy picks the aspired versions, and
the availability-preserving policy decides what to load and unload. New versions load (and warm
up) in the background; requests switch to a version only once it is AVAILABLE, and an old
version is unloaded only once a newer aspired one is AVAILABLE, so a version that fails to load
never takes the model down. Requests read an immutable routing table, never a lock.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tensorflow_serving.apis import model_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving.errors import (
    ServingError,
    as_serving_error,
    failed_precondition,
    invalid_argument,
    not_found,
)
from serving.metrics import Metrics
from serving.request_log import check_logging_config
from serving.servable import Servable, ServableOptions
from transform.artifacts import TENSORFLOW_PLATFORM

log = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"\d+", re.ASCII)

Loader = Callable[[str, int, Path], Servable]


class State(enum.IntEnum):
    """A version's state, numbered as `ModelVersionStatus.State` in get_model_status.proto."""

    UNKNOWN = 0
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass(frozen=True)
class VersionStatus:
    """What GetModelStatus reports for one version: its state and, after a failure, the error."""

    version: int
    state: State
    error: ServingError | None = None


@dataclass(frozen=True)
class ManagerSettings:
    """How versions are found and loaded; names follow TF Serving's flags.

    `file_system_poll_wait_seconds` <= 0 polls once, when a config is applied (as TF Serving
    does for 0); `poll_now()` polls at any time. A failed load is retried
    `max_num_load_retries` times, `load_retry_interval_seconds` apart, before the version is
    reported END with its error; the retries stop early when a newer version of the model
    appears, so a broken version never holds back the next one. `model_base_path_roots`, when
    given, confines every model's base path to those folders (symbolic links resolved).
    With `background_load`, the threads that load versions run at a lower scheduling priority
    than the ones answering requests (see `lower_thread_priority`).
    """

    file_system_poll_wait_seconds: float = 1.0
    max_num_load_retries: int = 5
    load_retry_interval_seconds: float = 60.0
    num_load_threads: int = 2
    allow_version_labels_for_unavailable_models: bool = False
    model_base_path_roots: tuple[str, ...] = ()
    servable: ServableOptions = field(default_factory=ServableOptions)
    background_load: bool = True


@dataclass
class _Harness:
    """The manager's hold on one aspired or loaded version.

    A version number may come from another folder after a reload moves the model to a new base
    path: `pending` is that folder, loaded while the version keeps serving from `path`, and
    swapped in once it has loaded (`failed` remembers a folder that did not load, so it is not
    tried again until it is replaced).
    """

    version: int
    path: Path
    state: State
    servable: Servable | None = None
    error: ServingError | None = None
    pending: Path | None = None
    failed: Path | None = None


@dataclass
class _Model:
    config: model_server_config_pb2.ModelConfig
    statuses: dict[int, VersionStatus]
    aspired: dict[int, Path] = field(default_factory=dict)
    harnesses: dict[int, _Harness] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    loading: int | None = None
    polled: bool = False
    base_path_error: str | None = None


@dataclass(frozen=True)
class _Routes:
    """An immutable snapshot of what one model serves; replaced whole on every change."""

    versions: Mapping[int, Servable]
    latest: Servable | None
    labels: Mapping[str, int]


def validate_config(config: model_server_config_pb2.ModelServerConfig) -> None:
    """Refuse a config TF Serving refuses, with TF Serving's message (INVALID_ARGUMENT)."""
    kind = config.WhichOneof("config")
    if kind is None:
        return
    if kind != "model_config_list":
        raise invalid_argument(
            "ServerModelConfig type not supported by HandleReloadConfigRequest. "
            "Only ModelConfigList is currently supported"
        )
    names: set[str] = set()
    for model in config.model_config_list.config:
        if model.name in names:
            raise invalid_argument(
                f"Illegal to list model {model.name} multiple times in config list"
            )
        names.add(model.name)
        if not Path(model.base_path).is_absolute() and "://" not in model.base_path:
            raise invalid_argument(
                f"Expected model {model.name} to have an absolute path or URI; "
                f"got base_path()={model.base_path}"
            )
        platform = model.model_platform
        if model.model_type != model_server_config_pb2.MODEL_TYPE_UNSPECIFIED:
            if platform:
                raise invalid_argument(
                    "Illegal setting both ModelServerConfig::model_type (deprecated) and "
                    "ModelServerConfig::model_platform."
                )
            platform = (
                TENSORFLOW_PLATFORM
                if model.model_type == model_server_config_pb2.TENSORFLOW
                else f"model_type {model.model_type}"
            )
        if not platform:
            raise invalid_argument(
                "Illegal setting neither ModelServerConfig::model_type (deprecated) nor "
                "ModelServerConfig::model_platform."
            )
        if platform != TENSORFLOW_PLATFORM:
            raise invalid_argument(f"Model {model.name} requests unsupported platform {platform}")
        if model.HasField("logging_config"):
            check_logging_config(model.name, model.logging_config)


class _BasePathMissing(Exception):
    pass


def aspired_versions(config: model_server_config_pb2.ModelConfig) -> dict[int, Path]:
    """The versions under the model's base path that its version policy wants served."""
    base = Path(config.base_path)
    if not base.is_dir():
        raise _BasePathMissing(f"Could not find base path {base} for servable {config.name}")
    found = {
        int(child.name): child
        for child in base.iterdir()
        if _VERSION_DIR.fullmatch(child.name) and child.is_dir()
    }
    if not found:
        log.warning(
            "No versions of servable %s found under base path %s. Did you forget to name your "
            "leaf directories as numbers (eg. '/1/', '/2/')?",
            config.name,
            base,
        )
    policy = config.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return found
    if choice == "specific":
        wanted = set(policy.specific.versions)
        missing = wanted - set(found)
        if missing:
            log.warning(
                "Versions %s of servable %s not found under base path %s",
                sorted(missing),
                config.name,
                base,
            )
        return {version: path for version, path in found.items() if version in wanted}
    count = max(policy.latest.num_versions, 1) if choice == "latest" else 1
    return {version: found[version] for version in sorted(found, reverse=True)[:count]}


class ModelManager:
    """Loads, routes and unloads model versions as the config and the file system change."""

    def __init__(
        self,
        settings: ManagerSettings | None = None,
        *,
        loader: Loader | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings or ManagerSettings()
        self._loader: Loader = loader or self._load_servable
        self._metrics = metrics or Metrics()
        self._lock = threading.Condition(threading.RLock())
        self._reload_lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._models: dict[str, _Model] = {}
        # TF Serving's state monitor keeps the last state of versions of removed models.
        self._retired: dict[str, dict[int, VersionStatus]] = {}
        self._routes: dict[str, _Routes] = {}
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, self.settings.num_load_threads), thread_name_prefix="model-load"
        )
        self._poll_thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------
    # Life cycle

    def start(self) -> None:
        """Start polling the base paths every `file_system_poll_wait_seconds`."""
        interval = self.settings.file_system_poll_wait_seconds
        if interval > 0 and self._poll_thread is None:
            self._poll_thread = threading.Thread(
                target=self._poll_loop, args=(interval,), name="model-poll", daemon=True
            )
            self._poll_thread.start()

    def stop(self) -> None:
        """Stop polling and loading; versions already loaded stay usable by their holders."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._poll_thread is not None:
            self._poll_thread.join()
            self._poll_thread = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _poll_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.poll_now()
            except Exception:
                # A poll must never end the watch: the next one may succeed.
                log.exception("File system poll failed")

    # ----------------------------------------------------------------------------------------
    # Config

    @property
    def model_names(self) -> list[str]:
        """The names of the models in the current config."""
        with self._lock:
            return sorted(self._models)

    def reload_config(
        self,
        config: model_server_config_pb2.ModelServerConfig,
        *,
        wait: bool = True,
        timeout: float | None = None,
        atomic: bool = True,
    ) -> None:
        """Apply a new model config, as TF Serving's `ServerCore::ReloadConfig`, all or nothing.

        The whole config is checked before anything changes: TF Serving's rules, base paths
        under `model_base_path_roots`, labels (which must point at AVAILABLE versions unless
        `allow_version_labels_for_unavailable_models`). Changed version policies take effect at
        once.

        With `atomic` (a HandleReloadConfigRequest, a changed config file), every model new to
        the server or given another base path or version policy must find a version in its
        base path and load it: the call returns once they have, or puts the previous config
        back (models it added are removed, changed ones return to their previous settings)
        and raises, UNKNOWN naming the models that failed, DEADLINE_EXCEEDED when `timeout`
        passes first. Models the new config leaves out are removed only once it has succeeded,
        so a failed reload never unloads a served model. Without `atomic` (the config a server
        starts with), models that fail stay configured, so a later good version is still
        picked up; with `wait`, the call then returns once their loads have settled and raises
        UNKNOWN naming the new models left without an AVAILABLE version.
        """
        validate_config(config)
        if config.WhichOneof("config") is None:
            log.info("Taking no action for empty config.")
            return
        with self._reload_lock:
            configs = [_copy_model_config(model) for model in config.model_config_list.config]
            self._check_roots(configs)
            with self._lock:
                labels = self._checked_labels(configs)
                previous = {name: (m.config, dict(m.labels)) for name, m in self._models.items()}
            new_names = [model.name for model in configs if model.name not in previous]
            changed = [
                model.name
                for model in configs
                if model.name not in previous or _source_changed(previous[model.name][0], model)
            ]
            if atomic:
                self._check_sources([model for model in configs if model.name in changed])
            kept = {model.name for model in configs}
            with self._lock:
                for model_config in configs:
                    model = self._models.get(model_config.name)
                    if model is None:
                        statuses = self._retired.pop(model_config.name, {})
                        model = self._models[model_config.name] = _Model(model_config, statuses)
                    model.config = model_config
                    model.labels = labels.get(model_config.name, {})
                    if model_config.name in changed:
                        for harness in model.harnesses.values():
                            harness.failed = None  # a folder that failed before may be fixed
                    self._publish(model)
                if not atomic:
                    for name in set(self._models) - kept:
                        self._remove_model(name)
                self._lock.notify_all()
            log.info("Models in config: %s", ", ".join(model.name for model in configs))
            self.poll_now()
            if atomic:
                try:
                    self._await_models(changed, timeout, need_aspired=True)
                except ServingError:
                    self._restore(previous, new_names)
                    raise
                with self._lock:
                    for name in set(self._models) - kept:
                        self._remove_model(name)
                    self._lock.notify_all()
            elif wait:
                self._await_models(new_names, timeout)

    def _check_roots(self, configs: Iterable[model_server_config_pb2.ModelConfig]) -> None:
        """Refuses a base path outside `model_base_path_roots` (PERMISSION_DENIED)."""
        roots = [Path(os.path.realpath(root)) for root in self.settings.model_base_path_roots]
        if not roots:
            return
        allowed = ", ".join(str(root) for root in roots)
        for config in configs:
            if "://" in config.base_path:
                raise ServingError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"Model {config.name}: base path {config.base_path} is not a local folder "
                    f"under the allowed roots ({allowed}; --model_base_path_roots)",
                )
            # Resolved, so neither '..' nor a symbolic link leads out of a root.
            base = Path(os.path.realpath(config.base_path))
            if not any(base == root or root in base.parents for root in roots):
                raise ServingError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"Model {config.name}: base path {config.base_path} is outside the allowed "
                    f"roots ({allowed}; --model_base_path_roots)",
                )

    @staticmethod
    def _check_sources(configs: Iterable[model_server_config_pb2.ModelConfig]) -> None:
        """Refuses (UNKNOWN, as TF Serving) a model whose base path holds no version to serve."""
        for config in configs:
            try:
                found = aspired_versions(config)
            except (_BasePathMissing, OSError) as error:
                reason = str(error)
            else:
                if found:
                    continue
                reason = f"no versions found under {config.base_path}"
            detail = f"{{{{name: {config.name}}} due to error: {reason}}}, "
            raise ServingError(
                grpc.StatusCode.UNKNOWN,
                f"1 model(s) did not become available: {{{detail}}}; the config was not applied",
            )

    def _restore(
        self,
        previous: dict[str, tuple[model_server_config_pb2.ModelConfig, dict[str, int]]],
        added: list[str],
    ) -> None:
        """Puts back the models and settings a failed reload changed."""
        with self._lock:
            for name in added:
                if name in self._models:
                    self._remove_model(name)
            for name, (config, labels) in previous.items():
                model = self._models.get(name)
                if model is not None:
                    model.config = config
                    model.labels = labels
                    self._publish(model)
            self._lock.notify_all()
        log.warning("Model config not applied; the previous one is kept")
        self.poll_now()

    def _checked_labels(
        self, configs: Iterable[model_server_config_pb2.ModelConfig]
    ) -> dict[str, dict[str, int]]:
        labels: dict[str, dict[str, int]] = {}
        for config in configs:
            model = self._models.get(config.name)
            for label, version in config.version_labels.items():
                allowed = False
                if self.settings.allow_version_labels_for_unavailable_models:
                    previous = model.labels.get(label) if model else None
                    allowed = previous is None or previous == version
                harness = model.harnesses.get(version) if model else None
                available = harness is not None and harness.state == State.AVAILABLE
                if not (allowed or available):
                    raise failed_precondition(
                        f"Request to assign label to version {version} of model {config.name}, "
                        "which is not currently available for inference"
                    )
                labels.setdefault(config.name, {})[label] = version
        return labels

    def _remove_model(self, name: str) -> None:
        model = self._models.pop(name)
        for version in sorted(model.harnesses):
            harness = model.harnesses[version]
            if harness.state == State.AVAILABLE:
                self._unload(model, harness)
            elif harness.state == State.START:
                self._set_status(model, version, State.END)
        model.aspired = {}
        self._retired[name] = model.statuses
        self._routes = {key: value for key, value in self._routes.items() if key != name}
        log.info("Removed model %s from the config", name)

    def _await_models(
        self, names: list[str], timeout: float | None, *, need_aspired: bool = False
    ) -> None:
        """Wait until the named models' loads have settled; raise naming those that failed.

        A model failed when it serves nothing, or with `need_aspired`, when none of the versions
        its current base path and policy ask for is AVAILABLE (it may still serve an older one).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        with self._lock:
            while not self._stop.is_set():
                if all(self._settled(name) for name in names):
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    timed_out = True
                    break
                self._lock.wait(remaining)
            if timed_out:
                raise ServingError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"Models {', '.join(names)} did not finish loading within {timeout:.3g} s",
                )
            failures = [
                self._failure_description(name)
                for name in names
                if name in self._models and not self._serves(name, need_aspired)
            ]
        if failures:
            raise ServingError(
                grpc.StatusCode.UNKNOWN,
                f"{len(failures)} model(s) did not become available: {{{''.join(failures)}}}",
            )

    def _serves(self, name: str, need_aspired: bool) -> bool:
        routes = self._routes.get(name, _NO_ROUTES)
        if not need_aspired:
            return routes.latest is not None
        model = self._models[name]
        return any(
            model.aspired.get(version) == model.harnesses[version].path
            for version in routes.versions
            if version in model.harnesses
        )

    def _settled(self, name: str) -> bool:
        # Every aspired version has been tried, not just the latest: a server that has started
        # serves all the versions its policy asks for (and labels on older ones work at once).
        model = self._models.get(name)
        if model is None or model.base_path_error is not None:
            return True
        busy = model.loading is not None or any(
            h.state in (State.START, State.LOADING) or h.pending for h in model.harnesses.values()
        )
        return model.polled and not busy

    def _failure_description(self, name: str) -> str:
        model = self._models[name]
        if model.base_path_error is not None:
            return f"{{{{name: {name}}} due to error: {model.base_path_error}}}, "
        failed = [h for h in model.harnesses.values() if h.error is not None]
        if not failed:
            reason = f"no versions found under {model.config.base_path}"
            return f"{{{{name: {name}}} due to error: {reason}}}, "
        return "".join(
            f"{{{{name: {name} version: {h.version}}} due to error: {h.error}}}, "
            for h in sorted(failed, key=lambda h: -h.version)
        )

    # ----------------------------------------------------------------------------------------
    # File-system watch and version policy

    def poll_now(self) -> None:
        """List every model's base path now and start loading or unloading what changed.

        Returns once the changes are started; loads finish in the background
        (see `wait_until_available`).
        """
        with self._poll_lock:
            with self._lock:
                configs = [model.config for model in self._models.values()]
            for config in configs:
                try:
                    aspired: dict[int, Path] | None = aspired_versions(config)
                    error = None
                except (_BasePathMissing, OSError) as exc:
                    aspired, error = None, str(exc)
                    log.error("File system storage path source: %s", error)
                with self._lock:
                    model = self._models.get(config.name)
                    if model is None or model.config is not config:
                        continue  # the config changed meanwhile; the next poll sees the new one
                    model.polled = True
                    model.base_path_error = error
                    if aspired is not None:
                        self._set_aspired(model, aspired)
                        self._reconcile(model)
                    self._lock.notify_all()

    def _set_aspired(self, model: _Model, aspired: dict[int, Path]) -> None:
        model.aspired = aspired
        for version, path in aspired.items():
            harness = model.harnesses.get(version)
            if harness is None or (harness.state == State.END and harness.path != path):
                model.harnesses[version] = _Harness(version, path, State.START)
                self._set_status(model, version, State.START)
            elif harness.path == path:
                harness.pending = None
            elif harness.state == State.START:
                harness.path = path
            elif harness.failed != path:
                # Loaded (or loading) from another folder: keep serving it until this one has
                # loaded in its place.
                harness.pending = path
        for version in list(model.harnesses):
            harness = model.harnesses[version]
            if version in aspired:
                continue
            if harness.state == State.START:
                del model.harnesses[version]
                self._set_status(model, version, State.END)
            elif harness.state == State.END:
                # Forget the failure: if the folder comes back it is loaded afresh.
                del model.harnesses[version]

    def _reconcile(self, model: _Model) -> None:
        """One step of TF Serving's AvailabilityPreservingPolicy, repeated until stable.

        Unload a version that is no longer aspired only when an aspired version is AVAILABLE,
        when nothing is aspired, or when another unaspired version is still AVAILABLE; then load
        the highest new aspired version, one at a time per model.
        """
        while True:
            ready = sorted(v for v, h in model.harnesses.items() if h.state == State.AVAILABLE)
            aspired_ready = [v for v in ready if v in model.aspired]
            unaspired_ready = [v for v in ready if v not in model.aspired]
            if unaspired_ready and (not model.aspired or aspired_ready or len(unaspired_ready) > 1):
                self._unload(model, model.harnesses[unaspired_ready[0]])
                continue
            break
        if model.loading is None and not self._stop.is_set():
            new = [
                v
                for v, h in model.harnesses.items()
                if v in model.aspired
                and (h.state == State.START or (h.state == State.AVAILABLE and h.pending))
            ]
            if new:
                harness = model.harnesses[max(new)]
                model.loading = harness.version
                if harness.state == State.START:
                    harness.state = State.LOADING
                    self._set_status(model, harness.version, State.LOADING)
                self._executor.submit(self._load, model, harness)
        self._publish(model)
        self._lock.notify_all()

    def _unload(self, model: _Model, harness: _Harness) -> None:
        # Requests in flight keep their own reference to the servable and finish on it.
        self._set_status(model, harness.version, State.UNLOADING)
        harness.servable = None
        harness.state = State.END
        model.harnesses.pop(harness.version, None)
        self._set_status(model, harness.version, State.END)
        log.info(
            "Unloaded servable version {name: %s version: %d}", model.config.name, harness.version
        )

    def _load_servable(self, name: str, version: int, path: Path) -> Servable:
        return Servable.load(name, version, path, self.settings.servable)

    def _load(self, model: _Model, harness: _Harness) -> None:
        if self.settings.background_load:
            lower_thread_priority()
        name, version = model.config.name, harness.version
        with self._lock:
            # A version already serving is replaced from its new folder only once that loaded.
            replacing = harness.state == State.AVAILABLE and harness.pending is not None
            path = harness.pending if replacing and harness.pending else harness.path
        attempts = max(0, self.settings.max_num_load_retries) + 1
        servable: Servable | None = None
        error: ServingError | None = None
        for attempt in range(attempts):
            log.info("Loading servable version {name: %s version: %d}", name, version)
            try:
                with load_isolated(self.settings.background_load):
                    servable = self._loader(name, version, path)
                error = None
                self._metrics.record_load(name, version, "OK")
                break
            except Exception as exc:
                error = as_serving_error(exc)
                self._metrics.record_load(name, version, error.code.name)
                log.error(
                    "Loading servable: {name: %s version: %d} failed: %s", name, version, error
                )
            if attempt + 1 == attempts or not self._retry_wanted(model, version, path):
                break
            log.info(
                "Retrying load of {name: %s version: %d} in %.3g s (retry %d of %d)",
                name,
                version,
                self.settings.load_retry_interval_seconds,
                attempt + 1,
                attempts - 1,
            )
            if not self._wait_for_retry(model, version, path):
                log.info(
                    "Not retrying {name: %s version: %d}: a newer version waits to load, or "
                    "this one is no longer wanted",
                    name,
                    version,
                )
                break
        with self._lock:
            if model.loading == version:
                model.loading = None
            current = self._models.get(name) is model and model.harnesses.get(version) is harness
            # A model removed meanwhile keeps reporting its last states, unless it was added
            # back: then these statuses belong to the new model's versions.
            reported = current or self._retired.get(name) is model.statuses
            if replacing:
                if harness.pending == path:
                    harness.pending = None
                if error is None and servable is not None:
                    harness.servable, harness.path, harness.error = servable, path, None
                    log.info(
                        "Replaced servable version {name: %s version: %d} with %s",
                        name,
                        version,
                        path,
                    )
                else:
                    harness.error, harness.failed = error, path
            elif error is None and current and servable is not None:
                harness.servable = servable
                harness.state = State.AVAILABLE
                self._set_status(model, version, State.AVAILABLE)
                log.info(
                    "Successfully loaded servable version {name: %s version: %d}", name, version
                )
            else:
                harness.state = State.END
                harness.error = error
                if reported:
                    self._set_status(model, version, State.END, error)
            if self._models.get(name) is model:
                self._reconcile(model)
            self._lock.notify_all()

    def _retry_wanted(self, model: _Model, version: int, path: Path) -> bool:
        """Whether a failed version is still worth retrying: it is aspired from `path`, and no
        newer aspired version waits for the model's one load slot."""
        with self._lock:
            if self._stop.is_set() or self._models.get(model.config.name) is not model:
                return False
            newer_waiting = any(
                harness.state == State.START and newer > version and newer in model.aspired
                for newer, harness in model.harnesses.items()
            )
            return model.aspired.get(version) == path and not newer_waiting

    def _wait_for_retry(self, model: _Model, version: int, path: Path) -> bool:
        """Wait out the retry interval; False as soon as the retry is no longer wanted.

        A poll that finds a newer version wakes this wait (it notifies the lock), so the newer
        version loads at once instead of after the failed one's retries.
        """
        deadline = time.monotonic() + self.settings.load_retry_interval_seconds
        with self._lock:
            while self._retry_wanted(model, version, path):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                self._lock.wait(remaining)
        return False

    # ----------------------------------------------------------------------------------------
    # State and routing

    @staticmethod
    def _set_status(
        model: _Model, version: int, state: State, error: ServingError | None = None
    ) -> None:
        model.statuses[version] = VersionStatus(version, state, error)

    def _publish(self, model: _Model) -> None:
        versions = {
            version: harness.servable
            for version, harness in model.harnesses.items()
            if harness.state == State.AVAILABLE and harness.servable is not None
        }
        latest = versions[max(versions)] if versions else None
        routes = _Routes(versions, latest, dict(model.labels))
        self._routes = {**self._routes, model.config.name: routes}

    def servable(self, spec: model_pb2.ModelSpec) -> Servable:
        """The servable a request's ModelSpec names, or TF Serving's error for it."""
        name = spec.name
        if not name:
            raise invalid_argument("ModelSpec has no name specified.")
        routes = self._routes.get(name)
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            label = spec.version_label
            version = routes.labels.get(label) if routes is not None else None
            if version is None:
                raise invalid_argument(f"Unrecognized servable version label: {label}")
            return self._specific(routes, name, version)
        if choice == "version":
            return self._specific(routes, name, spec.version.value)
        latest = routes.latest if routes is not None else None
        if latest is None:
            raise not_found(f"Servable not found for request: Latest({name})")
        return latest

    @staticmethod
    def _specific(routes: _Routes | None, name: str, version: int) -> Servable:
        servable = routes.versions.get(version) if routes is not None else None
        if servable is None:
            raise not_found(f"Servable not found for request: Specific({name}, {version})")
        return servable

    def is_configured(self, name: str) -> bool:
        """Whether the current config names this model."""
        return name in self._routes

    def version_statuses(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """The states GetModelStatus reports, highest version first."""
        with self._lock:
            model = self._models.get(name)
            statuses = dict(model.statuses if model is not None else self._retired.get(name, {}))
        if version is not None:
            status = statuses.get(version)
            if status is None:
                raise not_found(f"Could not find version {version} of model {name}")
            return [status]
        if not statuses:
            raise not_found(f"Could not find any versions of model {name}")
        return [statuses[v] for v in sorted(statuses, reverse=True)]

    def wait_until_available(
        self, name: str, version: int | None = None, timeout: float = 30.0
    ) -> bool:
        """Wait until the model (or this version of it) is served; False on timeout.

        Returns False early when the named version has failed to load: it will not become
        available unless its folder changes.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._stop.is_set():
                routes = self._routes.get(name)
                if routes is not None and (
                    routes.latest is not None if version is None else version in routes.versions
                ):
                    return True
                if version is not None:
                    model = self._models.get(name)
                    status = model.statuses.get(version) if model is not None else None
                    if status is not None and status.state == State.END and status.error:
                        return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return False


_NO_ROUTES = _Routes({}, None, {})

_isolation_lock = threading.Lock()
_isolated_loads = 0
_serving_switch_interval = 0.005

LOADING_SWITCH_INTERVAL_S = 0.0005
"""Python's thread switch interval while a version loads in the background (default 5 ms)."""


@contextlib.contextmanager
def load_isolated(isolate: bool = True) -> Iterator[None]:
    """Runs a version's load (and warmup) so that the threads answering requests barely wait.

    Process-wide, while the block runs:

    - Python's automatic garbage collection is off. Loading a SavedModel allocates tens of
      thousands of Python objects, which trigger full collections: each stops every thread for
      as long as it takes to walk every object (200 ms and more with a model loaded), requests
      included. The collector runs afterwards on the young generations only.
    - Python's thread switch interval is LOADING_SWITCH_INTERVAL_S. The load is mostly
      Python holding the interpreter lock; a request thread that needs the lock (to parse, to
      answer) waits until the holder is asked to give it up, up to one interval each time.
      With the default 5 ms, the p99 of requests answered in the seconds of a load was 1.3 to
      1.7 times what it is at 0.5 ms (bench/swap_bench.py); switching more often costs the
      load little.
    """
    global _isolated_loads, _serving_switch_interval
    if not isolate:
        yield
        return
    with _isolation_lock:
        _isolated_loads += 1
        if _isolated_loads == 1:
            gc.disable()
            _serving_switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_serving_switch_interval, LOADING_SWITCH_INTERVAL_S))
    try:
        yield
    finally:
        with _isolation_lock:
            _isolated_loads -= 1
            if _isolated_loads == 0:
                sys.setswitchinterval(_serving_switch_interval)
                gc.enable()
                # The load's objects are young: collected here, in the loading thread, rather
                # than in whichever request allocates next.
                gc.collect(1)


BACKGROUND_NICENESS = 10
"""How much lower a loading thread's priority is than the server's (Unix nice levels)."""


def lower_thread_priority(niceness: int = BACKGROUND_NICENESS) -> bool:
    """Lowers the calling thread's scheduling priority by ``niceness`` (at most to 19).

    On Linux a thread's id names that thread alone to setpriority, so the threads answering
    requests keep their priority: when both want a CPU, the kernel runs them first, and a
    version loading and warming up takes the time they leave. Returns False where the system
    does not allow it (the thread then loads at the server's priority).
    """
    try:
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + niceness))
    except (OSError, AttributeError):
        return False
    return True


def _source_changed(
    old: model_server_config_pb2.ModelConfig, new: model_server_config_pb2.ModelConfig
) -> bool:
    """Whether a model's versions come from elsewhere: another base path or version policy."""
    return (
        old.base_path != new.base_path
        or old.model_version_policy != new.model_version_policy
        or old.model_platform != new.model_platform
    )


def _copy_model_config(
    config: model_server_config_pb2.ModelConfig,
) -> model_server_config_pb2.ModelConfig:
    copy = model_server_config_pb2.ModelConfig()
    copy.CopyFrom(config)
    return copy
