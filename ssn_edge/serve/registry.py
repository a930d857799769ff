"""The models a server serves: names, versions, each an opened bundle with its compiled engine and worker.

From bundle folders (`serve BUNDLE...`: each is version 1 of a model named after its folder, or NAME=PATH) or
from a model repository (`serve --repo DIR`: every version of every model, as `repository` lays them out).
The latest version answers when a request names none. Everything is loaded and compiled before the server
listens: a bad bundle stops the start with its one-line error, never a model that fails at the first request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ssn_edge.runtime.bundle import Bundle, BundleError, load_bundle
from ssn_edge.runtime.engine import Engine
from ssn_edge.serve import repository
from ssn_edge.serve.worker import ModelWorker

log = logging.getLogger("ssn_edge.serve")


class NotFound(LookupError):
    pass


@dataclass(frozen=True)
class ServeOptions:
    """precision: for bundle folders (None: int8 if the bundle has it, else fp32); a repository version holds
    one. queue_size: requests waiting per model beyond those running. timeout_s: per request. max_body_mb: the
    largest request body. device, mode: as for predict (mode throughput: the same compiled model predict runs)."""

    precision: str | None = None
    queue_size: int = 8
    timeout_s: float = 30.0
    max_body_mb: float = 64.0
    device: str = "CPU"
    mode: str = "throughput"
    threads: int | None = None  # per model (None: the compiled model's optimal number of requests)

    def __post_init__(self) -> None:
        if self.queue_size < 0:
            raise ValueError(f"queue size must be >= 0, got {self.queue_size}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout_s}")
        if not self.max_body_mb > 0:
            raise ValueError(f"max body must be > 0 MB, got {self.max_body_mb}")


@dataclass
class ModelVersion:
    name: str
    version: int
    bundle: Bundle
    precision: str
    engine: Engine
    worker: ModelWorker = field(repr=False)

    @property
    def input_name(self) -> str:
        """The IR's input tensor name (what OVMS, serving the same IR, calls it too)."""
        return self.engine.compiled.inputs[0].get_any_name()


class Registry:
    def __init__(self) -> None:
        self.models: dict[str, dict[int, ModelVersion]] = {}

    def add(self, name: str, version: int, bundle: Bundle, precision: str, options: ServeOptions) -> ModelVersion:
        if version in self.models.get(name, {}):
            raise ValueError(f"model {name!r} version {version} given twice ({bundle.path})")
        engine = Engine(bundle, precision=precision, device=options.device, mode=options.mode)
        worker = ModelWorker(engine, options.queue_size, f"{name}-{version}", options.threads)
        entry = ModelVersion(name, version, bundle, precision, engine, worker)
        self.models.setdefault(name, {})[version] = entry
        log.info("model %s version %d: %s (%s, runs %s, %d threads)", name, version, bundle.path, precision,
                 engine.inference_precision, worker.threads)
        return entry

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        found = self.models.get(name)
        if found is None:
            raise NotFound(f"model {name!r} not found (serving: {', '.join(sorted(self.models)) or 'none'})")
        if version is None:
            return found[max(found)]
        if not version.isdigit() or int(version) not in found:
            raise NotFound(f"model {name!r} has no version {version!r} (has: {', '.join(map(str, sorted(found)))})")
        return found[int(version)]

    def close(self) -> None:
        for versions in self.models.values():
            for entry in versions.values():
                entry.worker.close()


def _named(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if sep and name and not Path(spec).exists():
        return repository.check_name(name), Path(path)
    return repository.check_name(Path(spec).resolve().name), Path(spec)


def build_registry(bundles: Sequence[str], repo: str | Path | None, options: ServeOptions) -> Registry:
    """Load every bundle ([NAME=]PATH, version 1 each) and every version in repo."""
    if not bundles and repo is None:
        raise ValueError("nothing to serve: give bundle folders or --repo DIR")
    registry = Registry()
    try:
        for spec in bundles:
            name, path = _named(spec)
            bundle = load_bundle(path)
            registry.add(name, 1, bundle, options.precision or repository.default_precision(bundle), options)
        if repo is not None:
            found = repository.models(Path(repo))
            if not found:
                raise BundleError(f"{repo}: no model versions in this repository (add one with `ssn-edge repo add`)")
            for name, versions in found.items():
                for v in versions:
                    bundle = load_bundle(v.path)
                    registry.add(name, v.version, bundle, bundle.precisions[0], options)
    except BaseException:
        registry.close()
        raise
    return registry
