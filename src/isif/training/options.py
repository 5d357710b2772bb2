"""The options of ``isif train``, ``race``, ``bench`` and ``presets``, and how they resolve into a run's config.

Each command's own options are one dataclass of ``setting`` fields (default, help, check); the settings of the
run itself are the config's sections (``isif.training.config``), given as ``{"section.field": value}`` in
``settings``. ``setting_fields`` maps every section's flag to its fields; ``resolve_train`` turns
``TrainOptions`` into the config and run folder that ``training.loop.train`` takes.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base.errors import UserError
from ..base.settings import at_least, field_hints, flag_name, setting

Owners = list[tuple[str, dataclasses.Field, Any]]


def setting_fields(sections: tuple[str, ...]) -> dict[str, Owners]:
    """flag -> [(section, field, type hint)], over the sections' dataclasses; ``method`` spans every method."""
    from ..objectives import methods
    from .config import Config

    base = Config()
    out: dict[str, Owners] = {}
    for sec in sections:
        classes = [m.settings for m in methods().values()] if sec == "method" else [type(base.section(sec))]
        for cls in classes:
            hints = field_hints(cls)
            for f in dataclasses.fields(cls):
                if f.metadata.get("cli", True):
                    out.setdefault(flag_name(f), []).append((sec, f, hints[f.name]))
    return out


BENCH_SECTIONS = ("model", "method", "augment", "optim", "train")


def _settings() -> Any:
    return setting(factory=dict, cli=False, help="the run's settings given, {\"section.field\": value}")


def _threads() -> Any:
    return setting(None, "CPU threads for torch", check=at_least(1), metavar="THREADS")


@dataclass(kw_only=True)
class TrainOptions:
    preset: str | None = setting(None, "named setting (see `isif presets`); default images-cpu (images-gpu on a "
                                       "GPU) when --data holds unlabelled images, else cifar10-cpu")
    config: str | None = setting(None, "settings from a JSON or YAML file, any part of a config (a run's "
                                       "config.json repeats that run): its \"preset\" key (else the default) is "
                                       "applied first, then the file, then the flags; not with --preset or --resume",
                                 metavar="FILE")
    out: str | None = setting(None, "run folder (default runs/PRESET-TIMESTAMP)")
    resume: str | bool | None = setting(None, "continue the run in RUN_DIR (or --out) from its last checkpoint",
                                        const=True, metavar="RUN_DIR")
    overwrite: bool = setting(False, "replace an existing run folder")
    dry_run: bool = setting(False, "check flags, data, device and folder, print the resolved config, and stop")
    threads: int | None = _threads()
    quiet: bool = setting(False, "no progress bar")
    settings: dict[str, Any] = _settings()

    def check(self) -> None:
        if self.resume is not None and self.config:
            raise ValueError("--config starts a new run; --resume continues one with its own config (change what "
                             "may change with flags), so drop one of them")
        if self.config and self.preset is not None:
            raise ValueError("--preset and --config together: the file names its own preset (put \"preset\": NAME "
                             "in it) and the flags change the rest")


def _default_methods() -> tuple[str, ...]:
    from .race import DEFAULT_METHODS

    return DEFAULT_METHODS


@dataclass(kw_only=True)
class RaceOptions:
    preset: str = setting("cifar10-race", "the shared setting")
    methods: tuple[str, ...] = setting(help="comma-separated methods", factory=_default_methods, metavar="A,B,...")
    out: str | None = setting(None, "race folder (default runs/race-TIMESTAMP); rerunning reuses finished runs")
    threads: int | None = _threads()
    quiet: bool = setting(False, "no progress bar")
    settings: dict[str, Any] = _settings()

    def check(self) -> None:
        if "method.name" in self.settings:
            raise ValueError("isif race takes --methods A,B,C, not --method")


@dataclass(kw_only=True)
class BenchOptions:
    preset: str = setting("cifar10-cpu", "named setting (see `isif presets`)")
    steps: int = setting(20, "timed steps per piece (after 3 warm-up steps)", check=at_least(1))
    threads: int | None = _threads()
    json: bool = setting(False, "print one JSON object")
    size: int | None = setting(None, "image side in pixels (default: the preset's, a timm backbone's own, else 32)",
                               check=at_least(8))
    settings: dict[str, Any] = _settings()


@dataclass(kw_only=True)
class PresetsOptions:
    verbose: bool = setting(False, "print each preset's changes and full config", short="-v")


# ----------------------------------------------------------------------------- TrainOptions -> (config, run folder)


def resolve_train(o: TrainOptions):
    """(config, run folder): from the preset, the --config file and the flags, or from the run's checkpoint and
    the flags that may change on --resume."""
    from .checkpoint import load_checkpoint
    from .config import Config
    from .presets import resolve
    from .runlog import RunDir

    if o.resume is None:
        name, file = _config_file(o.config, o.settings) if o.config else (o.preset, None)
        cfg = resolve(name or _default_preset(o.settings), o.settings, file=file)
        return cfg, Path(o.out) if o.out else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(o.resume if isinstance(o.resume, str) else (o.out or ""))
    if not str(out):
        raise UserError("--resume needs the run folder: --resume RUN_DIR (or --out RUN_DIR --resume)")
    run = RunDir(out)
    if not run.last.is_file():
        raise UserError(f"nothing to resume in {out}: no checkpoints/last.pt; start without --resume")
    cfg = Config.from_dict(load_checkpoint(run.last)["config"])
    apply_on_resume(cfg, o.settings)
    return cfg, out


def _default_preset(over: dict[str, Any]) -> str:
    from ..base.device import resolve_device
    from .presets import default_preset

    data = over.get("data.path")
    if data is not None and not Path(data).expanduser().exists():
        raise UserError(f"--data {data}: no such file or folder")
    return default_preset(data, over.get("data.dataset"), resolve_device(over.get("train.device") or "auto").type)


def _config_file(path: str, over: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the preset, the file's settings) of ``--config FILE``: its own "preset" key, else the default preset."""
    from .config import check_method_keys, read_config_file
    from .presets import PRESETS, resolve

    name, file = read_config_file(path)
    if name is not None and name not in PRESETS and name != "custom":
        near = difflib.get_close_matches(name, list(PRESETS), n=1)
        raise UserError(f"--config {path}: unknown preset {name!r}" + (f"; did you mean {near[0]}?" if near else
                                                                         "; see `isif presets`"))
    name = name or _default_preset({**file, **over})
    own = file.get("method.name") or resolve(name).method.name
    check_method_keys(file, {own, over.get("method.name", own)}, path)
    return name, file


def apply_on_resume(cfg, overrides: dict[str, Any]) -> None:
    """Apply flags to a resumed run's config: only settings marked resumable may change."""
    from .config import SECTIONS
    from .presets import not_a_setting

    fields = {f"{sec}.{f.name}": (flag, f) for flag, owners in setting_fields(SECTIONS).items()
              for sec, f, _ in owners}
    for path, value in overrides.items():
        flag, f = fields.get(path, ("--method", None))
        try:
            current = cfg.get(path)
        except AttributeError:
            raise UserError(not_a_setting(path, cfg.method.name)) from None
        if current != value and not (f is not None and f.metadata.get("resume")):
            raise UserError(f"{flag} cannot change on --resume (the run has {path}={current!r}); start a new "
                            "run instead")
        cfg.set(path, value)


def race_configs(o: RaceOptions) -> dict[str, Any]:
    """One checked config per raced method: the shared preset, the flags, and the method."""
    from .presets import resolve
    from .race import check_methods

    names = list(o.methods)
    check_methods(names)
    settings = dict(o.settings)
    data = settings.get("data.path")
    if data is not None and "data.dataset" not in settings:  # a folder in no labelled layout: unlabelled images
        from ..data.registry import labelled_layout

        if not Path(data).expanduser().exists():
            raise UserError(f"--data {data}: no such file or folder")
        if not labelled_layout(data):
            settings["data.dataset"] = "unlabelled"
    configs = {n: resolve(o.preset, {**settings, "method.name": n}, strict_method=False) for n in names}
    for cfg in configs.values():  # every run is checked before the first one trains
        if cfg.data.path is not None and not Path(cfg.data.path).expanduser().exists():
            raise UserError(f"--data {cfg.data.path}: no such file or folder")
        cfg.validate()
    return configs
