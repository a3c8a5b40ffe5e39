"""Typed, range-checked configs: a composed hydra config becomes the app's dataclass, or an error
that names the field and the form it expects. Every command goes through :func:`validate`.

    from dataclasses import dataclass
    from moegps.configs import all_or_first_n, checked, positive, validate

    @dataclass
    class SweepConfig:
        batch_size: int = checked(16, positive)
        limit: int | None = checked(None, all_or_first_n)

    cfg = validate(raw, SweepConfig, "sweep")   # a SweepConfig, or ConfigError("sweep: config field ...")

Three things are checked, in this order: every key is a field of the schema (hydra's ``+key=value``
adds keys past a schema's struct flag, so they are refused here, with the closest field named);
every value has the field's type (OmegaConf's conversion, which turns ``"4"`` into 4 and refuses
``"abc"``); every value passes the field's rules (``checked(default, *rules)``). Fields typed
``Any`` or ``dict`` (config groups whose options differ: a predictor, a placement, a system) are
checked by the code they configure, e.g. :func:`check_arguments` against a constructor.

``limit`` means one thing everywhere: null = all, N >= 1 = the first N; 0 is an error (it read as
"all" in some commands and "none" in others).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import sys
from typing import Any, Callable

# a rule returns None when the value is fine, else the expected form ("a positive integer")
Rule = Callable[[Any], "str | None"]

INTERRUPTED = "interrupted: rerun the same command to resume"
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the command, the field and the expected form."""


# ---- rules ---------------------------------------------------------------------------------------


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def positive(v) -> str | None:
    return None if _number(v) and v > 0 else "a positive number"


def nonnegative(v) -> str | None:
    return None if _number(v) and v >= 0 else "a number >= 0"


def fraction(v) -> str | None:
    """Strictly between 0 and 1 (a share of requests held out)."""
    return None if _number(v) and 0 < v < 1 else "a number strictly between 0 and 1"


def unit_interval(v) -> str | None:
    return None if _number(v) and 0 <= v <= 1 else "a number in [0, 1]"


def all_or_first_n(v) -> str | None:
    """null (all) or a positive integer (the first N); 0 is refused, never read as 'all' or 'none'."""
    return None if v is None or (_number(v) and v >= 1) else "null (all) or a positive integer (the first N); 0 is not allowed"


def one_of(*choices) -> Rule:
    def rule(v):
        return None if v in choices else "one of " + ", ".join(repr(c) for c in choices)
    return rule


def optional(rule: Rule) -> Rule:
    def check(v):
        return None if v is None else rule(v)
    return check


def each(rule: Rule, nonempty: bool = True) -> Rule:
    """Every element of a list passes ``rule`` (and the list is not empty)."""
    def check(v):
        if nonempty and not v:
            return f"a non-empty list, each {rule(object()) or 'value'}"
        for x in v:
            bad = rule(x)
            if bad:
                return f"a list, each {bad} ({x!r} is not)"
        return None
    return check


def checked(default: Any, *rules: Rule):
    """A dataclass field with ``default`` (lists and dicts copied per instance) and ``rules``."""
    meta = {"rules": rules}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def device(v) -> str | None:
    """``auto``/``""`` (cuda when there is one), ``cpu``, ``cuda[:n]`` only where torch sees a GPU."""
    if v in ("", "auto", "cpu", None):
        return None
    if isinstance(v, str) and v.split(":")[0] == "cuda":
        import torch  # lazy: only a cuda request needs it

        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            return f"cpu or auto ({v!r} was asked for but {build})"
        index = v.split(":")[1] if ":" in v else "0"
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            return f"cuda or cuda:<n> with n < {torch.cuda.device_count()}"
        return None
    return "auto, cpu, cuda or cuda:<n>"


# ---- validation ------------------------------------------------------------------------------------


def _plain(cfg) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    cfg.pop("hydra", None)
    return cfg


def _unknown_keys(values: dict, schema, app: str, prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{app}: unknown config field '{prefix}{key}'{hint}; a '+{prefix}{key}=...' override "
                              f"adds a key no code reads. Fields: {', '.join(prefix + f for f in fields)}")
        sub = _dataclass_type(schema, fields[key])
        if sub is not None and isinstance(value, dict):
            _unknown_keys(value, sub, app, f"{prefix}{key}.")


def _dataclass_type(schema, f):
    import typing

    hint = typing.get_type_hints(schema).get(f.name)
    return hint if dataclasses.is_dataclass(hint) else None


def _check_rules(obj, app: str, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for rule in f.metadata.get("rules", ()):
            expected = rule(value)
            if expected:
                raise ConfigError(f"{app}: config field '{prefix}{f.name}' is {value!r}, expected {expected}")
        if dataclasses.is_dataclass(value):
            _check_rules(value, app, f"{prefix}{f.name}.")


def validate(cfg, schema, app: str):
    """``cfg`` (a DictConfig or a dict; a ``hydra`` node is ignored) as an instance of the dataclass
    ``schema``; :class:`ConfigError` naming the field for an unknown key, a wrong type or a value
    outside the field's rules."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    values = _plain(cfg)
    _unknown_keys(values, schema, app)
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{app}: config field '{key}': {str(e).splitlines()[0]}") from None
    _check_rules(obj, app)
    return obj


def check_schema(obj, app: str) -> None:
    """The rules of an already-built schema instance (a dataclass made in code, not by hydra)."""
    _check_rules(obj, app)


def check_arguments(target: Callable, arguments: dict, where: str) -> None:
    """The keyword ``arguments`` of a config group option against ``target``'s signature: every name a
    parameter, every value of the parameter's default's type (a bool for a bool, a number for a
    number, a string for a string). Catches ``predictor.decay=abc`` before the constructor turns it
    into a TypeError that names nothing."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for name, value in arguments.items():
        if name.startswith("_") or name in ("name",):
            continue
        if name not in params:
            raise ConfigError(f"{where}: no field {name!r}; fields: {', '.join(p for p in params if p != 'self')}")
        default = params[name].default
        if default is inspect.Parameter.empty or default is None or value is None:
            continue
        if isinstance(default, bool):
            ok, form = isinstance(value, bool), "true or false"
        elif _number(default):
            ok, form = _number(value), "a number"
        elif isinstance(default, str):
            ok, form = isinstance(value, str), "a string"
        elif isinstance(default, (list, tuple)):
            ok, form = isinstance(value, (list, tuple)), "a list"
        else:
            continue
        if not ok:
            raise ConfigError(f"{where}: field {name!r} is {value!r}, expected {form}")


# ---- entry points ------------------------------------------------------------------------------------


def run_command(body: Callable[[], Any], app: str, errors: tuple[type[BaseException], ...] = ()) -> Any:
    """Run a command's ``body``: a :class:`ConfigError` (or one of ``errors``: a file or setting to fix)
    ends it with the message and exit code 1 (``MOEGPS_DEBUG=1``: with its traceback), Ctrl-C with
    :data:`INTERRUPTED` and exit code 130. Work already on disk stays (every write is atomic), so
    rerunning resumes."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"\n{app}: {INTERRUPTED}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except (ConfigError, *errors) as e:
        if os.environ.get("MOEGPS_DEBUG"):
            raise  # the traceback, for a maintainer chasing a bug behind a message
        message = str(e)
        raise SystemExit(message if message.startswith(f"{app}:") else f"{app}: {message}") from None


def hydra_command(app: Callable[[Any], Any], config_name: str, name: str,
                  errors: tuple[type[BaseException], ...] = ()) -> None:
    """``python -m <command>``: compose moegps/conf/<config_name>.yaml with the command line (hydra) and
    run ``app(cfg)`` under :func:`run_command` (errors end with the message, Ctrl-C with exit 130)."""
    import functools

    import hydra

    from .paths import CONF_DIR, register_resolvers

    register_resolvers()

    @functools.wraps(app)
    def task(cfg):
        return run_command(lambda: app(cfg), name, errors)

    run_command(hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(task), name)


def register(name: str, schema, group: str | None = None) -> None:
    """Store ``schema`` in hydra's ConfigStore under ``name`` (a yaml's defaults list names it first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=schema, group=group)
